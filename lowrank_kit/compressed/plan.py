"""Compressible units, the rank plan, and the compression ratio computed from real shapes.

A transform describes what it can compress as units: a group of modules whose kept size is a
linear function of one rank (an SVD rank, a head-wise PCA value dim, a Nyström channel count).
Allocators only see units, so any allocator drives any transform.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Unit:
    """One compressible group of modules, as reported by a transform.

    ``rank_cost`` parameters are kept per unit of rank; keeping ``max_rank`` (or anything whose
    cost reaches ``dense_params``) means the modules stay dense and untouched. ``multiple`` is
    the recipe's ``target.multiple`` (the engine sets it on every unit): every rank an allocator
    plans is a multiple of it or keeps the unit dense, so kernels see friendly shapes whichever
    allocator planned them.
    """

    name: str  # e.g. "layers.3.q_proj" (``extension.keys`` builds these)
    layer: int
    projections: tuple[str, ...]  # the projections of the layer it holds, e.g. ("v_proj", "o_proj")
    transform: str
    dense_params: int
    rank_cost: int
    max_rank: int
    multiple: int = 1
    # Whether the compressed unit runs two matmuls in a row (a factorisation) rather than one
    # smaller one (pruned channels): only then does ``break_even`` apply.
    factorised: bool = False
    # Share of the dense parameters at which a factorised unit stops being faster than dense and
    # stays dense instead (the recipe's ``target.break_even``; 1: where it stops saving parameters).
    break_even: float = 1.0

    @property
    def kind(self) -> str:
        """The projections it holds, for reports: "q_proj", "v_proj+o_proj"."""
        return "+".join(self.projections)

    @property
    def projection(self) -> str:
        """The one projection of a single-projection unit."""
        if len(self.projections) != 1:
            raise ValueError(f"unit {self.name} holds {len(self.projections)} projections, not one")
        return self.projections[0]

    def is_dense(self, rank: int) -> bool:
        limit = self.dense_params * (self.break_even if self.factorised else 1.0)
        return rank >= self.max_rank or rank * self.rank_cost >= limit

    def params(self, rank: int) -> int:
        """Parameters kept at ``rank`` (dense size when the rank saves nothing)."""
        return self.dense_params if self.is_dense(rank) else rank * self.rank_cost

    def rank_for_fraction(self, fraction: float) -> int:
        """Largest rank keeping at most ``fraction`` of the dense parameters; 1 or more → dense.

        For an m×n SVD unit this is floor(f·m·n/(m+n)), ALGORITHMS.md §2's uniform rank.
        """
        if fraction >= 1.0:
            return self.max_rank
        rank = math.floor(max(fraction, 0.0) * self.dense_params / self.rank_cost + 1e-9)
        rank = min(rank, self.max_rank)
        return rank if self.is_dense(rank) else rank // self.multiple * self.multiple

    def round(self, rank: int) -> int:
        """``rank`` rounded down to a multiple of ``multiple``; a rank that keeps the unit dense
        stays, and a positive rank never becomes 0 (it becomes ``multiple``, or dense if that is)."""
        if rank == 0 or self.is_dense(rank) or self.multiple == 1:
            return rank
        return max(rank // self.multiple * self.multiple, min(self.multiple, self.max_rank))

    def plannable_ranks(self) -> list[int]:
        """Every rank a plan may give: the multiples of ``multiple`` that compress, then dense."""
        return [r for r in range(0, self.max_rank, self.multiple) if not self.is_dense(r)] + [self.max_rank]


@dataclass(frozen=True)
class ErrorCurve:
    """What truncating one unit costs, as its transform measured it on the dense model's calibration data.

    ``error[r]`` is the squared output error at ``site`` (summed over calibration tokens) when the
    unit keeps rank r, for r = 0 … max_rank (``error[max_rank]`` is 0). ``site`` is the projection
    whose output carries the error (value states for head-wise PCA's v+o, down_proj's output for a
    Nyström MLP), so a sensitivity of that output turns it into a predicted loss increase.
    """

    unit: str
    site: str
    error: tuple[float, ...]
    # ‖W − W_r‖²_F summed over the unit's weights, where the transform can tell (single-projection
    # factorisations); empty otherwise. Weight-space allocators (fisher's truncation rule) read it.
    weight_error: tuple[float, ...] = ()

    @classmethod
    def from_tail(cls, unit: str, site: str, dropped: Any, weight_dropped: Any = None) -> ErrorCurve:
        """From the error each component adds when dropped (component i is kept at ranks above i):
        error[r] = Σ_{i ≥ r} dropped[i]; the same for ``weight_dropped``."""
        return cls(unit, site, _tail(dropped), _tail(weight_dropped) if weight_dropped is not None else ())

    def to_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "site": self.site, "error": list(self.error),
                "weight_error": list(self.weight_error)}


def _tail(dropped: Any) -> tuple[float, ...]:
    values = [float(v) for v in dropped]
    tail, total = [0.0] * (len(values) + 1), 0.0
    for i in range(len(values) - 1, -1, -1):
        total += max(values[i], 0.0)
        tail[i] = total
    return tuple(tail)


@dataclass
class RankPlan:
    """The kept rank of every unit: a plain, serialisable object saved with the model."""

    ranks: dict[str, int]
    allocator: str
    layer_fractions: list[float] = field(default_factory=list)  # per-layer keep-fraction, if any
    notes: dict[str, Any] = field(default_factory=dict)

    def rank(self, unit: Unit) -> int:
        return self.ranks.get(unit.name, unit.max_rank)

    def kept_params(self, units: list[Unit]) -> int:
        return sum(u.params(self.rank(u)) for u in units)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fractions_by_layer(self, units: list[Unit], layers: int) -> list[float]:
        """Kept share of the targeted parameters of each layer (1.0 where nothing is targeted)."""
        kept, dense = [0] * layers, [0] * layers
        for u in units:
            kept[u.layer] += u.params(self.rank(u))
            dense[u.layer] += u.dense_params
        return [k / d if d else 1.0 for k, d in zip(kept, dense, strict=True)]


def achieved_ratio(plan: RankPlan, units: list[Unit], total_dense: int) -> float:
    """Fraction of all decoder-layer linear weights removed (embeddings, lm_head, norms excluded)."""
    removed = sum(u.dense_params - u.params(plan.rank(u)) for u in units)
    return removed / total_dense


def uniform_fraction(units: list[Unit], total_dense: int, ratio: float) -> float:
    """The one keep-fraction w of the units' parameters that removes ``ratio`` of all weights.

    ALGORITHMS.md §1c: w = (ρ·D_total − D_untouched) / D_units with ρ = 1 − c, where
    D_untouched are the decoder weights no transform targets (e.g. Q/K under FLAT-LLM).
    With every projection targeted this is simply w = 1 − c.
    """
    units_dense = sum(u.dense_params for u in units)
    untouched = total_dense - units_dense
    if units_dense == 0:
        raise ValueError("no compressible units: the recipe's transforms target nothing")
    w = ((1.0 - ratio) * total_dense - untouched) / units_dense
    if w <= 0.0:
        raise ValueError(
            f"target ratio {ratio} is out of reach: the targeted modules hold only "
            f"{units_dense / total_dense:.1%} of the decoder weights"
        )
    return w


def plan_from_fractions(units: list[Unit], fraction_of: Any) -> dict[str, int]:
    """Ranks from a keep-fraction per unit (``fraction_of(unit) -> float``)."""
    return {u.name: u.rank_for_fraction(fraction_of(u)) for u in units}


def capped_shares(weights: list[float], caps: list[float], total: float) -> list[float]:
    """Split ``total`` in proportion to ``weights``, no share above its cap, the excess redistributed.

    Shares that would exceed their cap are set to it and leave the pool with their part of the
    total, until none exceeds; with no weight left, the rest is split evenly.
    """
    shares = [0.0] * len(weights)
    active = list(range(len(weights)))
    remaining = total
    while active:
        weight = sum(weights[i] for i in active)
        proposal = {i: (weights[i] / weight if weight > 0 else 1 / len(active)) * remaining for i in active}
        capped = [i for i in active if proposal[i] > caps[i]]
        if not capped:
            for i in active:
                shares[i] = proposal[i]
            break
        for i in capped:
            shares[i] = caps[i]
            remaining -= caps[i]
            active.remove(i)
    return shares


def largest_meeting_target(plan_for: Any, high: float, ratio_of: Any, target: float, steps: int = 50) -> Any:
    """Bisect a budget in [0, high] for the largest whose (rounded) plan removes at least ``target``.

    Rounding ranks down makes the achieved ratio drift from the one a budget was computed for;
    allocators correct it this way so the ratio counted from the real shapes meets the target.
    """
    low = 0.0
    for _ in range(steps):
        middle = (low + high) / 2
        if ratio_of(plan_for(middle)) >= target:
            low = middle
        else:
            high = middle
    return plan_for(low)


# --- planning from truncation-error curves (error_budget; fisher's truncation rule) -------------

Point = tuple[int, float, int]  # (parameters kept, predicted loss, rank)


def candidates(unit: Unit, error: Sequence[float], sensitivity: float) -> list[Point]:
    """The unit's (parameters, predicted loss, rank) choices, by increasing parameters.

    ``error[r]`` is the unit's error at rank r (an ``ErrorCurve``'s), ``sensitivity`` converts it
    into loss; the ranks are the unit's ``plannable_ranks`` (multiples of ``target.multiple``
    below the dense break-even, plus staying dense).
    """
    if len(error) != unit.max_rank + 1:
        raise ValueError(f"error curve of {unit.name} has {len(error)} points, expected {unit.max_rank + 1}")
    return [(unit.params(r), sensitivity * error[r] if r < unit.max_rank else 0.0, r) for r in unit.plannable_ranks()]


def lower_hull(points: list[Point]) -> list[Point]:
    """The lower convex hull of points sorted by parameters (Andrew's monotone chain).

    Its last point (dense, loss 0) is the lowest, so loss never increases along it and the
    loss saved per parameter decreases from one segment to the next.
    """
    hull: list[Point] = []
    for p in points:
        while len(hull) >= 2:
            (x1, y1, _), (x2, y2, _) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def plan_ranks(options: dict[str, list[Point]], budget: float) -> dict[str, int]:
    """Ranks minimising total predicted loss with total parameters ≤ ``budget`` (steps 2 and 3 above)."""
    hulls = {name: lower_hull(points) for name, points in options.items()}
    at = dict.fromkeys(options, 0)  # index into the unit's hull
    spent = float(sum(h[0][0] for h in hulls.values()))
    heap = []

    def push(name: str) -> None:
        hull, i = hulls[name], at[name]
        if i + 1 < len(hull):
            (c0, l0, _), (c1, l1, _) = hull[i], hull[i + 1]
            if l0 > l1:  # parameters that buy no loss reduction are not spent
                heapq.heappush(heap, (-(l0 - l1) / (c1 - c0), name))

    for name in hulls:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        hull, i = hulls[name], at[name]
        step = hull[i + 1][0] - hull[i][0]
        if spent + step <= budget:
            spent += step
            at[name] = i + 1
            push(name)
    chosen = {name: hulls[name][at[name]] for name in hulls}
    # Step 3: fill what is left with single candidate steps (off the hull too), best first.
    position = {name: options[name].index(chosen[name]) for name in options}
    while True:
        best: str | None = None
        best_gain = 0.0
        for name, points in options.items():
            j = position[name]
            if j + 1 < len(points):
                step = points[j + 1][0] - points[j][0]
                gain = (points[j][1] - points[j + 1][1]) / step
                if gain > 0 and spent + step <= budget and (best is None or gain > best_gain):
                    best, best_gain = name, gain
        if best is None:
            break
        j = position[best]
        spent += options[best][j + 1][0] - options[best][j][0]
        position[best] = j + 1
    return {name: options[name][position[name]][2] for name in options}
