"""Per-layer choice of β (paper Eq. 14): how σ is split between the factors before quantization.

With B = σ^β Vᵀ T⁻¹ and A = U σ^(1-β), moving σ^Δ from A into B (B' = M B, A' = A M⁻¹,
M = Rᵀ diag(σ^Δ) R in a latent rotated by R) leaves A B unchanged in full precision but changes
how well each quantizes. β is chosen from a grid to minimise ‖Y − Y′‖² of the factorised QKV output
on calibration inputs, with weights and activations (input and latent) quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

BETA_GRID = tuple(round(0.1 * i, 1) for i in range(11))


def latent_singular_values(up: torch.Tensor, beta: float) -> torch.Tensor:
    """σ from the stacked A = U σ^(1-β) of an unrotated latent (U has orthonormal columns)."""
    if not 0 <= beta < 1:
        raise ValueError(f"σ can be read from A only for factors built with β < 1, got β = {beta}")
    return up.to(torch.float64).norm(dim=0).pow(1.0 / (1.0 - beta))


def rebalance(down: torch.Tensor, up: torch.Tensor, sigma: torch.Tensor, delta: float,
              rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B', A') = (M B, A M⁻¹), M = Rᵀ diag(σ^Δ) R (R = I when None): β → β + Δ, same product A B."""
    return _rebalanced(down.to(torch.float64), up.to(torch.float64), sigma.to(torch.float64), delta,
                       None if rotation is None else rotation.to(torch.float64))


def _rebalanced(down: torch.Tensor, up: torch.Tensor, sigma: torch.Tensor, delta: float,
                rotation: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`rebalance` on float64 factors. Rᵀ diag(s) is formed as Rᵀ·s by columns: the same numbers as the
    matmul with the diagonal matrix (one nonzero term per entry), without its n³ multiply-adds."""
    scale = sigma.pow(delta)
    if rotation is None:
        return down * scale[:, None], up / scale[None, :]
    mix, unmix = (rotation.T * scale[None, :]) @ rotation, (rotation.T * (1.0 / scale)[None, :]) @ rotation
    return mix @ down, up @ unmix


def choose_beta(
    inputs: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    sigma: torch.Tensor,
    beta: float,
    quantize_weight: Callable[[torch.Tensor], torch.Tensor],
    quantize_activation: Callable[[torch.Tensor], torch.Tensor],
    rotation: torch.Tensor | None = None,
    grid: Sequence[float] = BETA_GRID,
) -> tuple[float, dict[float, float]]:
    """(the β of `grid` with the smallest quantized output error, every β's error), for factors built with `beta`.

    `inputs` (tokens, in) are what the down-projection reads; `quantize_weight` and `quantize_activation`
    return dequantized tensors (simulated quantization). Everything runs on the device of `inputs`.
    """
    x = inputs.to(torch.float32)
    device = x.device
    reference = (x @ down.to(device=device, dtype=torch.float32).T) @ up.to(device=device, dtype=torch.float32).T
    quantized_x = quantize_activation(x)
    down64, up64 = down.to(device=device, dtype=torch.float64), up.to(device=device, dtype=torch.float64)
    sigma64 = sigma.to(device=device, dtype=torch.float64)
    rotation64 = None if rotation is None else rotation.to(device=device, dtype=torch.float64)
    errors = {}
    for candidate in grid:
        new_down, new_up = _rebalanced(down64, up64, sigma64, candidate - beta, rotation64)
        latent = quantize_activation(quantized_x @ quantize_weight(new_down.float()).T)
        output = latent @ quantize_weight(new_up.float()).T
        errors[candidate] = float(output.sub_(reference).pow_(2).sum())
    best = min(grid, key=lambda b: (errors[b], abs(b - beta)))
    return best, errors
