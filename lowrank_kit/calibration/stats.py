"""Streaming calibration statistics and the tap that attaches them to modules.

Statistics are sums updated batch by batch (raw activations of all tokens are never kept),
accumulated in float64 where they feed a decomposition (the products of a block of tokens in
float32, see ``GRAM_BLOCK``), and summed across processes before use, so data-parallel
calibration gives the single-process result (to float32 rounding of those products).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn


class Statistic:
    """A running sum over calibration tokens. Subclasses define ``update`` and their tensors."""

    def update(self, *tensors: torch.Tensor) -> None:
        raise NotImplementedError

    def sums(self) -> dict[str, torch.Tensor]:
        """The tensors that add up across data shards (all-reduced with a sum)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for key, value in self.sums().items():
            setattr(self, key, reduce(value))


# Tokens per partial product: a Gram is summed in float64, but the product of up to this many
# tokens is taken in the activations' own float32 (twice as fast on CPU matmul units, and no
# float64 copy of the activations). Its rounding is ~1e-7 of the largest entry, far below
# anything a truncation keeps; float64 activations are multiplied in float64.
GRAM_BLOCK = 2048


def _products(x: torch.Tensor, product: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Σ over blocks of ``GRAM_BLOCK`` rows of product(block), each block in float32 (float64 input:
    float64), summed in float64. Autocast is off here: a mixed-precision run's activations are
    still multiplied in float32."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    total: torch.Tensor | None = None
    with torch.autocast(x.device.type, enabled=False):
        for block in x.split(GRAM_BLOCK):
            part = product(block.to(work)).to(torch.float64)
            total = part if total is None else total.add_(part)
    assert total is not None, "a statistic's update got no tokens"
    return total


# XᵀX is symmetric, so only the blocks on and above the diagonal of a grid of SYMMETRIC_BLOCKS ×
# SYMMETRIC_BLOCKS column blocks are multiplied: 10 of 16 products' work (torch has no symmetric
# rank-k update). benchmarks/calibration_parts.py: SmolLM2's four input Grams (widths 576 and
# 1,536) over 8,192 tokens took 0.739 of the one product's time; narrower inputs keep the one product.
# The decompositions' symmetric products (W XᵀX Wᵀ, MᵀM) take the same route (``upper_product``).
SYMMETRIC_BLOCKS = 4
SYMMETRIC_MIN_WIDTH = 512


def takes_blocks(width: int, *inputs: torch.Tensor) -> bool:
    """Whether a product ``width`` wide is taken block by block: from ``SYMMETRIC_MIN_WIDTH`` on,
    and not for inputs that track gradients (blocks are written with ``out=``, which autograd refuses)."""
    return width >= SYMMETRIC_MIN_WIDTH and not any(t.requires_grad for t in inputs)


def upper_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ rightᵀ, known to be symmetric, where its upper triangle is concerned: the column
    blocks on and above the diagonal (the rest is left 0); ``mirror_`` makes it whole. Where
    ``takes_blocks`` says no, one whole product."""
    width = left.shape[0]
    if not takes_blocks(width, left, right):
        return left @ right.T
    size = -(-width // SYMMETRIC_BLOCKS)
    out = left.new_zeros(width, width)
    for start in range(0, width, size):
        torch.mm(left[start:start + size], right[start:].T, out=out[start:start + size, start:])
    return out


def _upper_gram(block: torch.Tensor) -> torch.Tensor:
    """blockᵀ block where its upper triangle is concerned (``upper_product``)."""
    return upper_product(block.T, block.T)


MIRROR_BLOCK = 1024  # rows a step of ``mirror_``: its only temporary is one diagonal block


def mirror_(matrix: torch.Tensor) -> None:
    """Make ``matrix`` the symmetric matrix its upper triangle holds, in place, a band of rows at
    a time (a Gram of a 28,672-wide input is 6.6 GB in float64: no whole-size temporary)."""
    width = matrix.shape[0]
    for start in range(0, width, MIRROR_BLOCK):
        stop = min(start + MIRROR_BLOCK, width)
        diagonal = matrix[start:stop, start:stop]
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
        matrix[stop:, start:stop].copy_(matrix[start:stop, stop:].mT)


class Gram(Statistic):
    """Σ xᵀx over tokens of a module's input (or output), float64, and the token count.

    Updates add to the upper triangle of ``sum`` only (``_upper_gram``); ``matrix`` makes ``sum``
    whole in place at its first read after an update, so every consumer reads the same tensor
    and no second copy is held. A later update adds to the upper triangle again.
    """

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64)
        self._whole = False

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1])
        gram = _products(x, _upper_gram)
        self.sum = gram if self.sum is None else self.sum + gram
        self.count = self.count.to(x.device) + x.shape[0]
        self._whole = False

    def all_reduce(self, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().all_reduce(reduce)
        self._whole = False  # a reduced sum is a new tensor; its upper triangle is right either way

    @property
    def matrix(self) -> torch.Tensor:
        if self.sum is None:
            raise RuntimeError("statistic saw no calibration data")
        if not self._whole:
            mirror_(self.sum)
            self._whole = True
        return self.sum


class GradientGram(Gram):
    """Σ gᵀg over tokens of the loss gradient g = ∂L/∂y at a module's output (fed by
    ``Tap.watch_output_grad``): the output-side Kronecker factor of the Fisher of its weight,
    which says in which output directions an error costs loss."""


class AbsMean(Statistic):
    """Σ |x|^p per input channel and the token count (ASVD's activation scale)."""

    def __init__(self, power: float = 1.0) -> None:
        self.power = power
        self.sum: torch.Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        part = x.abs().pow(self.power).sum(0)
        self.sum = part if self.sum is None else self.sum + part
        self.count = self.count.to(x.device) + x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        assert self.sum is not None, "statistic saw no calibration data"
        return self.sum / self.count


Where = Literal["input", "output", "io"]


class _Filled(Exception):
    """Raised inside a forward once every watched module has fed its statistics (``Tap.until_filled``)."""


@dataclass
class Tap:
    """Where strategies attach statistics for one calibration pass; the engine owns its life.

    Two strategies asking for the same key share one statistic, so e.g. ``svd_llm`` and
    ``asvd`` on the same module do not gather XᵀX twice.
    """

    stats: dict[str, Statistic] = field(default_factory=dict)
    backward: bool = False  # set by strategies that need gradients (e.g. Fisher)
    _handles: list[Any] = field(default_factory=list)
    _after_backward: list[Callable[[], None]] = field(default_factory=list)
    _paused: bool = False
    # Every (module, where) a statistic watches: where a forward can stop (``until_filled``), once
    # a full forward has shown that each runs once (None: not yet seen).
    _sites: list[tuple[nn.Module, Where]] = field(default_factory=list)
    _once: bool | None = None
    stopped: int = 0  # forwards ``until_filled`` cut short
    grad_params: list[nn.Parameter] = field(default_factory=list)  # the parameters whose gradients are read
    activation_grads: bool = False  # whether a statistic reads gradients of module outputs

    def watch(self, key: str, module: nn.Module, stat: Statistic, where: Where = "input") -> Statistic:
        """Feed ``stat`` from ``module``'s forward: its first input, its output, or both."""
        if key in self.stats:
            return self.stats[key]
        self.stats[key] = stat

        # An input is read before the module runs, so a forward that stops there (``until_filled``)
        # skips the module's own product.
        def before(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if not self._paused:
                stat.update(args[0])

        def after(_module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if self._paused:
                return
            out = output[0] if isinstance(output, tuple) else output
            if where == "output":
                stat.update(out)
            else:
                stat.update(args[0], out)

        self._sites.append((module, where))
        self._handles.append(module.register_forward_pre_hook(before) if where == "input"
                             else module.register_forward_hook(after))
        return stat

    @contextmanager
    def until_filled(self) -> Iterator[None]:
        """Run the forward in this block only as far as the statistics need: once every watched
        module has fed them, the rest is skipped (the block ends there, without error).

        For forwards whose outputs are not used (FLAT-LLM's statistics pass runs each layer
        dense only for its statistics, then again compressed for the next layer's inputs): a
        down_proj watched at its input then costs no product. A module that ran twice in one
        forward would lose its later calls, so the first forward of a tap runs to the end and
        counts the calls; only if every watched module ran once do later forwards stop early.
        """
        sites = {(module, where == "input") for module, where in self._sites}
        if not sites or self._once is False:
            yield
            return
        calls: dict[tuple[int, bool], int] = {}
        counting = self._once is None

        def fired(module: nn.Module, before: bool) -> None:
            if self._paused:
                return
            key = (id(module), before)
            calls[key] = calls.get(key, 0) + 1
            if not counting and len(calls) == len(sites):
                raise _Filled

        # Registered after the statistics' own hooks, so those have run when one stops the forward.
        handles = [module.register_forward_pre_hook(lambda m, _args: fired(m, True)) if before
                   else module.register_forward_hook(lambda m, _args, _out: fired(m, False))
                   for module, before in sites]
        try:
            yield
            if counting:
                self._once = len(calls) == len(sites) and all(n == 1 for n in calls.values())
        except _Filled:
            self.stopped += 1
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Forwards inside this block feed no statistic (e.g. capturing inputs with recorders)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def after_backward(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after each calibration batch's backward pass (gradients are set)."""
        self.backward = True
        self._after_backward.append(callback)

    def watch_grad(self, key: str, parameter: nn.Parameter, stat: Statistic) -> Statistic:
        """Feed ``stat`` with ``parameter.grad`` after every calibration batch's backward pass."""
        if key in self.stats:
            return self.stats[key]
        self.stats[key] = stat
        self.grad_params.append(parameter)

        def read() -> None:
            if parameter.grad is None:
                raise RuntimeError(f"statistic '{key}': the parameter got no gradient")
            stat.update(parameter.grad)

        self.after_backward(read)
        return stat

    def watch_output_grad(self, key: str, module: nn.Module, stat: Statistic) -> Statistic:
        """Feed ``stat`` with the loss gradient of ``module``'s output during each backward pass."""
        if key in self.stats:
            return self.stats[key]
        self.stats[key] = stat
        self.backward = True
        self.activation_grads = True

        def hook(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if not self._paused and out.requires_grad:
                out.register_hook(lambda grad: stat.update(grad))

        self._handles.append(module.register_forward_hook(hook))
        return stat

    @property
    def has_backward_callbacks(self) -> bool:
        """Whether something reads gradients after each backward pass (not only into statistics)."""
        return bool(self._after_backward)

    def backward_done(self) -> None:
        for callback in self._after_backward:
            callback()

    def close(self, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, Statistic]:
        """Detach every hook, sum statistics across processes, and hand them over."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._sites.clear()
        if reduce is not None:
            for stat in self.stats.values():
                stat.all_reduce(reduce)
        return self.stats


class HeadGram(Statistic):
    """Σ y_gᵀ y_g per head g of a projection's output (e.g. the value states), [G, d_h, d_h] float64."""

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim
        self.sum: torch.Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, y: torch.Tensor) -> None:
        y = y.detach().reshape(-1, y.shape[-1] // self.head_dim, self.head_dim)
        part = _products(y, lambda block: torch.einsum("ngi,ngj->gij", block, block))
        self.sum = part if self.sum is None else self.sum + part
        self.count = self.count.to(y.device) + y.shape[0]


class AngularChange(Statistic):
    """Σ over tokens of arccos(clamp(cos(x_in, x_out), 0, 1)) / π for a decoder layer (NaN → 0.5)."""

    def __init__(self) -> None:
        self.sum = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, x_in: torch.Tensor, x_out: torch.Tensor) -> None:
        a = x_in.detach().reshape(-1, x_in.shape[-1]).to(torch.float64)
        b = x_out.detach().reshape(-1, x_out.shape[-1]).to(torch.float64)
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        angle = torch.arccos(cos.clamp(0.0, 1.0)) / torch.pi
        angle = torch.nan_to_num(angle, nan=0.5)
        self.sum = self.sum.to(a.device) + angle.sum()
        self.count = self.count.to(a.device) + a.shape[0]


class SquaredGrad(Statistic):
    """Σ over calibration batches of g² per weight element (float32), and the batch count (Fisher)."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, grad: torch.Tensor) -> None:
        square = grad.detach().float().pow(2)
        self.sum = square if self.sum is None else self.sum + square
        self.count = self.count.to(grad.device) + 1


class GradEnergy(Statistic):
    """Σ over tokens of ‖∂L/∂y‖² of a module's output y, float64, with the token count and width."""

    def __init__(self) -> None:
        self.sum = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)
        self.width = 0

    def update(self, grad: torch.Tensor) -> None:
        g = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float64)
        self.width = g.shape[-1]
        self.sum = self.sum.to(g.device) + g.pow(2).sum()
        self.count = self.count.to(g.device) + g.shape[0]
