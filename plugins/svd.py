"""Transform ``svd``: plain truncated SVD of each weight (ALGORITHMS.md §5), the weakest baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowrank_kit.extend import ProjectionFactorization, Spectrum, Statistic, StrategyRegistry, hookimpl, svd_spectrum


@dataclass
class SvdArgs:
    pass


class Svd(ProjectionFactorization):
    name = "svd"
    description = "Truncated SVD of each projection weight; ignores the data (baseline)."
    Args = SvdArgs
    statistic = None

    def spectrum(self, weight: torch.Tensor, stat: Statistic | None) -> Spectrum:
        return svd_spectrum(weight)


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(Svd)
