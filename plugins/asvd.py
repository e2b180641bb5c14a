"""Transform ``asvd``: activation-aware SVD (ALGORITHMS.md §4), a baseline.

Input channel j is scaled by s_j = mean|x_j|^α before the SVD of W diag(s), and the scaling
is undone on the right factor, so channels that carry large activations are approximated
more carefully. ASVD's sensitivity-based rank search (perplexity per layer and ratio) is not
offered: it costs hours on 7B models and any allocator here can drive this transform instead.
Channels that never activate on the calibration data (mean 0) get a tiny scale instead of 0,
so the undoing division stays finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lowrank_kit.extend import (
    AbsMean,
    ProjectionFactorization,
    RecipeError,
    Spectrum,
    Statistic,
    StrategyRegistry,
    hookimpl,
    scaled_spectrum,
)


@dataclass
class AsvdArgs:
    alpha: float = field(default=0.5, metadata={"help": "exponent α of the activation scale mean|x|^α"})

    def check(self, path: str) -> None:
        if self.alpha < 0:
            raise RecipeError(f"{path}.alpha", f"must be at least 0, got {self.alpha}")


def activation_scale(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """mean|x|^α per input channel, float64, with dead channels floored at 1e-6 of the largest scale."""
    scale = mean_abs.to(torch.float64).pow(alpha)
    return scale.clamp_min(1e-6 * float(scale.max().clamp_min(1e-30)))


class Asvd(ProjectionFactorization):
    name = "asvd"
    description = "Activation-aware SVD (ASVD): input channels scaled by mean|x|^α before the SVD (baseline)."
    Args = AsvdArgs
    statistic = AbsMean

    def spectrum(self, weight: torch.Tensor, stat: Statistic | None) -> Spectrum:
        return scaled_spectrum(weight, activation_scale(stat.mean, self.args.alpha))


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(Asvd)
