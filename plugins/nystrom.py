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
"""

from __future__ import annotations

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
    group_name,
    hookimpl,
    psd_cholesky,
    statistic_key,
    symmetric_eigh,
)


@dataclass
class NystromArgs:
    ridge: float = field(default=1.0, metadata={"help": "λ relative to trace(C)/d_int of down_proj's input Gram"})

    def check(self, path: str) -> None:
        if self.ridge <= 0:
            raise RecipeError(f"{path}.ridge", f"must be positive, got {self.ridge}")


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
        order = leverage_scores(gram, self.args.ridge).argsort(descending=True)
        factor = psd_cholesky(gram[order][:, order])
        down = run.adapter.projection(layer, "down_proj").weight.detach()
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
        keep = leverage_scores(gram, self.args.ridge).topk(k).indices.sort().values
        adapter = run.adapter
        down = adapter.projection(layer, "down_proj")
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
