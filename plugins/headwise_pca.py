"""Transform ``headwise_pca``: FLAT-LLM's head-wise PCA of value/output (ALGORITHMS.md §1a).

Per KV head g, the uncentred second moment C_g of the value states (v gets no RoPE) is
eigendecomposed in float64; its top-r eigenvectors Q_g (descending eigenvalue) replace the
head's value space: W_v^g ← Q_gᵀ W_v^g and, for every query head h of group g,
W_o^h ← W_o^h Q_g. Attention is linear in V, so the only error is the truncation: the value
states lose exactly the sum of the dropped eigenvalues. The value head dim (and the value
cache) shrinks from d_h to r; the same r for every head of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lowrank_kit.extend import (
    HeadGram,
    RunState,
    Strategy,
    StrategyRegistry,
    Tap,
    Unit,
    group_name,
    hookimpl,
    layer_name,
    shrink_values,
    statistic_key,
)


@dataclass
class HeadwisePcaArgs:
    pass


def value_bases(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues [G, d_h] and eigenvectors [G, d_h, d_h] per head, by descending eigenvalue."""
    values, vectors = torch.linalg.eigh(gram.to(torch.float64))
    return values.flip(-1), vectors.flip(-1)


def project_heads(attention: nn.Module, basis: torch.Tensor, groups: int, heads: int) -> tuple[nn.Linear, nn.Linear]:
    """New v_proj (G·r rows) and o_proj (H·r columns) for a per-group basis [G, d_h, r].

    Both are rank-major (row k·G + g, column k·H + h; see lowrank_kit.attention), so the first
    ρ dims of every head form a contiguous slice for progressive decoding.
    """
    v, o = attention.v_proj, attention.o_proj
    head_dim, rank = basis.shape[1], basis.shape[2]
    dtype = v.weight.dtype
    wv = v.weight.detach().to(torch.float64).view(groups, head_dim, -1)
    new_v = nn.Linear(v.in_features, groups * rank, bias=v.bias is not None, dtype=dtype, device=v.weight.device)
    new_o = nn.Linear(heads * rank, o.out_features, bias=o.bias is not None, dtype=dtype, device=o.weight.device)
    # Query head h reads KV group h // (H/G), the layout of transformers' repeat_kv.
    per_head = basis.repeat_interleave(heads // groups, dim=0)  # [H, d_h, r]
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


class HeadwisePca(Strategy):
    name = "headwise_pca"
    point = "transform"
    description = "FLAT-LLM head-wise PCA of value states: v_proj/o_proj and the value cache shrink per head."
    Args = HeadwisePcaArgs
    allowed_targets = ("v_proj", "o_proj")
    targets_all_or_none = True

    @staticmethod
    def _key(run: RunState, layer: int) -> str:
        return statistic_key(HeadGram, run.adapter.output_site(layer, "v_proj"))

    def _rank(self, run: RunState, layer: int) -> int | None:
        (unit,) = run.units_of(self.name, layer)
        rank = run.require_plan().rank(unit)
        return None if unit.is_dense(rank) else rank

    @hookimpl
    def lowrank_units(self, run: RunState) -> list[Unit]:
        g = run.geometry
        d, groups, heads = g.hidden, g.kv_heads, g.heads
        return [
            Unit(name=group_name(i, "v_proj+o_proj"), layer=i, projections=("v_proj", "o_proj"), transform=self.name,
                 dense_params=d * (groups + heads) * g.head_dim, rank_cost=d * (groups + heads), max_rank=g.head_dim)
            for i in range(g.layers)
        ]

    @hookimpl
    def lowrank_collect_layer(self, run: RunState, tap: Tap, layer: int) -> None:
        if self._rank(run, layer) is not None:
            tap.watch(self._key(run, layer), run.adapter.projection(layer, "v_proj"), HeadGram(run.geometry.head_dim),
                      where="output")

    @hookimpl
    def lowrank_transform(self, run: RunState, layer: int) -> None:
        rank = self._rank(run, layer)
        if rank is None:
            return
        values, vectors = value_bases(run.stat(self._key(run, layer)).sum)
        attention = run.adapter.attention(layer)
        new_v, new_o = project_heads(attention, vectors[:, :, :rank], run.geometry.kv_heads, run.geometry.heads)
        shrink_values(attention, new_v, new_o, rank)
        dropped = values[:, rank:].sum() / values.sum()
        run.notes.setdefault(self.name, {})[layer_name(layer)] = {"dropped_eigenvalue_share": float(dropped)}


@hookimpl
def lowrank_register(registry: StrategyRegistry) -> None:
    registry.add(HeadwisePca)
