"""Score ``angular_importance``: FLAT-LLM's per-layer importance for IPRS (ALGORITHMS.md §1c).

t_l = Σ over calibration tokens of arccos(clamp(cos(x_in, x_out), 0, 1)) / π, where x_in and
x_out are decoder layer l's input and output hidden states, on the dense model (pass 1). A
layer that turns its hidden states more is more important and keeps more of its rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lowrank_kit import hookimpl
from lowrank_kit.stats import AngularChange, Tap
from lowrank_kit.strategy import Strategy


@dataclass
class AngularImportanceArgs:
    pass


class AngularImportance(Strategy):
    name = "angular_importance"
    point = "score"
    description = "Per-layer importance: mean angle between a decoder layer's input and output (FLAT-LLM)."
    Args = AngularImportanceArgs

    @hookimpl
    def lowrank_collect(self, run: Any, tap: Tap, layer: int | None) -> None:
        if layer is None:
            for index, module in enumerate(run.adapter.layers):
                tap.watch(f"AngularChange:layers.{index}", module, AngularChange(), where="io")

    @hookimpl
    def lowrank_score(self, run: Any) -> dict[str, float]:
        return {f"layers.{i}": float(run.stat(f"AngularChange:layers.{i}").sum) for i in range(run.geometry.layers)}


@hookimpl
def lowrank_register(registry: Any) -> None:
    registry.add(AngularImportance)
