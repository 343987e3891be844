"""Exact thin SVD, computed the cheapest way for the device and the conditioning of the matrix.

On CUDA, LAPACK-style float64 SVD (cuSOLVER) is fast and is used as is. On CPU a full SVD of a
12288×4096 joint QKV costs minutes, so the thin SVD comes from the eigendecomposition of the smaller
Gram matrix instead, when (and only when) the matrix is well enough conditioned for the Gram
matrix to keep float64 accuracy; otherwise it falls back to the full SVD.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)

GRAM = "gram"  # eigendecomposition of the smaller Gram matrix, the other factor by one matmul
SVD = "svd"  # torch.linalg.svd (LAPACK gesdd on CPU, cuSOLVER on CUDA)
GRAM_MIN_SIGMA_RATIO = 1e-3  # the Gram path only where σ_min / σ_max ≥ this (κ ≤ 1e3)
GRAM_BLOCK_COLUMNS = 512  # the Gram matrix is built one block column of its lower triangle at a time


def thin_svd(matrix: torch.Tensor, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u (m, k), σ (k,) descending, v (n, k)) with matrix = u diag(σ) vᵀ, k = min(m, n), in float64 on
    `device` (the input's device when None). See `thin_svd_with_method` for how it is computed."""
    u, sigma, v, _ = thin_svd_with_method(matrix, device)
    return u, sigma, v


def thin_svd_with_method(
    matrix: torch.Tensor, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """`thin_svd` and the method that computed it: `GRAM` or `SVD`.

    - CUDA: `SVD`, torch.linalg.svd in float64 on the GPU.
    - CPU: `GRAM` when the matrix is well conditioned, else `SVD`. The Gram path takes G = xᵀx of
      x = A (tall or square) or x = Aᵀ (wide), so G is min(m, n)²; G = W diag(λ) Wᵀ by
      torch.linalg.eigh in float64; B = x W; σ_i = ‖B_i‖ (the Rayleigh quotient, accurate to second
      order in the eigenvector error) and Y = B diag(σ)⁻¹, sorted by σ descending. Then x = Y diag(σ) Wᵀ.
      Criterion: forming G squares the condition number, so its eigenvalues carry an absolute error
      of about eps·λ_max. The Gram path is taken only if every eigenvalue λ_i ≥ GRAM_MIN_SIGMA_RATIO²·λ_max
      (σ_min/σ_max ≥ 1e-3) and all are finite; a rank-deficient matrix, a zero matrix, a negative or
      tiny eigenvalue all fail it and go to torch.linalg.svd. Under the criterion σ agrees with
      torch.linalg.svd to ~1e-12 relative (measured) and the matmul factor Y is orthonormal to ~eps·κ²
      (≤ ~1e-9 at κ = 1e3); the eigh factor W (v for tall, u for wide) is orthonormal to float64
      precision, so u diag(σ) vᵀ reconstructs A to float64 precision.
    """
    target = matrix.device if device is None else torch.device(device)
    a = matrix.detach().to(device=target, dtype=torch.float64)
    if a.dim() != 2:
        raise ValueError(f"thin_svd needs a matrix, got a tensor of shape {tuple(a.shape)}")
    if a.device.type == "cpu":
        gram = _gram_svd(a if a.shape[0] >= a.shape[1] else a.T)
        if gram is not None:
            y, sigma, w = gram
            return (y, sigma, w, GRAM) if a.shape[0] >= a.shape[1] else (w, sigma, y, GRAM)
    u, sigma, vh = torch.linalg.svd(a, full_matrices=False)
    return u, sigma, vh.T.contiguous(), SVD


def _gram_svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(Y, σ, W) with x = Y diag(σ) Wᵀ for a tall x (rows ≥ columns), or None where the criterion fails."""
    if x.shape[1] == 0:
        return None
    values, vectors = torch.linalg.eigh(_lower_gram(x), UPLO="L")
    top, bottom = float(values[-1]), float(values[0])
    if not (torch.isfinite(values).all() and top > 0 and bottom >= GRAM_MIN_SIGMA_RATIO**2 * top):
        ratio = max(bottom, 0.0) ** 0.5 / top**0.5 if top > 0 else 0.0
        logger.debug("thin SVD of %s: σ_min/σ_max ≈ %.1e < %.0e, falling back to torch.linalg.svd",
                     tuple(x.shape), ratio, GRAM_MIN_SIGMA_RATIO)
        return None
    w = vectors.flip(1)  # eigh is ascending
    y = x @ w
    sigma = torch.linalg.vector_norm(y, dim=0)
    if not bool((sigma[:-1] >= sigma[1:]).all()):
        order = torch.argsort(sigma, descending=True, stable=True)
        sigma, y, w = sigma[order], y[:, order], w[:, order].contiguous()
    return y.div_(sigma), sigma, w


def _lower_gram(x: torch.Tensor) -> torch.Tensor:
    """The lower triangle of xᵀx (the upper zero), one block column at a time: about half a full matmul."""
    n = x.shape[1]
    gram = torch.zeros(n, n, dtype=x.dtype, device=x.device)
    for start in range(0, n, GRAM_BLOCK_COLUMNS):
        stop = min(start + GRAM_BLOCK_COLUMNS, n)
        gram[start:, start:stop] = x[:, start:].T @ x[:, start:stop]
    return gram
