"""Transform ``svd``: plain truncated SVD of each weight (ALGORITHMS.md §5), the weakest baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lowrank_kit import hookimpl
from lowrank_kit.linalg import Spectrum, svd_spectrum
from lowrank_kit.transforms import ProjectionFactorization


@dataclass
class SvdArgs:
    pass


class Svd(ProjectionFactorization):
    name = "svd"
    description = "Truncated SVD of each projection weight; ignores the data (baseline)."
    Args = SvdArgs
    statistic = None

    def spectrum(self, weight: torch.Tensor, stat: Any) -> Spectrum:
        return svd_spectrum(weight)


@hookimpl
def lowrank_register(registry: Any) -> None:
    registry.add(Svd)
