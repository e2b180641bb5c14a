"""Allocator ``iprs``: FLAT-LLM's importance-preserving rank selection (ALGORITHMS.md §1c).

The target ratio gives a global keep-fraction w (with the weights no transform touches, such
as Q/K under FLAT-LLM, counted as kept) and a budget B = L·w. Each layer gets
w_l = t_l / Σ_active t · B_active; any w_l above 1 is set to 1 and leaves the active set with
its share of the budget, until none exceeds 1. No minimum. A layer at 1 stays untouched.
Rounding ranks down makes the achieved ratio drift from the target, so B is then corrected by
bisection until the ratio counted from the real shapes meets the target.
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
    capped_shares,
    hookimpl,
    largest_meeting_target,
    layer_score,
    plan_from_fractions,
    uniform_fraction,
)


@dataclass
class IprsArgs:
    pass


def iprs_fractions(scores: list[float], budget: float) -> list[float]:
    """Keep-fractions proportional to ``scores`` summing to ``budget``, capped at 1 with redistribution."""
    return capped_shares(scores, [1.0] * len(scores), budget)


class Iprs(Strategy):
    name = "iprs"
    point = "allocate"
    description = "Per-layer keep-fractions proportional to layer importance, capped at 1 (FLAT-LLM IPRS)."
    Args = IprsArgs
    consumes = "layer"

    @hookimpl
    def lowrank_allocate(self, run: RunState, units: list[Unit]) -> RankPlan:
        layers = sorted({u.layer for u in units})
        missing = [layer_score(i) for i in layers if layer_score(i) not in run.scores]
        if missing:
            raise ValueError(f"iprs needs per-layer scores such as angular_importance's; missing {missing[:3]}")
        scores = [run.scores[layer_score(i)] for i in layers]
        total = run.geometry.total_linear_params
        w = uniform_fraction(units, total, run.target_ratio)

        def plan_for(budget: float) -> RankPlan:
            fractions = dict(zip(layers, iprs_fractions(scores, budget), strict=True))
            ranks = plan_from_fractions(units, lambda unit: fractions[unit.layer])
            return RankPlan(ranks=ranks, allocator=self.name, layer_fractions=list(fractions.values()),
                            notes={"keep_fraction": w, "budget": budget})

        plan = largest_meeting_target(plan_for, float(len(layers)),
                                      lambda p: achieved_ratio(p, units, total), run.target_ratio)
        plan.notes["uncorrected_budget"] = w * len(layers)
        return plan


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(Iprs)
