"""Transform ``svd_llm``: SVD-LLM's whitened factorisation (ALGORITHMS.md §2).

Truncating W S (S S^T = X^T X) loses exactly the squared dropped singular values in output
error on the calibration inputs. Works on GQA models: k/v shapes come from the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowrank_kit import hookimpl
from lowrank_kit.linalg import Spectrum, whitened_spectrum
from lowrank_kit.stats import Gram
from lowrank_kit.transforms import ProjectionFactorization


@dataclass
class SvdLlmArgs:
    pass


class SvdLlm(ProjectionFactorization):
    name = "svd_llm"
    description = "Whitened SVD (SVD-LLM): truncation error measured on calibration activations."
    Args = SvdLlmArgs
    statistic = Gram

    def spectrum(self, weight: torch.Tensor, stat: Any) -> Spectrum:
        return whitened_spectrum(weight, stat.matrix)


@hookimpl
def lowrank_register(registry: Any) -> None:
    registry.add(SvdLlm)
