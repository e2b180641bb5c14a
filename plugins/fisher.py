"""FLRC's Fisher-based rank allocation (ALGORITHMS.md §3a): score ``fisher`` and allocator ``fisher``.

Score: squared gradients of the language-modelling loss w.r.t. every projection weight,
accumulated over calibration batches (one backward pass per batch of ``calibration.batch_size``
windows, which bounds memory), float32; the importance of projection p is
s_p = mean over its elements of sqrt(Σ g² / n_batches).

Allocator, ``rule: parameters`` (our reading of §3a): the kept parameter budget is split across
units in proportion to their importance, in parameters (not ranks: shapes differ), each capped
at its dense size with the excess redistributed, then converted to ranks rounded down to
``target.multiple``. ``rule: ranks`` (the same group's earlier code, Palu's rank search): the budget
is split in rank units in proportion to importance, each capped at the unit's full rank.
Deviation from Palu: its floor-then-hand-out-the-remainder step and its final rounding to 32
(which leave the achieved ratio wherever they land) are replaced by the same bisection as
below, so the ratio counted from the rounded ranks meets the target. Units that group several
projections (head-wise PCA's v+o, Nyström's MLP) take the element-weighted mean of their
projections' s_p, so the allocator drives any transform. As for IPRS, the budget is then
bisected so the ratio counted from the rounded ranks meets the target.

The default is ``ranks``, chosen by measurement (standard bench: SmolLM2-135M, Emma 16×512,
perplexity on 8,192 Persuasion tokens): flrc_static 67.61 / 113.11 / 1,175.01 at 0.2 / 0.3 /
0.5 under ``ranks`` against 75.13 / 139.12 / 3,359.41 under ``parameters``; flat_fisher gives
the same plan under both at 0.2 and 0.3 (every v+o unit is capped at dense, the MLP takes the
cut), 47.34 / 59.13. Neither rule knows what truncation costs, which is why both collapse at
0.5 on SVD-LLM factors; ``error_budget`` plans from the truncation errors themselves.

``rule: output`` is our third reading, the one that knows what truncation costs (FLRC's exact rule
is unpublished, ALGORITHMS.md §3). In the Kronecker-factored Fisher of a weight, F ≈ E[xxᵀ] ⊗ E[ggᵀ]
with the output factor taken as σ_p·I, the Fisher-weighted change of a truncated weight is σ_p
times its output error on the calibration data, which every transform reports (dropped whitened
σ², dropped eigenvalues, the Nyström residual). σ_p comes from the Fisher the score already takes:
its mean over W's elements divided by the mean input energy E[x²] (``output_sensitivity``; the
score pass also sums x² once per distinct projection input, q/k/v and gate/up sharing theirs). The plan then
minimises Σ σ_site·E_u(r_u) within the budget, by the same greedy hull search as ``error_budget``,
so it drives every transform. It differs from error_budget with ``output_gradient`` only in how
σ is estimated: from the weight gradients, whose cross-token terms ``output_gradient`` does not
see (on a tiny random Llama the two differ by 2–25× per projection). Measured on the standard
bench, flrc_static: 55.43 / 88.35 / 267.19 at 0.2 / 0.3 / 0.5 under ``output``, against
67.61 / 113.11 / 1,175.01 under ``ranks`` and uniform SVD-LLM's 105.79 / 141.73 / 307.64; so
recipes/flrc*.yaml set ``rule: output``. The allocator's default stays ``ranks``, which
flat_fisher was measured with: under ``output`` it gave 48.48 / 57.73 at 0.2 / 0.3 against 45.72 / 55.85.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lowrank_kit.extend import (
    PROJECTIONS,
    AbsMean,
    Geometry,
    NoArgs,
    RankPlan,
    RecipeError,
    RunState,
    SquaredGrad,
    Strategy,
    StrategyRegistry,
    Tap,
    Unit,
    achieved_ratio,
    candidates,
    capped_shares,
    hookimpl,
    largest_meeting_target,
    moved_argument,
    plan_ranks,
    projection_name,
    projection_score,
    statistic_key,
    uniform_fraction,
)


def _key(layer: int, projection: str) -> str:
    return statistic_key(SquaredGrad, projection_name(layer, projection))


def _input_key(run: RunState, layer: int, projection: str) -> str:
    """q/k/v (and gate/up) read one input: its x² is summed once, under the input's site."""
    return statistic_key("InputSquares", run.adapter.input_site(layer, projection))


def output_score(layer: int, projection: str) -> str:
    """The key of the Fisher-derived sensitivity of a projection's output (``rule: output``)."""
    return "fisher_output:" + projection_name(layer, projection)


def output_sensitivity(squared_grad: SquaredGrad, input_squares: AbsMean) -> float:
    """The loss sensitivity of a projection's output, per output dim, from its weight Fisher.

    With the Kronecker-factored Fisher (K-FAC) of a weight W with inputs x and output gradients g
    (per batch b, G_b = Σ_t g_t x_tᵀ; tokens independent), E_b[G_ij²] ≈ T·E[g_i²]·E[x_j²]. So the
    mean Fisher over W's elements divided by the mean input energy E[x²] gives T·E[g²], and times
    the number of batches n_b it is Σ_t ‖g_t‖² / d_out over all calibration tokens: the same number
    as ``output_gradient``'s s_p, read from the weight gradients FLRC already takes.
    """
    assert squared_grad.sum is not None and input_squares.sum is not None, "statistic saw no calibration data"
    fisher = float(squared_grad.sum.double().mean() / squared_grad.count)  # mean over elements and batches
    energy = float(input_squares.mean.mean())  # E[x²] over tokens and input channels
    return float(squared_grad.count) * fisher / energy if energy > 0 else 0.0


class FisherScore(Strategy):
    name = "fisher"
    point = "score"
    description = "Per-projection importance from squared loss gradients on calibration data (FLRC)."
    Args = NoArgs
    produces = "projection"

    @hookimpl
    def lowrank_collect_dense(self, run: RunState, tap: Tap) -> None:
        for index in range(run.geometry.layers):
            for projection in PROJECTIONS:
                module = run.adapter.projection(index, projection)
                tap.watch_grad(_key(index, projection), module.weight, SquaredGrad())
                tap.watch(_input_key(run, index, projection), module, AbsMean(power=2.0))

    @hookimpl
    def lowrank_score(self, run: RunState) -> dict[str, float]:
        scores = {}
        for index in range(run.geometry.layers):
            for projection in PROJECTIONS:
                stat = run.stat(_key(index, projection))
                scores[projection_score(index, projection)] = float((stat.sum / stat.count).sqrt().mean())
                scores[output_score(index, projection)] = output_sensitivity(
                    stat, run.stat(_input_key(run, index, projection)))
        return scores


@dataclass
class FisherAllocatorArgs:
    multiple: int | None = field(default=None, metadata={"help": "moved to target.multiple (one rounding for "
                                                                 "every allocator)"})
    rule: Literal["parameters", "ranks", "truncation", "output"] = field(default="ranks", metadata={
        "help": "split the budget in proportion to importance in parameters (ALGORITHMS.md §3a) or in rank units "
                "(Palu's rank search); or spend it where the Fisher-weighted weight error of truncation is "
                "smallest per parameter (truncation: needs single-projection factorisations svd, svd_llm, asvd); "
                "or where the output error of truncation, weighted by the Kronecker-factored Fisher, is (output: "
                "any transform)"})

    def check(self, path: str) -> None:
        moved_argument(self.multiple, f"{path}.multiple", "target.multiple")

    @property
    def needs_error_curves(self) -> bool:
        return self.rule in ("truncation", "output")


def unit_importance(unit: Unit, scores: dict[str, float], geometry: Geometry) -> float:
    """Element-weighted mean of the Fisher importance of the projections a unit holds."""
    projections = unit.projections
    names = [projection_score(unit.layer, p) for p in projections]
    missing = [n for n in names if n not in scores]
    if missing or not set(projections) <= set(PROJECTIONS):
        raise ValueError(f"fisher allocation needs per-projection scores (score: fisher); none for {unit.name}")
    sizes = [geometry.dense_params(p) for p in projections]
    return sum(scores[n] * s for n, s in zip(names, sizes, strict=True)) / sum(sizes)


class FisherAllocator(Strategy):
    name = "fisher"
    point = "allocate"
    description = "Parameter budget split across projections in proportion to Fisher importance (FLRC)."
    Args = FisherAllocatorArgs
    consumes = "projection"

    @property  # type: ignore[override]
    def needs_error_curves(self) -> bool:
        return self.args.needs_error_curves

    def _curve_options(self, run: RunState, unit: Unit) -> list[tuple[int, float, int]]:
        """The unit's (parameters, predicted loss, rank) choices under a rule that reads error curves.

        truncation: ΔL(r) ≈ ½ F̄ ‖W − W_r‖²_F, F̄ ≈ s_p² (the score is a mean RMS gradient).
        output: ΔL(r) ≈ σ_site·E_u(r), the unit's output error at its error site (dropped whitened
        σ², dropped eigenvalues, the Nyström residual) times the K-FAC output factor of the Fisher
        at that site (``output_sensitivity``).
        """
        curve = run.error_curves[unit.name]
        if self.args.rule == "truncation":
            if not curve.weight_error:
                raise RecipeError("allocate.rule", f"'truncation' needs weight-space error curves, which transform "
                                                   f"'{unit.transform}' does not report (nor any transform with "
                                                   "output_fisher); use rule: ranks or output")
            return candidates(unit, curve.weight_error, unit_importance(unit, run.scores, run.geometry) ** 2)
        key = output_score(unit.layer, curve.site)
        if key not in run.scores:
            raise RecipeError("score", f"rule 'output' needs the Fisher of {curve.site} (score: fisher)")
        return candidates(unit, curve.error, run.scores[key])

    def _curve_plan(self, run: RunState, units: list[Unit]) -> RankPlan:
        """Planned greedily by predicted loss per parameter, as error_budget does."""
        options = {u.name: self._curve_options(run, u) for u in units}
        total = run.geometry.total_linear_params
        budget = sum(u.dense_params for u in units) - run.target_ratio * total
        plan = RankPlan(ranks=plan_ranks(options, budget), allocator=self.name)
        plan.notes = {"budget": budget, "rule": self.args.rule}
        plan.layer_fractions = plan.fractions_by_layer(units, run.geometry.layers)
        return plan

    @hookimpl
    def lowrank_allocate(self, run: RunState, units: list[Unit]) -> RankPlan:
        if self.args.needs_error_curves:
            return self._curve_plan(run, units)
        geometry = run.geometry
        importance = [unit_importance(u, run.scores, geometry) for u in units]
        sizes = [float(u.dense_params) for u in units]
        total = geometry.total_linear_params
        keep = uniform_fraction(units, total, run.target_ratio)
        layers = geometry.layers

        by_rank = self.args.rule == "ranks"
        caps = [float(u.max_rank) for u in units] if by_rank else sizes

        def plan_for(budget: float) -> RankPlan:
            kept = capped_shares(importance, caps, budget)
            if by_rank:  # shares are ranks
                ranks = {u.name: u.round(max(1, int(share)))
                         for u, share in zip(units, kept, strict=True)}
            else:  # shares are parameters
                ranks = {u.name: u.round(u.rank_for_fraction(share / u.dense_params))
                         for u, share in zip(units, kept, strict=True)}
            plan = RankPlan(ranks=ranks, allocator=self.name)
            plan.layer_fractions = plan.fractions_by_layer(units, layers)
            plan.notes = {"keep_fraction": keep, "budget": budget, "rule": self.args.rule}
            return plan

        return largest_meeting_target(plan_for, sum(caps), lambda p: achieved_ratio(p, units, total),
                                      run.target_ratio)


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(FisherScore)
    registry.add(FisherAllocator)
