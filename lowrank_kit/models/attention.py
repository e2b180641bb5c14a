"""Attention whose value head dim differs from the query/key head dim (head-wise PCA of v/o).

Head-wise PCA shrinks each value head from d_h to r dims: v_proj gets G·r rows and o_proj
H·r columns, and the value cache shrinks with them. Rows and columns are stored rank-major
(row k·G + g is dim k of group g; column k·H + h is dim k of head h), so keeping the first ρ
dims of every head, as progressive decoding does, is a contiguous slice of both weights.
Stock attention modules view the values with the query/key head dim, so a compressed
attention module gets this class mixed in: same parameters and submodules (q/k norms,
sliding window, scaling), one forward that views values with their own head dim. SDPA
accepts a value dim different from the key dim.

This follows the Llama-family attention layout shared by the adapters' architectures (Llama,
Mistral, Qwen2, Gemma3): rotary embeddings from the decoder, optional q/k norms, a cache
updated per layer. What it needs of transformers' internals (the cache keyword, the rotary
and attention helpers) comes from ``hf_compat``; mixing it into a class whose forward takes the
cache under an unknown keyword is an error, never a forward that ignores its cache.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from lowrank_kit.compressed.modules import SliceableRank, one_thread_below
from lowrank_kit.models import hf_compat


class ValueDimAttention(SliceableRank):
    """Mixin placed before the original attention class; ``v_head_dim`` is set per layer.

    Its rank is the value head dim: progressive decoding keeps the first ``active_rank`` of them.
    """

    v_head_dim: int

    @property
    def full_rank(self) -> int:
        return self.v_head_dim

    def macs_per_token(self, rank: int) -> int:
        """v_proj's G·rank outputs and o_proj's H·rank inputs."""
        module: Any = self
        groups = module.v_proj.out_features // self.v_head_dim
        heads = module.o_proj.in_features // self.v_head_dim
        return rank * (module.v_proj.in_features * groups + module.o_proj.out_features * heads)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: Any = None,
                attention_mask: torch.Tensor | None = None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        module: Any = self
        cache = hf_compat.pop_cache(kwargs)  # `cache` from transformers 5.24, `past_key_values` before
        input_shape = hidden_states.shape[:-1]
        rank, active = self.v_head_dim, self.used_rank()
        query = module.q_proj(hidden_states).view(*input_shape, -1, module.head_dim).transpose(1, 2)
        key = module.k_proj(hidden_states).view(*input_shape, -1, module.head_dim).transpose(1, 2)
        v = module.v_proj
        if active == rank:
            value = v(hidden_states)
        else:  # the first `active` dims of every group: a contiguous block of rank-major rows
            rows = active * (v.out_features // rank)
            value = F.linear(hidden_states, v.weight[:rows], None if v.bias is None else v.bias[:rows])
        value = value.view(*input_shape, active, -1).transpose(-1, -2).transpose(1, 2)  # [B, G, T, active]
        if getattr(module, "q_norm", None) is not None:
            query, key = module.q_norm(query), module.k_norm(key)
        cos, sin = position_embeddings
        query, key = hf_compat.apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            if active < rank:  # the cache keeps all `rank` dims; dims past `active` are never read again
                value = F.pad(value, (0, rank - active))
            key, value = cache.update(key, value, module.layer_idx)
            value = value[..., :active]
        if _one_query_applies(module, query, attention_mask):
            output = _one_query(query, key, value, attention_mask, module.scaling)
            return self._project(output.transpose(-1, -2).reshape(*input_shape, -1), active), None
        attend = hf_compat.attention_function(module)
        # Gemma3/Qwen2 modules carry their own window (None on global layers); Mistral reads its config.
        if hasattr(module, "sliding_window"):
            window = module.sliding_window
        else:
            window = getattr(module.config, "sliding_window", None)
        # Fused attention kernels (SDPA's flash path on CPUs, flash-attention on GPUs) need the value
        # head dim to equal the query/key one, else SDPA falls back to its unfused path (5× slower at
        # 2,048 tokens on a CPU): over several queries, zero value dims are added and their (zero)
        # outputs dropped. A single decoding query reads the cache as it is (padding it would copy it).
        pad = module.head_dim - value.shape[-1] if query.shape[-2] > 1 else 0
        if pad > 0:  # a fresh contiguous tensor: F.pad would keep the transposed strides, which the kernel refuses
            padded = value.new_zeros(*value.shape[:-1], module.head_dim)
            padded[..., : value.shape[-1]] = value
            value = padded
        output, weights = attend(module, query, key, value, attention_mask, dropout=0.0, scaling=module.scaling,
                                 sliding_window=window, **kwargs)
        if pad > 0:
            output = output[..., :active]
        output = output.transpose(-1, -2).reshape(*input_shape, -1)  # [B, T, active·H], rank-major
        return self._project(output, active), weights

    def _project(self, output: torch.Tensor, active: int) -> torch.Tensor:
        """o_proj on the rank-major [.., active·H] attention output (its first columns when sliced)."""
        o: Any = self.o_proj  # type: ignore[attr-defined]
        if active == self.v_head_dim:
            return o(output)
        return F.linear(output, o.weight[:, : output.shape[-1]], o.bias)

    def spec(self) -> dict[str, Any]:
        return {"kind": "value_dim_attention", "v_head_dim": self.v_head_dim, "layout": "rank_major"}


# Below this many multiply-adds a decoding query's attention runs on one thread where OpenMP's
# threads sleep (``modules.THREADS_SLEEP``). Measured on a 2-core CPU with SmolLM2's shapes
# (benchmarks/decode_attention.py), one thread vs two, PASSIVE: batch 1 × 160 keys (0.16 M)
# 103 vs 520 µs, 32 × 160 (5 M) 1,062 vs 1,067, 8 × 2,048 (16 M) 4,206 vs 3,254; ACTIVE (where
# two threads are always used): 1 × 160 143 vs 126, 32 × 160 1,301 vs 628.
ONE_THREAD_MACS = 8_000_000


def _one_query_applies(module: Any, query: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """A single query at inference, no logit soft-cap, a mask shared by the heads (or none)."""
    return (query.shape[-2] == 1 and not module.training
            and getattr(module.config, "attn_logit_softcapping", None) is None
            and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1)))


def _one_query(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scaling: float) -> torch.Tensor:
    """Attention of a single decoding query, [B, H, 1, d] against [B, G, T, d] keys and
    [B, G, T, r] values, as [B, 1, H, r] (the layout the attention kernels return).

    SDPA has no fused kernel for a value dim different from the key dim: at one query its math
    path is 4× slower than the dense model's fused one. Here the H/G query heads of a KV group
    are one matrix against the group's keys (no copies of the cache), then softmax, then values.
    """
    b, heads, _, d = query.shape
    groups, t = key.shape[1], key.shape[-2]
    macs = b * heads * t * (d + value.shape[-1])
    with one_thread_below(macs, ONE_THREAD_MACS, query.device):
        scores = torch.matmul(query.reshape(b, groups, heads // groups, d), key.transpose(-1, -2)) * scaling
        if mask is not None:  # [B, 1, 1, ≥T]: boolean (True: attend) for SDPA, additive for eager
            mask = mask[..., :t]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype)
        output = torch.matmul(probs, value)  # [B, G, H/G, r]
    return output.reshape(b, 1, heads, -1)


@functools.cache
def _mixed(cls: type) -> type:
    hf_compat.cache_keyword(cls)  # raises where the stock forward takes its cache under an unknown name
    return type(f"ValueDim{cls.__name__}", (ValueDimAttention, cls), {})


def shrink_values(attention: nn.Module, v_proj: nn.Module, o_proj: nn.Module, v_head_dim: int) -> nn.Module:
    """Install smaller v/o projections and make the module view values with ``v_head_dim``."""
    attention.v_proj, attention.o_proj = v_proj, o_proj
    if not isinstance(attention, ValueDimAttention):
        attention.__class__ = _mixed(type(attention))
    attention.v_head_dim = v_head_dim
    return attention


def rebuild(spec: dict[str, Any], attention: nn.Module) -> nn.Module:
    """Give a freshly built dense attention module the saved value head dim (for loading)."""
    if spec.get("layout") != "rank_major":
        raise ValueError("value_dim_attention saved by an older lowrank-kit (group-major values): recompress")
    r = spec["v_head_dim"]
    v, o = attention.v_proj, attention.o_proj
    groups = v.out_features // attention.head_dim
    heads = o.in_features // attention.head_dim
    new_v = nn.Linear(v.in_features, groups * r, bias=v.bias is not None, dtype=v.weight.dtype)
    new_o = nn.Linear(heads * r, o.out_features, bias=o.bias is not None, dtype=o.weight.dtype)
    return shrink_values(attention, new_v, new_o, r)
