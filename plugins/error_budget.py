"""Allocator ``error_budget``: spend the parameter budget where predicted loss per parameter is lowest.

Every unit of every transform in the recipe reports its truncation-error curve E_u(r), the
squared output error at its error site when it keeps rank r, measured on the dense model
(``lowrank_error_curves``: dropped whitened σ² for svd_llm, dropped eigenvalues for head-wise
PCA, the Nyström residual for the MLP, the measured output error for svd/asvd). A sensitivity
s_site (``output_gradient``: squared loss gradient per output dim of that site) turns it into a
predicted loss increase s·E_u(r), comparable across layers, projections and transform kinds.
The plan minimises Σ_u s·E_u(r_u) subject to Σ_u params_u(r_u) ≤ the budget the target ratio
leaves (counted from real shapes):

1. per unit, the candidate ranks are the multiples of ``multiple`` below the dense break-even,
   plus staying dense (its error is 0 and its parameters the dense count);
2. on the lower convex hull of each unit's (parameters, predicted loss) points, the hull
   segments are bought greedily by loss reduction per parameter, best first, starting from
   rank 0 — the exact optimum of the Lagrangian relaxation, as for a fractional knapsack;
3. a segment that no longer fits leaves that unit where it is; the budget left is then filled
   one candidate step at a time, best loss reduction per parameter first.

So a unit whose error is zero at rank k never keeps more than k, and a layer whose MLP spectrum
is flat keeps its MLP and gives up attention rank instead. Cost: the error-curve pass is one
dense forward over the calibration data plus every decomposition once (the transforms redo
theirs at the planned ranks); the plan itself is a sort of all hull segments (milliseconds).
Curves are taken on the dense model's activations even under ``calibration.pipeline:
sequential``, where the transforms later see compressed predecessors: the plan predicts from the
dense model, as every allocator here does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lowrank_kit.extend import (
    RankPlan,
    RecipeError,
    RunState,
    Strategy,
    StrategyRegistry,
    Unit,
    achieved_ratio,
    candidates,
    hookimpl,
    plan_ranks,
    projection_score,
)


@dataclass
class ErrorBudgetArgs:
    multiple: int = field(default=1, metadata={"help": "ranks are multiples of this (or the unit stays dense)"})

    def check(self, path: str) -> None:
        if self.multiple < 1:
            raise RecipeError(f"{path}.multiple", f"must be at least 1, got {self.multiple}")


def loss_scale(run: RunState) -> float:
    """Turns s·E into a predicted increase of the mean calibration loss, in nats.

    The scoring pass takes g_t = ∂L_b/∂y_t of each batch's mean loss L_b (T_b tokens, n_b
    batches); with the empirical Fisher T_b Σ_t g_t g_tᵀ as the Hessian of L_b and token-wise
    gradient and error energies independent, the mean over batches of ½ δᵀHδ is s·E / (2 n_b²).
    Only ratios between units steer the plan; this constant makes the report's predictions
    comparable with measured losses (benchmarks/loss_by_layer.py).
    """
    calibration = getattr(getattr(run, "recipe", None), "calibration", None)
    if calibration is None:
        return 1.0
    batches = -(-calibration.samples // calibration.batch_size)
    return 1.0 / (2 * batches**2)


class ErrorBudget(Strategy):
    name = "error_budget"
    point = "allocate"
    description = ("Global plan over every unit of every transform: truncation-error curves × output "
                   "sensitivity, bought greedily by predicted loss per parameter.")
    Args = ErrorBudgetArgs
    consumes = "output"
    needs_error_curves = True

    @hookimpl
    def lowrank_allocate(self, run: RunState, units: list[Unit]) -> RankPlan:
        total = run.geometry.total_linear_params
        budget = sum(u.dense_params for u in units) - run.target_ratio * total
        if budget < 0:
            raise RecipeError("target.ratio", f"{run.target_ratio:g} is out of reach: the targeted modules hold "
                                              f"only {sum(u.dense_params for u in units) / total:.1%} of the weights")
        options, sensitivity = {}, {}
        for unit in units:
            curve = run.error_curves[unit.name]
            key = projection_score(unit.layer, curve.site)
            if key not in run.scores:
                raise ValueError(f"error_budget needs the output sensitivity of {key} (score: output_gradient)")
            sensitivity[unit.name] = run.scores[key]
            options[unit.name] = candidates(unit, curve.error, sensitivity[unit.name], self.args.multiple)
        ranks = plan_ranks(options, budget)
        plan = RankPlan(ranks=ranks, allocator=self.name)
        plan.layer_fractions = plan.fractions_by_layer(units, run.geometry.layers)
        scale = loss_scale(run)
        predicted = {u.name: scale * sensitivity[u.name] * run.error_curves[u.name].error[plan.rank(u)]
                     for u in units}
        plan.notes = {"multiple": self.args.multiple, "budget": budget,
                      "achieved_ratio": achieved_ratio(plan, units, total),
                      "predicted_loss": sum(predicted.values()),
                      "predicted_loss_per_unit": predicted}
        return plan


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(ErrorBudget)
