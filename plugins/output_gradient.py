"""Score ``output_gradient``: how much the loss feels an error in each projection's output.

For every projection p of every layer, s_p = Σ_t ‖∂L/∂y_t‖² / d_out over the calibration
tokens t, where y_t is p's output and L the language-modelling loss of the dense model (one
backward pass per batch, no weight gradient computed). Why this number: to second order, an
output error δy costs ΔL ≈ ½ Σ_t δy_tᵀ H_t δy_t, and with the Fisher (Gauss–Newton) estimate
H ≈ g gᵀ and an error direction unrelated to the gradient's, E[(gᵀδy)²] = ‖g‖²‖δy‖²/d_out;
so s_p times a unit's squared output error (``lowrank_error_curves``) predicts its loss
increase, in the same units for every projection, layer and transform. The weight Fisher of
``fisher`` scores the weights instead, which does not convert a measured output error into loss.
"""

from __future__ import annotations

from lowrank_kit.extend import (
    PROJECTIONS,
    GradEnergy,
    NoArgs,
    RunState,
    Strategy,
    StrategyRegistry,
    Tap,
    hookimpl,
    projection_name,
    projection_score,
    statistic_key,
)


def _key(layer: int, projection: str) -> str:
    return statistic_key(GradEnergy, projection_name(layer, projection) + "_output")


class OutputGradient(Strategy):
    name = "output_gradient"
    point = "score"
    description = "Per-projection loss sensitivity of its output: squared loss gradient per output dim."
    Args = NoArgs
    produces = "output"

    @hookimpl
    def lowrank_collect_dense(self, run: RunState, tap: Tap) -> None:
        for index in range(run.geometry.layers):
            for projection in PROJECTIONS:
                tap.watch_output_grad(_key(index, projection), run.adapter.projection(index, projection),
                                      GradEnergy())

    @hookimpl
    def lowrank_score(self, run: RunState) -> dict[str, float]:
        scores = {}
        for index in range(run.geometry.layers):
            for projection in PROJECTIONS:
                stat = run.stat(_key(index, projection))
                if not stat.width:
                    raise RuntimeError(f"output_gradient: {projection_name(index, projection)} got no gradient")
                scores[projection_score(index, projection)] = float(stat.sum) / stat.width
        return scores


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(OutputGradient)
