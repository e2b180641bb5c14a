"""Transform ``svd_llm``: SVD-LLM's whitened factorisation (ALGORITHMS.md §2).

Truncating W S (S S^T = X^T X) loses exactly the squared dropped singular values in output
error on the calibration inputs. Works on GQA models: k/v shapes come from the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowrank_kit.extend import (
    Gram,
    ProjectionFactorization,
    Spectrum,
    Statistic,
    StrategyRegistry,
    hookimpl,
    whitened_spectrum,
)


@dataclass
class SvdLlmArgs:
    pass


class SvdLlm(ProjectionFactorization):
    name = "svd_llm"
    description = "Whitened SVD (SVD-LLM): truncation error measured on calibration activations."
    Args = SvdLlmArgs
    statistic = Gram

    def spectrum(self, weight: torch.Tensor, stat: Statistic | None) -> Spectrum:
        return whitened_spectrum(weight, stat.matrix)


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(SvdLlm)
