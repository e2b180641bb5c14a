"""Decompositions behind the transforms, in float64 (ALGORITHMS.md §2, §4, §5)."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import torch

from lowrank_kit.calibration import stats
from lowrank_kit.calibration.stats import mirror_, takes_blocks, upper_product
from lowrank_kit.compressed import modules
from lowrank_kit.compressed.modules import one_thread_below

Pair = tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")

# eigh of a float64 n×n matrix on this 2-core CPU (torch 2.13, MKL) under OMP_WAIT_POLICY=PASSIVE,
# two threads vs one: n = 192: 18.5 vs 1.6 ms; 576: 79 vs 24 ms; 1024: 212 vs 143 ms; 1536: 466
# vs 464 ms. LAPACK's reduction runs many short parallel regions, each paying a wake-up of the
# sleeping threads; up to this size one thread is never slower. Without PASSIVE (policy unset)
# nothing changes: two threads are faster there (576: 17 vs 24 ms).
EIGH_ONE_THREAD_DIM = 1536


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` (ascending), on one thread where that is faster (``EIGH_ONE_THREAD_DIM``)."""
    with one_thread_below(matrix.shape[-1], EIGH_ONE_THREAD_DIM + 1, matrix.device):
        return torch.linalg.eigh(matrix)


def side_by_side(jobs: Sequence[Callable[[], T]], device: torch.device, largest_dim: int) -> Iterator[T]:
    """The results of independent decompositions (one layer's projections), in order, computed
    on the CPU's threads at once, one thread each, where ``symmetric_eigh`` would run each on one
    thread anyway (sleeping threads, matrices no larger than ``EIGH_ONE_THREAD_DIM``).

    There, one layer's eigendecompositions one after the other leave the other cores idle; side
    by side they use them (benchmarks/calibration_parts.py times the two). Every job runs on
    one thread, so its result does not depend on which worker ran it. Elsewhere (threads that
    spin, larger matrices, another device, one job or one thread): one after the other, as
    configured. The thread count is put back; close the iterator if you stop early."""
    threads = torch.get_num_threads()
    if (len(jobs) < 2 or threads < 2 or device.type != "cpu" or not modules.THREADS_SLEEP
            or largest_dim > EIGH_ONE_THREAD_DIM):
        yield from (job() for job in jobs)
        return

    def on_one_thread(job: Callable[[], T]) -> T:
        torch.get_num_threads()  # torch's per-thread state first, so the setting below is the last word
        torch.set_num_threads(1)
        return job()

    try:
        with ThreadPoolExecutor(min(threads, len(jobs)), thread_name_prefix="decompose") as pool:
            yield from pool.map(on_one_thread, jobs)
    finally:
        torch.set_num_threads(threads)


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Pair:
    """A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ: components stay ordered by singular value."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@dataclass
class Spectrum:
    """A rank-independent factorisation, truncated to any rank by ``factors`` (float64).

    W ≈ U_r Σ_r Vᵣᵀ M⁻¹, where M is the whitening factor S (SVD-LLM on a tall W), diag(scale)
    (ASVD) or I (plain SVD, and SVD-LLM on a wide W, whose ``vh`` already holds Vᵀ S⁻¹).
    Computing it once serves every rank: a bench shares it across ratios and across recipes
    that factorise the same weight with the same statistic.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    whitening: torch.Tensor | None = None  # lower S with S Sᵀ = XᵀX
    scale: torch.Tensor | None = None  # per input channel
    unweight: torch.Tensor | None = None  # R⁻¹ of an output weighting R (``output_weighting``)

    def factors(self, rank: int, weighted: bool = False) -> Pair:
        """A (out × r), B (r × in) with W ≈ A B; ``weighted``: A before the output weighting is
        undone (R A, whose columns are orthogonal), for errors measured in the weighted metric."""
        a, b = factors_from_svd(self.u, self.s, self.vh, rank)
        if self.whitening is not None:  # B S = Σ½Vᵀ: a triangular solve, no inverse
            b = torch.linalg.solve_triangular(self.whitening, b, upper=False, left=False)
        if self.scale is not None:
            b = b / self.scale
        if self.unweight is not None and not weighted:
            a = self.unweight @ a
        return a, b

    @property
    def nbytes(self) -> int:
        parts = (self.u, self.s, self.vh, self.whitening, self.scale, self.unweight)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _descending_eigh(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """Eigenvectors of a symmetric PSD float64 matrix by descending eigenvalue, the square roots σ
    of the eigenvalues, 1/σ (0 only for a zero matrix), and whether any eigenvalue was unresolved.

    Eigenvalues below eigh's resolution (float64 eps · λ₁, where rounding can make them 0 or
    negative) are raised to it, so no component gets σ = 0: its right factor Σ⁻¹ Uᵀ M stays
    finite and the factors at full rank multiply back to M exactly. Such a component's σ² is
    noise either way; it ranks last and is the first a truncation drops.
    """
    evals, vecs = symmetric_eigh(gram)
    evals, vecs = evals.flip(0), vecs.flip(1)
    floor = float(evals[0].detach().clamp_min(0)) * torch.finfo(evals.dtype).eps
    s = evals.clamp_min(floor).sqrt()
    return vecs, s, torch.where(s > 0, 1.0 / s, torch.zeros_like(s)), bool(evals[-1] <= floor)


def symmetric_product(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """left @ rightᵀ when it is symmetric (W XᵀX Wᵀ, M Mᵀ): from ``SYMMETRIC_MIN_WIDTH`` (512)
    columns on, only its column blocks on and above the diagonal are multiplied, and mirrored
    (``upper_product``, 10 of 16 blocks' work); equal to the whole product up to rounding.
    Narrower results, and inputs that track gradients, take the whole product."""
    if not takes_blocks(left.shape[0], left, right):
        return left @ right.T
    out = upper_product(left, right)
    mirror_(out)
    return out


def lower_triangular_product(matrix: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """matrix @ lower for a lower-triangular ``lower`` (a Cholesky factor): from
    ``SYMMETRIC_MIN_WIDTH`` columns on, the zero blocks above its diagonal are skipped (10 of 16
    blocks' work). Inputs that track gradients take the whole product."""
    width = lower.shape[1]
    if not takes_blocks(width, matrix, lower):
        return matrix @ lower
    size = -(-width // stats.SYMMETRIC_BLOCKS)
    out = matrix.new_empty(matrix.shape[0], width)
    for start in range(0, width, size):
        torch.mm(matrix[:, start:], lower[start:, start:start + size], out=out[:, start:start + size])
    return out


def thin_svd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U, σ (descending), Vᵀ of a float64 matrix, through the eigendecomposition of its smaller Gram.

    Deviation from ALGORITHMS.md's "SVD" in how it is computed, not in what: M Mᵀ = U Σ² Uᵀ
    (or Mᵀ M = V Σ² Vᵀ when M is tall) by ``eigh``, and the other factor as Σ⁻¹ Uᵀ M. On the
    shapes of SmolLM2's projections this is 1.6–3× faster than ``torch.linalg.svd`` (measured on
    random float64 matrices, 2 CPU cores). The price is resolution at the bottom of the
    spectrum: σ² is exact to about 1e-16·σ₁² (absolute), so singular values below ~1e-8·σ₁ are
    not resolved and the derived factor's columns for them are not orthonormal. Truncations
    keep and drop components far above that level, and what ``factors`` multiplies out to stays
    an exact projection of M at any rank (U_r U_rᵀ M, or M V_r V_rᵀ when M is tall).
    """
    rows, cols = m.shape
    if rows <= cols:
        return _left_spectrum(symmetric_product(m, m), m)[:3]
    vecs, s, inverse, _ = _descending_eigh(symmetric_product(m.T, m.T))
    return (m @ vecs) * inverse, s, vecs.T


def _left_spectrum(row_gram: torch.Tensor,
                   right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """U, σ and Σ⁻¹ Uᵀ ``right`` from the eigendecomposition of ``row_gram`` (M Mᵀ of the matrix
    being decomposed), and whether an eigenvalue was unresolved (``_descending_eigh``)."""
    vecs, s, inverse, unresolved = _descending_eigh(row_gram)
    return vecs, s, inverse[:, None] * (vecs.T @ right), unresolved


def svd_spectrum(weight: torch.Tensor) -> Spectrum:
    """Plain SVD of W (out×in)."""
    return Spectrum(*thin_svd(weight.to(torch.float64)))


def psd_cholesky(gram: torch.Tensor) -> torch.Tensor:
    """Lower S with S Sᵀ = XᵀX; if XᵀX is not positive definite, add (−λ_min + ε)·I first.

    ε is 1e-6 of the mean diagonal (the specification leaves ε open; this keeps the shift
    negligible next to the statistics while making the factorisation succeed).
    """
    gram = gram.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return factor
    eps = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)
    shift = -symmetric_eigh(gram)[0].min().clamp_max(0.0) + eps
    return torch.linalg.cholesky(gram + shift * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


# One whitening per input Gram: projections that read the same Gram object and need its factor
# (gate/up, whose weights are tall; see ``whitened_spectrum``) share one. Keyed by the tensor's
# identity (the entry goes when the tensor does) and checked against its version counter, so a
# Gram changed in place is factorised again. (Not a WeakKeyDictionary: it compares keys with ==,
# which a tensor answers element-wise.)
_WHITENINGS: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}
_WHITENING_LOCK = threading.Lock()  # gate/up factorised side by side (``side_by_side``) wait for one factor


def shared_whitening(gram: torch.Tensor) -> torch.Tensor:
    """``psd_cholesky(gram)``, computed once for every consumer of the same Gram tensor."""
    key = id(gram)
    with _WHITENING_LOCK:
        cached = _WHITENINGS.get(key)
        if cached is not None and cached[0]() is gram and cached[1] == gram._version:
            return cached[2]
        factor = psd_cholesky(gram)
        _WHITENINGS[key] = (weakref.ref(gram, lambda _: _WHITENINGS.pop(key, None)), gram._version, factor)
        return factor


def output_weighting(fisher: torch.Tensor, damping: float, blocks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """R = F̃^½ and R⁻¹ for the output Fisher F = Σ gᵀg of a projection (``GradientGram``).

    F̃ = (F + λ·m·I) / ((1 + λ)·m), with m = trace(F)/d_out and λ = ``damping``: damped as
    K-FAC damps its factors (the directions the few calibration gradients never visit keep a
    floor), and scaled to mean eigenvalue 1, so an error measured in the F̃ metric stays in the
    units of a plain squared output error (×d_out/trace) and a per-output sensitivity of
    ``output_gradient`` still turns it into loss; λ → ∞ gives R = I.

    ``blocks`` > 1: only the diagonal blocks of F̃ (one per head, [blocks, d, d] each), for
    transforms that work head by head; what couples two heads' errors is left out.
    """
    fisher = fisher.to(torch.float64)
    dim = fisher.shape[0]
    mean = fisher.diagonal().sum() / dim
    if not (torch.isfinite(fisher).all() and mean > 0):
        raise ValueError("the output Fisher holds no gradient energy or non-finite values (gradients overflowed? "
                         "try runtime.precision: 32-true)")
    if damping <= 0 or dim % blocks:
        raise ValueError(f"output weighting needs damping > 0 and whole blocks, got {damping} and {dim}/{blocks}")
    if blocks > 1:
        size = dim // blocks
        fisher = torch.stack([fisher[i * size:(i + 1) * size, i * size:(i + 1) * size] for i in range(blocks)])
    eye = torch.eye(fisher.shape[-1], dtype=fisher.dtype, device=fisher.device)
    values, vectors = symmetric_eigh(fisher + damping * mean * eye)
    values = values.clamp_min(float(values.max()) * 1e-12) / ((1.0 + damping) * mean)
    root = values.sqrt().unsqueeze(-2)
    return (vectors * root) @ vectors.mT, (vectors / root) @ vectors.mT


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor,
                      output: tuple[torch.Tensor, torch.Tensor] | None = None) -> Spectrum:
    """SVD-LLM: the SVD of W S, with the whitening S Sᵀ = XᵀX.

    ‖(W − A B) Xᵀ‖² = ‖(W − A B) S‖², so truncating W S loses exactly the squared dropped
    singular values in output error on the calibration inputs.

    ``output`` = (R, R⁻¹) from ``output_weighting``: the SVD of R W S instead, so truncation
    minimises ‖R (W − A B) Xᵀ‖², the output error weighted by the output Fisher (with the input
    Gram XᵀX, the two Kronecker factors of the weight's Fisher: the second-order loss increase
    K-FAC predicts), and loses exactly the dropped σ² in that metric; R⁻¹ is undone on A.

    Deviation from ALGORITHMS.md §2 in how, not what, for a W with no more rows than columns
    (on SmolLM2 q, k, v, o and down_proj; Gemma3's wider q_proj is tall): (W S)(W S)ᵀ = W XᵀX Wᵀ,
    so U and Σ come from the eigendecomposition of W XᵀX Wᵀ (the matrix ``thin_svd`` would
    decompose), and Σ_r V_rᵀ S⁻¹ = U_rᵀ W, so the right factor comes from W itself. No
    Cholesky factor and no triangular solve per rank are needed (the 1,536-wide Gram of
    down_proj's input was the costliest of both); the factors are those of the Cholesky route
    up to rounding. Where W XᵀX Wᵀ is singular (fewer calibration tokens than rows, dead
    channels), its spectrum cannot order the components the data never reached, and the
    Cholesky route with §2's shift of a singular XᵀX is taken instead, as before.
    """
    weight = weight.to(torch.float64)
    target, unweight = (weight, None) if output is None else (output[0] @ weight, output[1])
    if target.shape[0] <= target.shape[1]:
        gram = gram.to(torch.float64)
        u, s, vh, unresolved = _left_spectrum(symmetric_product(target @ gram, target), target)
        if not unresolved:
            return Spectrum(u, s, vh, unweight=unweight)
    s_factor = shared_whitening(gram)
    return Spectrum(*thin_svd(lower_triangular_product(target, s_factor)), whitening=s_factor, unweight=unweight)


def output_whitened_spectrum(weight: torch.Tensor, output_gram: torch.Tensor,
                              output: tuple[torch.Tensor, torch.Tensor] | None = None) -> Spectrum:
    """SVD-LLM's factors of a bias-free W with no more rows than columns, from the Gram of its
    outputs instead of its inputs.

    Y = X Wᵀ, so YᵀY = W XᵀX Wᵀ: the matrix ``whitened_spectrum``'s wide route decomposes,
    gathered on the narrower side (down_proj reads 1,536 channels and writes 576 on SmolLM2,
    so its Gram costs a seventh of the products). The factors are the same but for the
    rounding of Y to the forward's precision (float32 on SmolLM2's down_proj: A·B within 7.3e-6
    of its largest entry, benchmarks/calibration_parts.py); ``output`` weights them as in
    ``whitened_spectrum`` (R YᵀY Rᵀ = R W XᵀX Wᵀ Rᵀ).

    Where YᵀY is unresolved (fewer calibration tokens than rows, dead channels), §2's shift of
    XᵀX by (−λ_min + ε)·I still orders the rest, as W (XᵀX + λI) Wᵀ = YᵀY + λ W Wᵀ. Deviation
    from ``psd_cholesky``, as XᵀX itself is not gathered: ε is 1e-6 of XᵀX's mean eigenvalue
    as W weighs it, trace(YᵀY) / trace(W Wᵀ), instead of its mean diagonal, and −λ_min is what
    lifts YᵀY's most negative rounding (−λ_min(YᵀY) / λ_min(W Wᵀ)), so YᵀY + λ W Wᵀ is
    positive definite wherever W Wᵀ is, as XᵀX + λI is.
    """
    weight = weight.to(torch.float64)
    if weight.shape[0] > weight.shape[1]:
        raise ValueError(f"a weight with more rows than columns {tuple(weight.shape)} needs its input Gram")
    target, unweight = (weight, None) if output is None else (output[0] @ weight, output[1])
    row_gram = output_gram.to(torch.float64)
    if output is not None:
        row_gram = symmetric_product(output[0] @ row_gram, output[0])
    u, s, vh, unresolved = _left_spectrum(row_gram, target)
    if unresolved:
        rows = symmetric_product(target, target)
        smallest = symmetric_eigh(rows)[0][0].clamp_min(float(rows.trace()) * torch.finfo(rows.dtype).eps)
        eps = 1e-6 * (row_gram.trace() / rows.trace().clamp_min(1e-300)).clamp_min(1e-12)
        shift = (-symmetric_eigh(row_gram)[0][0]).clamp_min(0) / smallest.clamp_min(1e-300) + eps
        u, s, vh, _ = _left_spectrum(row_gram + shift * rows, target)
    return Spectrum(u, s, vh, unweight=unweight)


def scaled_spectrum(weight: torch.Tensor, scale: torch.Tensor) -> Spectrum:
    """ASVD: the SVD of W diag(s); the scaling is undone on the right factor."""
    scale = scale.to(torch.float64)
    return Spectrum(*thin_svd(weight.to(torch.float64) * scale), scale=scale)
