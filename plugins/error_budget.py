"""Allocator ``error_budget``: spend the parameter budget where predicted loss per parameter is lowest.

Every unit of every transform in the recipe reports its truncation-error curve E_u(r), the
squared output error at its error site when it keeps rank r, measured on the dense model
(``lowrank_error_curves``: dropped whitened σ² for svd_llm, dropped eigenvalues for head-wise
PCA, the Nyström residual for the MLP, the measured output error for svd/asvd). A sensitivity
s_site (``output_gradient``: squared loss gradient per output dim of that site) turns it into a
predicted loss increase s·E_u(r), comparable across layers, projections and transform kinds.
The plan minimises Σ_u s·E_u(r_u) subject to Σ_u params_u(r_u) ≤ the budget the target ratio
leaves (counted from real shapes):

1. per unit, the candidate ranks are the multiples of ``target.multiple`` below the dense break-even,
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

``refine: N`` corrects the sensitivities by measurement, N times: the engine compresses each
decoder layer alone at the plan (the rest dense), measures the loss increase on held-out windows
of the calibration text (``refine_windows``, overlapping no calibration window: on the windows
the transforms were fitted to the increases come out several times smaller and mostly noise),
and every sensitivity of that layer is multiplied by (measured + noise) / (predicted + noise)
before the next plan. Each round costs about one compress plus L/2 forwards of those windows.
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
    moved_argument,
    plan_ranks,
    projection_score,
)

# Measured layer losses below this many nats are noise (on SmolLM2 with 4 calibration windows
# single-layer increases of −7e-4 were seen): it damps the correction of nearly lossless layers.
LOSS_NOISE = 1e-3


@dataclass
class ErrorBudgetArgs:
    multiple: int | None = field(default=None, metadata={"help": "moved to target.multiple (one rounding for "
                                                                 "every allocator)"})
    refine: int = field(default=0, metadata={
        "help": "rounds of measured refinement: compress each decoder layer alone at the plan, measure its loss "
                "increase on held-out windows of the calibration text, rescale that layer's sensitivities by "
                "measured / predicted, plan again (each round costs about one compress)"})
    refine_windows: int = field(default=4, metadata={"help": "held-out windows (of calibration.seq_len tokens, "
                                                             "overlapping no calibration window) it measures on"})

    def check(self, path: str) -> None:
        moved_argument(self.multiple, f"{path}.multiple", "target.multiple")
        if self.refine < 0:
            raise RecipeError(f"{path}.refine", f"must be 0 or more rounds, got {self.refine}")
        if self.refine_windows < 1:
            raise RecipeError(f"{path}.refine_windows", f"must be at least 1, got {self.refine_windows}")


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

    @property  # type: ignore[override]
    def refine_rounds(self) -> int:
        return self.args.refine

    @property  # type: ignore[override]
    def refine_windows(self) -> int:
        return self.args.refine_windows

    @staticmethod
    def layer_factors(run: RunState, units: list[Unit]) -> dict[int, float]:
        """Per-layer corrections of the sensitivities, from the losses measured at the last plan.

        The sensitivity is a second-order prediction and misjudges some layers by a large factor
        (on SmolLM2 layer 0, whose query/key cuts move a saturated softmax, by 14–42×); the engine
        measures each layer's loss increase at the plan (``run.layer_losses``) and the layer's
        factor becomes (measured + noise) / (predicted + noise), times the factor it already had.
        """
        previous = run.plan
        if not run.layer_losses or previous is None or "predicted_loss_per_unit" not in previous.notes:
            return {}
        factors = dict(previous.notes.get("layer_factors", {}))
        predicted: dict[int, float] = {}
        for unit in units:
            loss = previous.notes["predicted_loss_per_unit"].get(unit.name, 0.0)
            predicted[unit.layer] = predicted.get(unit.layer, 0.0) + loss
        for layer, measured in run.layer_losses.items():
            correction = (max(measured, 0.0) + LOSS_NOISE) / (predicted.get(layer, 0.0) + LOSS_NOISE)
            factors[layer] = factors.get(layer, 1.0) * correction
        return factors

    @hookimpl
    def lowrank_allocate(self, run: RunState, units: list[Unit]) -> RankPlan:
        total = run.geometry.total_linear_params
        budget = sum(u.dense_params for u in units) - run.target_ratio * total
        if budget < 0:
            raise RecipeError("target.ratio", f"{run.target_ratio:g} is out of reach: the targeted modules hold "
                                              f"only {sum(u.dense_params for u in units) / total:.1%} of the weights")
        options, sensitivity = {}, {}
        factors = self.layer_factors(run, units)
        for unit in units:
            curve = run.error_curves[unit.name]
            key = projection_score(unit.layer, curve.site)
            if key not in run.scores:
                raise ValueError(f"error_budget needs the output sensitivity of {key} (score: output_gradient)")
            sensitivity[unit.name] = run.scores[key] * factors.get(unit.layer, 1.0)
            options[unit.name] = candidates(unit, curve.error, sensitivity[unit.name])
        ranks = plan_ranks(options, budget)
        plan = RankPlan(ranks=ranks, allocator=self.name)
        plan.layer_fractions = plan.fractions_by_layer(units, run.geometry.layers)
        scale = loss_scale(run)
        predicted = {u.name: scale * sensitivity[u.name] * run.error_curves[u.name].error[plan.rank(u)]
                     for u in units}
        plan.notes = {"budget": budget,
                      "achieved_ratio": achieved_ratio(plan, units, total),
                      "predicted_loss": sum(predicted.values()),
                      "predicted_loss_per_unit": predicted, "layer_factors": factors}
        return plan


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(ErrorBudget)
