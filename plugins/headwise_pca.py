"""Transform ``headwise_pca``: FLAT-LLM's head-wise PCA of value/output (ALGORITHMS.md §1a).

Per KV head g, the uncentred second moment C_g of the value states (v gets no RoPE) is
eigendecomposed in float64; its top-r eigenvectors Q_g (descending eigenvalue) replace the
head's value space: W_v^g ← Q_gᵀ W_v^g and, for every query head h of group g,
W_o^h ← W_o^h Q_g. Attention is linear in V, so the only error is the truncation: the value
states lose exactly the sum of the dropped eigenvalues. The value head dim (and the value
cache) shrinks from d_h to r; the same r for every head of a layer.

Queries and keys (targets ``q_proj``/``k_proj``, as the official FLAT-LLM code added later):
per query head (q) or per KV head (k, so GQA groups share one basis as they share keys), the
eigenvectors Q_h of the uncentred second moment of that head's projection output *before*
RoPE, float64. The projection becomes the per-head factors Q_h (d_h × r) and Q_hᵀ W_h (r × d)
(``HeadwiseLowRank``): the head dim stays d_h for q/k norms, RoPE and the key cache, so this
saves parameters and multiply-adds but no cache; the output error is exactly the dropped
eigenvalues. Each of q, k and v+o is its own unit, so an allocator may give them different ranks.

``output_fisher: λ`` (an option, our extension; null keeps FLAT-LLM) weights each head's output
error by that head's block R_h² of the projection's output Fisher (damped by λ, normalised;
``output_weighting``): the basis becomes the eigenvectors U of R_h C_h R_h, the head's outputs
are mapped by R_h⁻¹ U_r U_rᵀ R_h (an oblique projection: "down" U_rᵀ R_h, "up" R_h⁻¹ U_r), and
the error in that metric is exactly the dropped eigenvalues. Attention is still linear in V, so
for v+o the "down" part goes into v_proj and the "up" part into o_proj.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowrank_kit.extend import (
    ErrorCurve,
    HeadGram,
    HeadwiseLowRank,
    RecipeError,
    RunState,
    Strategy,
    StrategyRegistry,
    Tap,
    Unit,
    check_output_fisher,
    group_name,
    hookimpl,
    layer_name,
    output_fisher,
    projection_name,
    shrink_values,
    statistic_key,
    symmetric_eigh,
    watch_output_fisher,
)


@dataclass
class HeadwisePcaArgs:
    output_fisher: float | None = field(default=None, metadata={
        "help": "weight each head's output error by its block of the projection's output Fisher, damped by this "
                "much (relative to its mean eigenvalue); null: every output direction alike (FLAT-LLM). Gathered "
                "in the scoring pass (a backward per batch)"})

    def check(self, path: str) -> None:
        check_output_fisher(path, self.output_fisher)


def value_bases(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues [G, d_h] and eigenvectors [G, d_h, d_h] per head, by descending eigenvalue."""
    values, vectors = symmetric_eigh(gram.to(torch.float64))
    return values.flip(-1), vectors.flip(-1)


def weighted_bases(gram: torch.Tensor, root: torch.Tensor, inverse: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenvalues of R C R per head (descending), and the "down" R U and "up" R⁻¹ U bases
    [H, d_h, d_h]: keeping r of them maps a head's outputs y to (R⁻¹U_r)(R U_r)ᵀ y."""
    values, vectors = value_bases(root @ gram.to(torch.float64) @ root)
    return values, root @ vectors, inverse @ vectors


def project_heads(attention: nn.Module, basis: torch.Tensor, groups: int, heads: int,
                  up: torch.Tensor | None = None) -> tuple[nn.Linear, nn.Linear]:
    """New v_proj (G·r rows) and o_proj (H·r columns) for a per-group basis [G, d_h, r].

    Both are rank-major (row k·G + g, column k·H + h; see lowrank_kit.attention), so the first
    ρ dims of every head form a contiguous slice for progressive decoding. ``up``: a different
    basis for o_proj (an oblique projection, ``weighted_bases``); by default the same.
    """
    v, o = attention.v_proj, attention.o_proj
    head_dim, rank = basis.shape[1], basis.shape[2]
    dtype = v.weight.dtype
    wv = v.weight.detach().to(torch.float64).view(groups, head_dim, -1)
    new_v = nn.Linear(v.in_features, groups * rank, bias=v.bias is not None, dtype=dtype, device=v.weight.device)
    new_o = nn.Linear(heads * rank, o.out_features, bias=o.bias is not None, dtype=dtype, device=o.weight.device)
    # Query head h reads KV group h // (H/G), the layout of transformers' repeat_kv.
    per_head = (basis if up is None else up).repeat_interleave(heads // groups, dim=0)  # [H, d_h, r]
    wo = o.weight.detach().to(torch.float64).view(o.out_features, heads, head_dim)
    with torch.no_grad():
        new_v.weight.copy_(torch.einsum("gir,gid->rgd", basis, wv).reshape(rank * groups, -1))
        if v.bias is not None:
            bias = v.bias.detach().to(torch.float64).view(groups, head_dim)
            new_v.bias.copy_(torch.einsum("gir,gi->rg", basis, bias).flatten())
        new_o.weight.copy_(torch.einsum("dhi,hir->drh", wo, per_head).reshape(o.out_features, rank * heads))
        if o.bias is not None:
            new_o.bias.copy_(o.bias)
    return new_v, new_o


def project_queries(weight: torch.Tensor, bias: torch.Tensor | None, basis: torch.Tensor,
                    up: torch.Tensor | None = None) -> HeadwiseLowRank:
    """q_proj/k_proj as per-head factors from a per-head basis [H, d_h, r] (H: query or KV heads).

    Head h's output block W_h x + b_h becomes Q_h (Q_hᵀ W_h x + Q_hᵀ b_h): the head keeps its
    d_h output dims for RoPE and attention; what it loses is the part of its outputs outside Q_h.
    ``up``: a different basis for the per-head "up" factor (``weighted_bases``); by default Q_h.
    """
    heads, head_dim, rank = basis.shape
    dtype, device = weight.dtype, weight.device
    w = weight.detach().to(torch.float64).view(heads, head_dim, -1)
    module = HeadwiseLowRank(w.shape[-1], heads, head_dim, rank, bias=bias is not None, dtype=dtype, device=device)
    with torch.no_grad():
        module.a.copy_(basis if up is None else up)
        module.b.copy_(torch.einsum("hir,hid->rhd", basis, w).reshape(rank * heads, -1))
        if bias is not None:
            b = bias.detach().to(torch.float64).view(heads, head_dim)
            module.bias.copy_(torch.einsum("hir,hi->rh", basis, b).flatten())
    return module


VALUE_UNIT = "v_proj+o_proj"


class HeadwisePca(Strategy):
    name = "headwise_pca"
    point = "transform"
    description = ("FLAT-LLM head-wise PCA: value states (v_proj/o_proj and the value cache shrink per head), "
                   "optionally queries and keys (q_proj/k_proj as per-head factors).")
    Args = HeadwisePcaArgs
    allowed_targets = ("q_proj", "k_proj", "v_proj", "o_proj")
    default_targets = ("v_proj", "o_proj")

    @classmethod
    def check_targets(cls, targets: list[str], path: str) -> None:
        super().check_targets(targets, path)
        if ("v_proj" in targets) != ("o_proj" in targets):
            raise RecipeError(path, "'headwise_pca' rewrites v_proj and o_proj together: list both or neither")
        if not targets:
            raise RecipeError(path, "name at least one target, e.g. [v_proj, o_proj]")

    @staticmethod
    def _key(run: RunState, layer: int, projection: str = "v_proj") -> str:
        return statistic_key(HeadGram, run.adapter.output_site(layer, projection))

    @property  # type: ignore[override]
    def needs_dense_statistics(self) -> bool:
        return self.args.output_fisher is not None

    def _bases(self, run: RunState, layer: int, site: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Eigenvalues, "down" basis and "up" basis (None: the same) per head of ``site``'s outputs."""
        gram = run.stat(self._key(run, layer, site)).sum
        if self.args.output_fisher is None:
            values, vectors = value_bases(gram)
            return values, vectors, None
        root, inverse = output_fisher(run, layer, site, self.args.output_fisher, blocks=gram.shape[0])
        return weighted_bases(gram, root, inverse)

    def _kinds(self) -> list[str]:
        """The unit kinds this instance rewrites: "q_proj", "k_proj", "v_proj+o_proj"."""
        kinds = [p for p in ("q_proj", "k_proj") if p in self.targets]
        return kinds + ([VALUE_UNIT] if "v_proj" in self.targets else [])

    @hookimpl
    def lowrank_units(self, run: RunState) -> list[Unit]:
        g = run.geometry
        d, groups, heads = g.hidden, g.kv_heads, g.heads
        units = []
        for i in range(g.layers):
            for kind in self._kinds():
                if kind == VALUE_UNIT:
                    units.append(Unit(name=group_name(i, VALUE_UNIT), layer=i, projections=("v_proj", "o_proj"),
                                      transform=self.name, dense_params=d * (groups + heads) * g.head_dim,
                                      rank_cost=d * (groups + heads), max_rank=g.head_dim))
                else:
                    count = heads if kind == "q_proj" else groups
                    out, inp = g.dense_shape(kind)
                    units.append(Unit(name=projection_name(i, kind), layer=i, projections=(kind,),
                                      transform=self.name, dense_params=out * inp,
                                      rank_cost=count * (inp + g.head_dim), max_rank=g.head_dim, factorised=True))
        return units

    @hookimpl
    def lowrank_collect_dense(self, run: RunState, tap: Tap) -> None:
        if self.args.output_fisher is not None:
            for unit in run.units:
                if unit.transform == self.name:
                    watch_output_fisher(run, tap, unit.layer, unit.projections[0])

    @hookimpl
    def lowrank_collect_layer(self, run: RunState, tap: Tap, layer: int) -> None:
        for unit, _ in run.pending(self.name, layer):
            site = unit.projections[0]  # value states for v+o, the projection's own output for q/k
            tap.watch(self._key(run, layer, site), run.adapter.projection(layer, site),
                      HeadGram(run.geometry.head_dim), where="output")

    @hookimpl
    def lowrank_error_curves(self, run: RunState, layer: int) -> list[ErrorCurve]:
        """At rank r every head loses its eigenvalues beyond r: of the value states (v+o) or of
        q_proj's/k_proj's outputs before RoPE."""
        curves = []
        for unit in run.units_of(self.name, layer):
            site = unit.projections[0]
            values, _, _ = self._bases(run, layer, site)
            curves.append(ErrorCurve.from_tail(unit.name, site, values.clamp_min(0).sum(0).tolist()))
        return curves

    @hookimpl
    def lowrank_transform(self, run: RunState, layer: int) -> None:
        for unit, rank in run.pending(self.name, layer):
            site = unit.projections[0]
            values, vectors, up = self._bases(run, layer, site)
            up = None if up is None else up[:, :, :rank]
            if site == "v_proj":
                attention = run.adapter.attention(layer)
                new_v, new_o = project_heads(attention, vectors[:, :, :rank], run.geometry.kv_heads,
                                             run.geometry.heads, up)
                shrink_values(attention, new_v, new_o, rank)
            else:
                dense = run.adapter.projection(layer, site)
                run.adapter.replace(layer, site, project_queries(dense.weight, dense.bias, vectors[:, :, :rank], up))
            dropped = values[:, rank:].sum() / values.sum()
            notes = run.notes.setdefault(self.name, {}).setdefault(layer_name(layer), {})
            if site == "v_proj":
                notes["dropped_eigenvalue_share"] = float(dropped)
            else:
                notes[f"{site}_dropped_eigenvalue_share"] = float(dropped)


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(HeadwisePca)
