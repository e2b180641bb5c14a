"""Score ``angular_importance``: FLAT-LLM's per-layer importance for IPRS (ALGORITHMS.md §1c).

t_l = Σ over calibration tokens of arccos(clamp(cos(x_in, x_out), 0, 1)) / π, where x_in and
x_out are decoder layer l's input and output hidden states, on the dense model (pass 1). A
layer that turns its hidden states more is more important and keeps more of its rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_kit.extend import (
    AngularChange,
    RunState,
    Strategy,
    StrategyRegistry,
    Tap,
    hookimpl,
    layer_name,
    layer_score,
    statistic_key,
)


@dataclass
class AngularImportanceArgs:
    pass


class AngularImportance(Strategy):
    name = "angular_importance"
    point = "score"
    description = "Per-layer importance: mean angle between a decoder layer's input and output (FLAT-LLM)."
    Args = AngularImportanceArgs
    produces = "layer"

    @hookimpl
    def lowrank_collect_dense(self, run: RunState, tap: Tap) -> None:
        for index, module in enumerate(run.adapter.layers):
            tap.watch(statistic_key(AngularChange, layer_name(index)), module, AngularChange(), where="io")

    @hookimpl
    def lowrank_score(self, run: RunState) -> dict[str, float]:
        return {layer_score(i): float(run.stat(statistic_key(AngularChange, layer_name(i))).sum)
                for i in range(run.geometry.layers)}


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(AngularImportance)
