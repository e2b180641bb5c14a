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
from typing import Any

from lowrank_kit import hookimpl
from lowrank_kit.plan import RankPlan, Unit, achieved_ratio, plan_from_fractions, uniform_fraction
from lowrank_kit.strategy import Strategy


@dataclass
class IprsArgs:
    pass


def iprs_fractions(scores: list[float], budget: float) -> list[float]:
    """Keep-fractions proportional to ``scores`` summing to ``budget``, capped at 1 with redistribution."""
    fractions = [0.0] * len(scores)
    active = list(range(len(scores)))
    remaining = budget
    while active:
        total = sum(scores[i] for i in active)
        if total <= 0:  # no importance left to split by: share the rest evenly
            share = {i: remaining / len(active) for i in active}
        else:
            share = {i: scores[i] / total * remaining for i in active}
        capped = [i for i in active if share[i] > 1.0]
        if not capped:
            for i in active:
                fractions[i] = share[i]
            break
        for i in capped:
            fractions[i] = 1.0
            remaining -= 1.0
            active.remove(i)
    return fractions


class Iprs(Strategy):
    name = "iprs"
    point = "allocate"
    description = "Per-layer keep-fractions proportional to layer importance, capped at 1 (FLAT-LLM IPRS)."
    Args = IprsArgs
    needs_scores = True

    @hookimpl
    def lowrank_allocate(self, run: Any, units: list[Unit]) -> RankPlan:
        layers = sorted({u.layer for u in units})
        missing = [f"layers.{i}" for i in layers if f"layers.{i}" not in run.scores]
        if missing:
            raise ValueError(f"iprs needs per-layer scores such as angular_importance's; missing {missing[:3]}")
        scores = [run.scores[f"layers.{i}"] for i in layers]
        total = run.geometry.total_linear_params
        w = uniform_fraction(units, total, run.target_ratio)

        def plan_for(budget: float) -> RankPlan:
            fractions = dict(zip(layers, iprs_fractions(scores, budget), strict=True))
            ranks = plan_from_fractions(units, lambda unit: fractions[unit.layer])
            return RankPlan(ranks=ranks, allocator=self.name, layer_fractions=list(fractions.values()),
                            notes={"keep_fraction": w, "budget": budget})

        # The largest budget whose rounded ranks still remove at least the target ratio.
        low, high = 0.0, float(len(layers))
        for _ in range(50):
            middle = (low + high) / 2
            if achieved_ratio(plan_for(middle), units, total) >= run.target_ratio:
                low = middle
            else:
                high = middle
        plan = plan_for(low)
        plan.notes["uncorrected_budget"] = w * len(layers)
        return plan


@hookimpl
def lowrank_register(registry: Any) -> None:
    registry.add(Iprs)
