"""Allocator ``uniform``: the same keep-fraction for every unit, from the target ratio.

With every projection targeted the fraction is 1 − c, i.e. rank floor((1 − c)·m·n/(m + n))
per matrix (ALGORITHMS.md §2); with some weights left whole (Q/K under FLAT-LLM) it is the
§1c conversion w = (ρ·D_total − D_untouched) / D_units.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_kit.extend import (
    RankPlan,
    RunState,
    Strategy,
    StrategyRegistry,
    Unit,
    hookimpl,
    plan_from_fractions,
    uniform_fraction,
)


@dataclass
class UniformArgs:
    pass


class Uniform(Strategy):
    name = "uniform"
    point = "allocate"
    description = "Same keep-fraction of parameters for every compressed unit."
    Args = UniformArgs

    @hookimpl
    def lowrank_allocate(self, run: RunState, units: list[Unit]) -> RankPlan:
        fraction = uniform_fraction(units, run.geometry.total_linear_params, run.target_ratio)
        return RankPlan(
            ranks=plan_from_fractions(units, lambda _unit: fraction),
            allocator=self.name,
            layer_fractions=[min(fraction, 1.0)] * run.geometry.layers,
            notes={"keep_fraction": fraction},
        )


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(Uniform)
