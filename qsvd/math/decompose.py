"""Activation-aware SVD of stacked q/k/v weights and the exponent-β factorisation (method §1).

The input transform T is diagonal, T = diag(s) with s from activation statistics (ASVD style), or
SVD-LLM's whitening T = S with S Sᵀ = XᵀX. The SVD is of W·T; the shared factor carries T⁻¹.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qsvd.math.svd import thin_svd

SCALING_STATISTICS = ("abs_mean", "abs_max")
DEAD_CHANNEL_EPS = 1e-6


@dataclass(frozen=True)
class ScaledSVD:
    """W·T = U diag(σ) Vᵀ for a stacked weight W (out×in); `scale` is T: s (in,) for diag(s), or S (in, in)."""

    u: torch.Tensor  # (out, m)
    sigma: torch.Tensor  # (m,), descending
    v: torch.Tensor  # (in, m)
    scale: torch.Tensor  # (in,) or (in, in)


@dataclass(frozen=True)
class JointFactors:
    """y_p = up[p] @ (down @ x) + bias[p]: one shared down-projection, one up-projection per output."""

    down: torch.Tensor  # (r, in)
    up: list[torch.Tensor]  # (d_p, r) each
    indices: torch.Tensor  # kept singular indices (r,)


def stack_weights(weights: list[torch.Tensor]) -> torch.Tensor:
    """Stack [W_q; W_k; W_v] along the output dimension."""
    in_features = {w.shape[1] for w in weights}
    if len(in_features) != 1:
        raise ValueError(f"cannot stack weights with different input sizes {sorted(in_features)}")
    return torch.cat(list(weights), dim=0)


def activation_scale(statistic: torch.Tensor, alpha: float) -> torch.Tensor:
    """s_j = a_j^α with dead channels (a_j = 0) lifted to a small epsilon."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    stat = statistic.to(torch.float64).clamp_min(0)
    floor = DEAD_CHANNEL_EPS * max(float(stat.max()), DEAD_CHANNEL_EPS)
    return stat.clamp_min(floor).pow(alpha)


def whitening(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """S with S Sᵀ = XᵀX + λI (λ = damping · mean diagonal), float64: Cholesky, or eigh if not positive definite."""
    if damping < 0:
        raise ValueError(f"whitening damping must be >= 0, got {damping}")
    gram = gram.to(torch.float64)
    lam = damping * float(gram.diagonal().mean().clamp_min(DEAD_CHANNEL_EPS))
    damped = gram + lam * torch.eye(len(gram), dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return factor
    values, vectors = torch.linalg.eigh(damped)
    floor = DEAD_CHANNEL_EPS * max(float(values.max()), DEAD_CHANNEL_EPS)
    return vectors * values.clamp_min(floor).sqrt()[None, :]


def _right_transform(matrix: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """M·T."""
    return matrix * scale[None, :] if scale.dim() == 1 else matrix @ scale


def _right_inverse(matrix: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """M·T⁻¹."""
    return matrix / scale[None, :] if scale.dim() == 1 else torch.linalg.solve(scale.T, matrix.T).T


def _right_inverse_transpose(matrix: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """M·T⁻ᵀ (the gradient of W·T with respect to itself, from the gradient of W)."""
    return matrix / scale[None, :] if scale.dim() == 1 else torch.linalg.solve(scale, matrix.T).T


def scaled_svd(weight: torch.Tensor, scale: torch.Tensor) -> ScaledSVD:
    """Thin SVD of W·T in float64, the cheapest exact way for its shape and device (`qsvd.math.svd.thin_svd`)."""
    scale = scale.to(device=weight.device, dtype=torch.float64)
    u, sigma, v = thin_svd(_right_transform(weight.to(torch.float64), scale))
    return ScaledSVD(u=u, sigma=sigma, v=v.contiguous(), scale=scale)


def joint_factors(
    svd: ScaledSVD, indices: torch.Tensor, beta: float, output_sizes: list[int]
) -> JointFactors:
    """B = diag(σ_I^β) V_Iᵀ T⁻¹ and A_p = U_{p,I} diag(σ_I^(1-β)), split by output sizes."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if sum(output_sizes) != svd.u.shape[0]:
        raise ValueError(f"output sizes {output_sizes} do not add up to {svd.u.shape[0]} rows")
    indices = torch.as_tensor(indices, dtype=torch.long)
    sigma = svd.sigma[indices]
    down = sigma.pow(beta)[:, None] * _right_inverse(svd.v[:, indices].T, svd.scale)
    up_stacked = svd.u[:, indices] * sigma.pow(1.0 - beta)[None, :]
    return JointFactors(down=down, up=list(up_stacked.split(output_sizes, dim=0)), indices=indices)


def scaled_gradient_projection(svd: ScaledSVD, grad: torch.Tensor) -> torch.Tensor:
    """g_i = u_iᵀ (G·T⁻ᵀ) v_i = ∂loss/∂σ_i for every singular value i."""
    g_scaled = _right_inverse_transpose(grad.to(svd.u.dtype), svd.scale)
    return ((g_scaled @ svd.v) * svd.u).sum(dim=0)
