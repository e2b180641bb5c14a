"""Everything a strategy plugin needs, in one module: ``from lowrank_kit.extend import ...``.

The built-in plugins import only from here, as docs/writing-a-plugin.md does; the rest of the
package is free to move behind it.
"""

from __future__ import annotations

from lowrank_kit.calibration.stats import (
    AbsMean,
    AngularChange,
    GradEnergy,
    GradientGram,
    Gram,
    HeadGram,
    SquaredGrad,
    Statistic,
    Tap,
)
from lowrank_kit.compressed.decoding import install as install_decoder
from lowrank_kit.compressed.factorization import (
    ProjectionFactorization,
    check_output_fisher,
    output_fisher,
    projection_units,
    watch_output_fisher,
)
from lowrank_kit.compressed.linalg import (
    Spectrum,
    output_weighting,
    output_whitened_spectrum,
    psd_cholesky,
    scaled_spectrum,
    svd_spectrum,
    symmetric_eigh,
    whitened_spectrum,
)
from lowrank_kit.compressed.modules import HeadwiseLowRank, LowRankLinear, ResizedLinear, SliceableRank, aligned_linear
from lowrank_kit.compressed.plan import (
    ErrorCurve,
    RankPlan,
    Unit,
    achieved_ratio,
    candidates,
    capped_shares,
    largest_meeting_target,
    plan_from_fractions,
    plan_ranks,
    uniform_fraction,
)
from lowrank_kit.extension.hookspecs import hookimpl
from lowrank_kit.extension.keys import (
    ATTENTION_PROJECTIONS,
    MLP_PROJECTIONS,
    PROJECTIONS,
    ScoreLevel,
    group_name,
    layer_name,
    layer_score,
    projection_name,
    projection_score,
    statistic_key,
)
from lowrank_kit.extension.strategy import NoArgs, Strategy, StrategyRegistry, moved_argument
from lowrank_kit.models.adapters import Geometry, ModelAdapter
from lowrank_kit.models.attention import ValueDimAttention, shrink_values
from lowrank_kit.pipeline.state import RunState
from lowrank_kit.recipe.schema import RecipeError

__all__ = [
    "ATTENTION_PROJECTIONS", "MLP_PROJECTIONS", "PROJECTIONS", "AbsMean", "AngularChange", "ErrorCurve", "Geometry",
    "GradEnergy", "GradientGram", "Gram", "HeadGram", "HeadwiseLowRank", "LowRankLinear", "ModelAdapter", "NoArgs",
    "ProjectionFactorization", "RankPlan", "RecipeError", "ResizedLinear", "RunState", "ScoreLevel", "SliceableRank",
    "Spectrum", "SquaredGrad", "Statistic", "Strategy", "StrategyRegistry", "Tap", "Unit", "ValueDimAttention",
    "achieved_ratio", "aligned_linear", "candidates", "capped_shares", "check_output_fisher", "group_name", "hookimpl",
    "install_decoder", "largest_meeting_target", "layer_name", "layer_score", "moved_argument", "output_fisher",
    "output_weighting", "output_whitened_spectrum", "plan_from_fractions", "plan_ranks", "projection_name",
    "projection_score", "projection_units", "psd_cholesky", "scaled_spectrum", "shrink_values", "statistic_key",
    "svd_spectrum", "symmetric_eigh", "uniform_fraction", "watch_output_fisher", "whitened_spectrum",
]
