"""Compressed replacements for dense modules, and how to rebuild them from a saved description.

Each module describes itself with ``spec()`` (a plain dict saved in the config's ``lowrank``
section); ``persistence.saving`` builds an empty module of the same shape from it for loading weights.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

# OpenMP reads its wait policy at start-up. With PASSIVE (how shared machines and our benchmarks
# run), threads sleep between parallel regions and waking them costs 0.1–0.5 ms a call on this
# 2-core CPU, more than a small product takes on one thread; spinning threads (ACTIVE, or
# OpenMP's default) cost nothing to wake, and then every thread helps at every size.
THREADS_SLEEP = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


@contextlib.contextmanager
def one_thread_below(macs: int, limit: int, device: torch.device) -> Iterator[None]:
    """Run the block on one CPU thread when its ``macs`` multiply-adds are below ``limit`` and
    threads sleep (``THREADS_SLEEP``); otherwise as configured. The thread count is put back.
    Under ``torch.compile`` nothing changes: the thread calls would break the graph."""
    if torch.compiler.is_compiling():
        yield
        return
    threads = torch.get_num_threads()
    if not (THREADS_SLEEP and device.type == "cpu" and threads > 1 and macs < limit):
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def product_threads(x: torch.Tensor, macs_per_token: int) -> contextlib.AbstractContextManager[None]:
    """The thread rule of a low-rank module's products on input ``x`` (``one_thread_below``),
    except at a single token: a matrix-vector product takes as long on one thread as on two
    here, and switching the thread count around it costs ~30 µs a call (576→576 at rank 230:
    70 µs with the switch, 37 without), the time of the product itself."""
    tokens = math.prod(x.shape[:-1])
    if tokens == 1:
        return contextlib.nullcontext()
    return one_thread_below(tokens * macs_per_token, LowRankLinear.ONE_THREAD_MACS, x.device)


# A product whose output rows are not a multiple of 8 floats long runs much slower at prefill sizes
# on this CPU (its rows then start at unaligned addresses). Pruned widths and ranks rarely are, so large
# products write into rows padded to a multiple of 8 and return the view of the real columns; the
# weights stay as they are (nothing is stored or counted twice). benchmarks/aligned_outputs.py:
# a Nyström MLP of width 1,157 over 4,096 tokens took 261.0 ms plain and 200.6 ms padded (width
# 1,152: 187.4 ms), 1536→576 at rank 334 91.6 against 74.3 ms; at 8 and 32 tokens nothing to gain.
ALIGN = 8
ALIGNED_MIN_ROWS = 512


def aligned_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, written into rows padded to a multiple of ``ALIGN`` when the
    output width is not one and the product is large (float32 on a CPU, no autograd, plain tensors;
    anything else takes ``F.linear``). The result is then a view with the padded row stride: split
    its last dim or compute on it as usual, but ``.view(-1)`` across rows needs ``.reshape``."""
    n, k = weight.shape[0], x.shape[-1]
    # The exits a decode step takes come first (~200 calls a step); compiling is tested before the
    # row count, so a compiled or exported graph gets no guard on the sequence length.
    if (n % ALIGN == 0 or torch.compiler.is_compiling() or (rows := math.prod(x.shape[:-1])) < ALIGNED_MIN_ROWS
            or x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or type(weight) not in (torch.Tensor, nn.Parameter) or type(x) is not torch.Tensor
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                             or (bias is not None and bias.requires_grad)))
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    out = x.new_empty(rows, n + (-n) % ALIGN)[:, :n]
    if bias is None:
        torch.mm(x.reshape(rows, k), weight.t(), out=out)
    else:
        torch.addmm(bias, x.reshape(rows, k), weight.t(), out=out)
    return out.view(*x.shape[:-1], n)


class SliceableRank:
    """A module whose components are ordered by importance, so its first ``active_rank`` can be used alone.

    Progressive decoding sets ``active_rank`` (None: all of ``full_rank``); multiply-adds are
    counted per token at a given rank.
    """

    active_rank: int | None = None

    @property
    def full_rank(self) -> int:
        raise NotImplementedError

    def used_rank(self) -> int:
        return self.full_rank if self.active_rank is None else min(self.active_rank, self.full_rank)

    def macs_per_token(self, rank: int) -> int:
        raise NotImplementedError


class LowRankLinear(SliceableRank, nn.Module):
    """y = a (b x) + bias, a: out×r, b: r×in (ALGORITHMS.md's A and B: W ≈ A B).

    Rank components are ordered by importance (singular value), so ``active_rank`` can slice
    the first ρ of them at generation time without touching the stored factors.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.a = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.b = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> LowRankLinear:
        module = cls(b.shape[1], a.shape[0], a.shape[1], bias is not None, dtype=a.dtype, device=a.device)
        with torch.no_grad():
            module.a.copy_(a)
            module.b.copy_(b)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    # Below this many multiply-adds (both factors) the two products run on one thread where threads
    # sleep: two small multi-threaded products cost more than the dense one (see ``THREADS_SLEEP``).
    # Measured under PASSIVE, 2 threads vs 1, rank kept at 0.2: 576→576 at 8 tokens 754 vs 243 µs
    # (dense 475), at 32 tokens 781 vs 389 (dense 559); 576→1536 at 32 tokens (23 M) 1,499 vs 1,108.
    ONE_THREAD_MACS = 24_000_000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.used_rank()
        # At full rank the factors themselves, not slices: a decoding step calls this ~200 times
        # and each pair of views costs microseconds.
        a, b = (self.a, self.b) if r == self.rank else (self.a[:, :r], self.b[:r])
        with product_threads(x, self.macs_per_token(r)):
            return F.linear(aligned_linear(x, b), a, self.bias)

    @property
    def full_rank(self) -> int:
        return self.rank

    def macs_per_token(self, rank: int) -> int:
        return rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"

    def spec(self) -> dict[str, Any]:
        return {"kind": "low_rank_linear", "in_features": self.in_features,
                "out_features": self.out_features, "rank": self.rank, "bias": self.bias is not None}


class HeadwiseLowRank(SliceableRank, nn.Module):
    """Per head h: y_h = A_h (B_h x + c_h), A_h: d_h×r, B_h: r×in (head-wise PCA of q_proj/k_proj).

    Each head keeps its full head dim d_h at the output (RoPE, q/k norms and attention see the
    usual shapes) but only r dims inside. ``b``'s rows are rank-major (row k·H + h is component
    k of head h), so the first ρ components of every head are one contiguous slice for
    progressive decoding; ``a`` is [H, d_h, r] (3-D, so int8 quantisation leaves this small
    factor in floating point).
    """

    def __init__(self, in_features: int, heads: int, head_dim: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        self.in_features, self.heads, self.head_dim, self.rank = in_features, heads, head_dim, rank
        self.out_features = heads * head_dim
        self.a = nn.Parameter(torch.empty(heads, head_dim, rank, dtype=dtype, device=device))
        self.b = nn.Parameter(torch.empty(rank * heads, in_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(rank * heads, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.used_rank()
        full = r == self.rank  # the parameters themselves, not slices (see LowRankLinear.forward)
        rows = r * self.heads
        a, b = (self.a, self.b) if full else (self.a[:, :, :r], self.b[:rows])
        bias = self.bias if full or self.bias is None else self.bias[:rows]
        with product_threads(x, self.macs_per_token(r)):
            z = aligned_linear(x, b, bias)
            y = torch.einsum("...kh,hik->...hi", z.unflatten(-1, (r, self.heads)), a)
        return y.flatten(-2)

    @property
    def full_rank(self) -> int:
        return self.rank

    def macs_per_token(self, rank: int) -> int:
        return rank * self.heads * (self.in_features + self.head_dim)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, heads={self.heads}, head_dim={self.head_dim}, "
                f"rank={self.rank}, layout=rank_major")

    def spec(self) -> dict[str, Any]:
        return {"kind": "headwise_low_rank", "in_features": self.in_features, "heads": self.heads,
                "head_dim": self.head_dim, "rank": self.rank, "bias": self.bias is not None}


class ResizedLinear(nn.Linear):
    """A dense linear layer of a different shape than the config says (e.g. a Nyström-pruned MLP)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return aligned_linear(x, self.weight, self.bias)  # a pruned width is rarely a multiple of 8

    def spec(self) -> dict[str, Any]:
        return {"kind": "linear", "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None}
