"""Allocator ``uniform``: the same keep-fraction for every unit, from the target ratio.

With every projection targeted the fraction is 1 − c, i.e. rank floor((1 − c)·m·n/(m + n))
per matrix (ALGORITHMS.md §2); with some weights left whole (Q/K under FLAT-LLM) it is the
§1c conversion w = (ρ·D_total − D_untouched) / D_units. Under ``target.multiple`` > 1 the ranks
round down to multiples, which removes more than the target; the one fraction is then the
largest whose rounded plan still removes at least the target (bisection), so the achieved ratio
lies as close above the target as one fraction for every unit allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_kit.extend import (
    RankPlan,
    RunState,
    Strategy,
    StrategyRegistry,
    Unit,
    achieved_ratio,
    hookimpl,
    largest_meeting_target,
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
        total = run.geometry.total_linear_params
        fraction = uniform_fraction(units, total, run.target_ratio)

        def plan_for(keep: float) -> RankPlan:
            return RankPlan(ranks=plan_from_fractions(units, lambda _unit: keep), allocator=self.name,
                            layer_fractions=[min(keep, 1.0)] * run.geometry.layers, notes={"keep_fraction": keep})

        if all(u.multiple == 1 for u in units):
            return plan_for(fraction)
        return largest_meeting_target(plan_for, 1.0, lambda p: achieved_ratio(p, units, total), run.target_ratio)


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(Uniform)
