"""Transform ``nystrom``: FLAT-LLM's Nyström pruning of the MLP (ALGORITHMS.md §1b).

With C = Σ zᵀz over the inputs z = act(gate)·up of down_proj (float64), channels are ranked
by ridge leverage score diag(C (C + λI)⁻¹); the top k are kept: gate/up keep those rows
unchanged and W_down ← W_down C[:, idx] C[idx, idx]⁻¹ (a solve), the least-squares map from
the kept channels to the full down_proj output on the calibration data. The MLP becomes a
smaller dense MLP with intermediate size k, a real speed-up with no factorisation.

Deviation, as ALGORITHMS.md asks: the official code uses λ = 1 on the unnormalised C, whose
meaning changes with the token count. Here λ = ridge · trace(C) / d_int: ``ridge`` is relative
to the average channel energy, so the same recipe means the same thing for any calibration size.

The default ridge = 1 (λ equal to the average channel energy) was chosen by measurement
(standard bench: SmolLM2-135M, flat_llm, calibration Emma 16×512, perplexity on 8,192
Persuasion tokens): ridge 1e-3 / 1e-2 / 0.1 / 1 / 10 gave 54.91 / 54.52 / 53.84 / 52.19 / 52.59
at ratio 0.2 and 128.22 / 126.83 / 121.44 / 115.73 / 111.08 at 0.5. A larger ridge ranks
channels more by their energy than by their spread over directions; 1 is within 1% of the
best at 0.2 and 4% at 0.5 (10 is better there), so one value serves both.

``selection: greedy`` ranks channels by the output error itself (see ``greedy_order``). On the
same bench it lowered Persuasion perplexity at every ratio measured, but not always the
out-of-domain one (Python reference, 8,192 tokens): flat_llm at 0.2 52.19 → 51.14 (Python
53.86 → 53.26); svd_nystrom_budget at 0.2 / 0.3 / 0.5 45.86 → 45.02, 52.10 → 51.56, 75.16 →
73.14 (Python 36.56 → 38.06, 55.65 → 58.02, 174.59 → 162.96). It fits the calibration text
more closely. It also costs about 0.5 s more per layer in each of the error-curve and compress
passes. So leverage, the paper's rule, stays the default.

``output_fisher: λ`` (an option, our extension) measures down_proj's output error in the metric
of its output Fisher (``output_weighting``: Σ gᵀg of the loss gradients at the MLP's output,
damped by λ, mean eigenvalue 1): the greedy selection and the error curve then read R W_down in
place of W_down, so channels are kept for what the loss feels rather than for raw output energy.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lowrank_kit.extend import (
    MLP_PROJECTIONS,
    ErrorCurve,
    Gram,
    RecipeError,
    ResizedLinear,
    RunState,
    Strategy,
    StrategyRegistry,
    Tap,
    Unit,
    check_output_fisher,
    group_name,
    hookimpl,
    output_fisher,
    psd_cholesky,
    statistic_key,
    symmetric_eigh,
    watch_output_fisher,
)

SELECTIONS = ("leverage", "greedy")
# Channels the greedy selection adds per step: one block update is a few matrix products, so
# 16 at a time is ~16× cheaper than one at a time while each pick still sees the others' effect.
GREEDY_BLOCK = 16


@dataclass
class NystromArgs:
    ridge: float = field(default=1.0, metadata={"help": "λ relative to trace(C)/d_int of down_proj's input Gram "
                                                        "(leverage selection only)"})
    selection: str = field(default="leverage", metadata={
        "help": "how channels are chosen: leverage (FLAT-LLM's ridge leverage scores) or greedy (the channels "
                "that most reduce down_proj's output error on the calibration data, 16 at a time)"})
    output_fisher: float | None = field(default=None, metadata={
        "help": "weight down_proj's output error by its output Fisher, damped by this much (relative to its mean "
                "eigenvalue), in the greedy selection and the error curve; null: every output direction alike. "
                "Gathered in the scoring pass (a backward per batch)"})

    def check(self, path: str) -> None:
        if self.ridge <= 0:
            raise RecipeError(f"{path}.ridge", f"must be positive, got {self.ridge}")
        if self.selection not in SELECTIONS:
            raise RecipeError(f"{path}.selection", f"must be one of {', '.join(SELECTIONS)}, got "
                                                   f"'{self.selection}'")
        check_output_fisher(path, self.output_fisher)


def leverage_scores(gram: torch.Tensor, ridge: float) -> torch.Tensor:
    """diag(C (C + λI)⁻¹) with λ = ridge · trace(C)/n.

    C (C + λI)⁻¹ = I − λ (C + λI)⁻¹, and with C + λI = L Lᵀ the diagonal of the inverse is the
    column sums of squares of L⁻¹: a Cholesky factor and a triangular solve, several times
    cheaper than the eigendecomposition of C (it dominated flat_llm's compress time). λ ≥
    trace(C)/n keeps C + λI well conditioned; a Gram with no energy falls back to the eigen form.
    """
    gram = gram.to(torch.float64)
    n = gram.shape[0]
    lam = ridge * gram.diagonal().sum() / n
    eye = torch.eye(n, dtype=gram.dtype, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram + lam * eye)
    if float(lam) > 0 and int(info) == 0:
        inverse_factor = torch.linalg.solve_triangular(factor, eye, upper=False)
        return 1.0 - lam * inverse_factor.pow(2).sum(dim=0)
    values, vectors = symmetric_eigh(gram)
    shrink = values.clamp_min(0) / (values.clamp_min(0) + lam)
    return (vectors.pow(2) * shrink).sum(dim=1)


def greedy_order(gram: torch.Tensor, weight: torch.Tensor, block: int = GREEDY_BLOCK,
                 count: int | None = None) -> torch.Tensor:
    """The first ``count`` channels (default: all) in the order a greedy column selection adds
    them to minimise down_proj's error.

    Deviation from ALGORITHMS.md §1b (an option; leverage stays the default): the error of
    keeping a set S is trace(W R Wᵀ) with R = C − C[:, S] C[S, S]⁻¹ C[S, :], and adding channel j
    lowers it by ‖W R[:, j]‖² / R[j, j]. Each step takes the ``block`` channels with the largest
    reduction and folds them into R and W R by one block elimination. Ranking by the output
    error itself, rather than by leverage (which ignores W), is the usual greedy column subset
    selection; with ``block=1`` the first pick is the best single channel.
    """
    gram = gram.to(torch.float64)
    n = gram.shape[0]
    count = n if count is None else count
    residual = gram.clone()
    weighted = weight.to(gram.device, torch.float64) @ gram  # W R, d × n
    chosen = torch.zeros(n, dtype=torch.bool, device=gram.device)
    order: list[int] = []
    tiny = 1e-12 * float(gram.diagonal().abs().max().clamp_min(1e-300))
    while len(order) < count:
        diag = residual.diagonal()
        gain = weighted.pow(2).sum(0) / diag.clamp_min(tiny)
        gain[chosen | (diag <= tiny)] = -1.0
        take = min(block, int((gain >= 0).sum()))
        if take == 0:  # what is left has no residual energy: its order does not change the error
            rest = (~chosen).nonzero().flatten()
            order += rest[gram.diagonal()[rest].argsort(descending=True)].tolist()
            break
        picks = gain.topk(take).indices
        factor, info = torch.linalg.cholesky_ex(residual[picks][:, picks])
        pivots = factor.diagonal().pow(2)
        if int(info) != 0 or float(pivots.min()) < 1e-10 * float(pivots.max()):
            # nearly dependent picks (eliminating them together loses precision): the best alone
            picks = picks[:1]
            factor = residual[picks][:, picks].sqrt()
        rows = torch.linalg.solve_triangular(factor, residual[picks], upper=False)  # b × n
        weights = torch.linalg.solve_triangular(factor, weighted[:, picks].T, upper=False)  # b × d
        residual -= rows.T @ rows
        weighted -= weights.T @ rows
        chosen[picks] = True
        order += picks.tolist()
    return torch.tensor(order[:count], dtype=torch.long, device=gram.device)


def nystrom_down(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """W_down C[:, idx] C[idx, idx]⁻¹, solved through a Cholesky factor of C[idx, idx]."""
    gram = gram.to(torch.float64)
    rhs = weight.to(torch.float64) @ gram[:, keep]  # d × k
    factor = psd_cholesky(gram[keep][:, keep])
    return torch.cholesky_solve(rhs.T, factor).T  # C[idx, idx] is symmetric


def _rows(linear: nn.Linear, keep: torch.Tensor) -> ResizedLinear:
    new = ResizedLinear(linear.in_features, len(keep), bias=linear.bias is not None,
                        dtype=linear.weight.dtype, device=linear.weight.device)
    with torch.no_grad():
        new.weight.copy_(linear.weight[keep])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[keep])
    return new


class Nystrom(Strategy):
    name = "nystrom"
    point = "transform"
    description = "FLAT-LLM Nyström MLP pruning: keep the top ridge-leverage channels, correct down_proj."
    Args = NystromArgs
    allowed_targets = MLP_PROJECTIONS
    targets_all_or_none = True

    @staticmethod
    def _key(run: RunState, layer: int) -> str:
        return statistic_key(Gram, run.adapter.input_site(layer, "down_proj"))  # shared with svd_llm's down_proj

    def _channels(self, run: RunState, layer: int) -> int | None:
        (unit,) = run.units_of(self.name, layer)
        rank = run.require_plan().rank(unit)
        return None if unit.is_dense(rank) else max(rank, 1)

    def _order(self, gram: torch.Tensor, down: torch.Tensor, count: int | None = None) -> torch.Tensor:
        """The best ``count`` channels (default: all), best first, under the recipe's ``selection``."""
        if self.args.selection == "greedy":
            return greedy_order(gram, down, count=count)
        scores = leverage_scores(gram, self.args.ridge)
        return scores.argsort(descending=True) if count is None else scores.topk(count).indices

    @property  # type: ignore[override]
    def needs_dense_statistics(self) -> bool:
        return self.args.output_fisher is not None

    def _weighted(self, run: RunState, layer: int, down: torch.Tensor) -> torch.Tensor:
        """down_proj's weight as the error is measured: R W under an output Fisher weighting.

        The least-squares correction of the kept channels is the same in every output metric
        (each output row is fitted on its own), so only the choice of channels and the error
        curve read this; the new down_proj is always solved from W.
        """
        if self.args.output_fisher is None:
            return down
        root, _ = output_fisher(run, layer, "down_proj", self.args.output_fisher)
        return root @ down.to(root.device, torch.float64)

    @hookimpl
    def lowrank_collect_dense(self, run: RunState, tap: Tap) -> None:
        if self.args.output_fisher is None:
            return
        allocator = run.recipe.allocate
        if self.args.selection == "leverage" and not allocator.cls.needs_error_curves:
            warnings.warn(f"nystrom: output_fisher with selection: leverage changes only the error curve, which "
                          f"allocator '{allocator.plugin}' does not read; it is ignored (use selection: greedy)",
                          stacklevel=2)
            return
        for unit in run.units:
            if unit.transform == self.name:
                watch_output_fisher(run, tap, unit.layer, "down_proj")

    @hookimpl
    def lowrank_units(self, run: RunState) -> list[Unit]:
        g = run.geometry
        return [Unit(name=group_name(i, "mlp"), layer=i, projections=MLP_PROJECTIONS, transform=self.name,
                     dense_params=3 * g.hidden * g.intermediate, rank_cost=3 * g.hidden, max_rank=g.intermediate)
                for i in range(g.layers)]

    @hookimpl
    def lowrank_collect_layer(self, run: RunState, tap: Tap, layer: int) -> None:
        if self._channels(run, layer) is not None:
            tap.watch(self._key(run, layer), run.adapter.projection(layer, "down_proj"), Gram())

    @hookimpl
    def lowrank_error_curves(self, run: RunState, layer: int) -> list[ErrorCurve]:
        """down_proj's output error when keeping the top-k leverage channels, for every k at once.

        With the channels in leverage order and C = L Lᵀ its Cholesky factor in that order, the
        Nyström residual C − C[:, :k] C[:k, :k]⁻¹ C[:k, :] is L[:, k:] L[:, k:]ᵀ, so the error
        trace(W (residual) Wᵀ) is Σ_{j ≥ k} ‖W L[:, j]‖²: one factorisation gives the whole curve.
        """
        gram = run.stat(self._key(run, layer)).matrix.to(torch.float64)
        down = self._weighted(run, layer, run.adapter.projection(layer, "down_proj").weight.detach())
        order = self._order(gram, down)
        factor = psd_cholesky(gram[order][:, order])
        weight = down.to(gram.device, torch.float64)[:, order]
        dropped = (weight @ factor).pow(2).sum(0)
        (unit,) = run.units_of(self.name, layer)
        return [ErrorCurve.from_tail(unit.name, "down_proj", dropped.tolist())]

    @hookimpl
    def lowrank_transform(self, run: RunState, layer: int) -> None:
        k = self._channels(run, layer)
        if k is None:
            return
        gram = run.stat(self._key(run, layer)).matrix
        adapter = run.adapter
        down = adapter.projection(layer, "down_proj")
        weight = down.weight.detach()
        if self.args.selection == "greedy":  # leverage scores never read the weight
            weight = self._weighted(run, layer, weight)
        keep = self._order(gram, weight, count=k).sort().values
        new_down = ResizedLinear(k, down.out_features, bias=down.bias is not None, dtype=down.weight.dtype,
                                 device=down.weight.device)
        with torch.no_grad():
            new_down.weight.copy_(nystrom_down(down.weight.detach(), gram, keep.to(gram.device)))
            if down.bias is not None:
                new_down.bias.copy_(down.bias)
        keep = keep.to(down.weight.device)
        adapter.replace(layer, "gate_proj", _rows(adapter.projection(layer, "gate_proj"), keep))
        adapter.replace(layer, "up_proj", _rows(adapter.projection(layer, "up_proj"), keep))
        adapter.replace(layer, "down_proj", new_down)


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(Nystrom)
