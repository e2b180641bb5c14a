"""Decompositions behind the transforms, in float64 (ALGORITHMS.md §2, §4, §5)."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from lowrank_kit.compressed.modules import one_thread_below

Pair = tuple[torch.Tensor, torch.Tensor]

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


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Pair:
    """A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ: components stay ordered by singular value."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


@dataclass
class Spectrum:
    """A rank-independent factorisation, truncated to any rank by ``factors`` (float64).

    W ≈ U_r Σ_r Vᵣᵀ M⁻¹, where M is the whitening factor S (SVD-LLM), diag(scale) (ASVD) or I
    (plain SVD). Computing it once serves every rank: a bench shares it across ratios and
    across recipes that factorise the same weight with the same statistic.
    """

    u: torch.Tensor
    s: torch.Tensor
    vh: torch.Tensor
    whitening: torch.Tensor | None = None  # lower S with S Sᵀ = XᵀX
    scale: torch.Tensor | None = None  # per input channel

    def factors(self, rank: int) -> Pair:
        a, b = factors_from_svd(self.u, self.s, self.vh, rank)
        if self.whitening is not None:  # B S = Σ½Vᵀ: a triangular solve, no inverse
            b = torch.linalg.solve_triangular(self.whitening, b, upper=False, left=False)
        if self.scale is not None:
            b = b / self.scale
        return a, b

    @property
    def nbytes(self) -> int:
        parts = (self.u, self.s, self.vh, self.whitening, self.scale)
        return sum(t.numel() * t.element_size() for t in parts if t is not None)


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
    wide = rows <= cols
    evals, vecs = symmetric_eigh(m @ m.T if wide else m.T @ m)
    evals, vecs = evals.flip(0), vecs.flip(1)
    s = evals.clamp_min(0).sqrt()
    inverse = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    if wide:
        return vecs, s, inverse[:, None] * (vecs.T @ m)
    return (m @ vecs) * inverse, s, vecs.T


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


# One whitening per input Gram: q/k/v (and gate/up) read the same Gram object, so its factor is
# computed once. Keyed by the tensor's identity (the entry goes when the tensor does) and checked
# against its version counter, so a Gram changed in place is factorised again. (Not a
# WeakKeyDictionary: it compares keys with ==, which a tensor answers element-wise.)
_WHITENINGS: dict[int, tuple[weakref.ref[torch.Tensor], int, torch.Tensor]] = {}


def shared_whitening(gram: torch.Tensor) -> torch.Tensor:
    """``psd_cholesky(gram)``, computed once for every consumer of the same Gram tensor."""
    key = id(gram)
    cached = _WHITENINGS.get(key)
    if cached is not None and cached[0]() is gram and cached[1] == gram._version:
        return cached[2]
    factor = psd_cholesky(gram)
    _WHITENINGS[key] = (weakref.ref(gram, lambda _: _WHITENINGS.pop(key, None)), gram._version, factor)
    return factor


def whitened_spectrum(weight: torch.Tensor, gram: torch.Tensor) -> Spectrum:
    """SVD-LLM: the SVD of W S, with the whitening S Sᵀ = XᵀX.

    ‖(W − A B) Xᵀ‖² = ‖(W − A B) S‖², so truncating W S loses exactly the squared dropped
    singular values in output error on the calibration inputs.
    """
    s_factor = shared_whitening(gram)
    return Spectrum(*thin_svd(weight.to(torch.float64) @ s_factor), whitening=s_factor)


def scaled_spectrum(weight: torch.Tensor, scale: torch.Tensor) -> Spectrum:
    """ASVD: the SVD of W diag(s); the scaling is undone on the right factor."""
    scale = scale.to(torch.float64)
    return Spectrum(*thin_svd(weight.to(torch.float64) * scale), scale=scale)
