"""Joint QKV SVD with activation-aware scaling, and the exponent-β factorisation (method §1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALING_STATISTICS = ("abs_mean", "abs_max")
DEAD_CHANNEL_EPS = 1e-6


@dataclass(frozen=True)
class ScaledSVD:
    """W·diag(s) = U diag(σ) Vᵀ for a stacked weight W (out×in); `scale` is s (in,)."""

    u: torch.Tensor  # (out, m)
    sigma: torch.Tensor  # (m,), descending
    v: torch.Tensor  # (in, m)
    scale: torch.Tensor  # (in,)


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


def scaled_svd(weight: torch.Tensor, scale: torch.Tensor) -> ScaledSVD:
    """Thin SVD of W·diag(s) in float64 (float64 keeps exact reconstruction cheap at these sizes)."""
    w = weight.to(torch.float64) * scale.to(torch.float64)[None, :]
    u, sigma, vh = torch.linalg.svd(w, full_matrices=False)
    return ScaledSVD(u=u, sigma=sigma, v=vh.T.contiguous(), scale=scale.to(torch.float64))


def joint_factors(
    svd: ScaledSVD, indices: torch.Tensor, beta: float, output_sizes: list[int]
) -> JointFactors:
    """B = diag(σ_I^β) V_Iᵀ diag(s)^-1 and A_p = U_{p,I} diag(σ_I^(1-β)), split by output sizes."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if sum(output_sizes) != svd.u.shape[0]:
        raise ValueError(f"output sizes {output_sizes} do not add up to {svd.u.shape[0]} rows")
    indices = torch.as_tensor(indices, dtype=torch.long)
    sigma = svd.sigma[indices]
    down = sigma.pow(beta)[:, None] * svd.v[:, indices].T / svd.scale[None, :]
    up_stacked = svd.u[:, indices] * sigma.pow(1.0 - beta)[None, :]
    return JointFactors(down=down, up=list(up_stacked.split(output_sizes, dim=0)), indices=indices)


def scaled_gradient_projection(svd: ScaledSVD, grad: torch.Tensor) -> torch.Tensor:
    """g_i = u_iᵀ (G·diag(s)^-1) v_i = ∂loss/∂σ_i for every singular value i."""
    g_scaled = grad.to(torch.float64) / svd.scale[None, :]
    return ((g_scaled @ svd.v) * svd.u).sum(dim=0)
