"""Decompositions behind the transforms, in float64 (ALGORITHMS.md §2, §4, §5)."""

from __future__ import annotations

import torch

Pair = tuple[torch.Tensor, torch.Tensor]


def factors_from_svd(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> Pair:
    """A = U_r Σ_r^½, B = Σ_r^½ V_rᵀ: components stay ordered by singular value."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def truncated_svd(weight: torch.Tensor, rank: int) -> Pair:
    """Plain truncated SVD of W (out×in): W ≈ A B."""
    u, s, vh = torch.linalg.svd(weight.to(torch.float64), full_matrices=False)
    return factors_from_svd(u, s, vh, rank)


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
    shift = -torch.linalg.eigvalsh(gram).min().clamp_max(0.0) + eps
    return torch.linalg.cholesky(gram + shift * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device))


def whitened_svd(weight: torch.Tensor, gram: torch.Tensor) -> tuple[Pair, torch.Tensor, torch.Tensor]:
    """SVD-LLM: ((U, Vᵀ), Σ, S) for the SVD of W S, with the whitening S Sᵀ = XᵀX.

    ‖(W − A B) Xᵀ‖² = ‖(W − A B) S‖², so truncating W S loses exactly the squared dropped
    singular values in output error on the calibration inputs.
    """
    s_factor = psd_cholesky(gram)
    u, s, vh = torch.linalg.svd(weight.to(torch.float64) @ s_factor, full_matrices=False)
    return (u, vh), s, s_factor


def whitened_factors(weight: torch.Tensor, gram: torch.Tensor, rank: int) -> Pair:
    """A = U_r Σ_r^½ and B = Σ_r^½ V_rᵀ S⁻¹ (a triangular solve, no inverse)."""
    (u, vh), s, s_factor = whitened_svd(weight, gram)
    a, b_white = factors_from_svd(u, s, vh, rank)
    b = torch.linalg.solve_triangular(s_factor, b_white, upper=False, left=False)  # B S = Σ½Vᵀ
    return a, b


def scaled_factors(weight: torch.Tensor, scale: torch.Tensor, rank: int) -> Pair:
    """ASVD: truncated SVD of W diag(s), the scaling undone on the right factor: B ← B diag(s)⁻¹."""
    scale = scale.to(torch.float64)
    a, b_scaled = truncated_svd(weight.to(torch.float64) * scale, rank)
    return a, b_scaled / scale
