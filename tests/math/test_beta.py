"""Per-layer β: rebalancing keeps the product; the search picks the grid point of least quantized error."""

import pytest
import torch

from qsvd.math.beta import BETA_GRID, choose_beta, latent_singular_values, rebalance
from qsvd.math.decompose import joint_factors, scaled_svd
from qsvd.math.hadamard import random_orthogonal
from qsvd.math.quantize import WeightFormat, quantize_per_token, quantize_rtn

pytestmark = pytest.mark.unit


def _factors(beta, rank=12):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 24, dtype=torch.float64, generator=g) @ torch.diag(torch.logspace(0, -2, 24, dtype=torch.float64))
    scale = torch.linspace(0.5, 2.0, 24, dtype=torch.float64)
    svd = scaled_svd(weight, scale)
    factors = joint_factors(svd, torch.arange(rank), beta, [24, 8, 8])
    return factors.down, torch.cat(factors.up), svd.sigma[:rank]


@pytest.mark.parametrize("rotated", [False, True])
def test_rebalancing_moves_sigma_and_keeps_the_product(rotated):
    down, up, sigma = _factors(beta=0.2)
    torch.testing.assert_close(latent_singular_values(up, 0.2), sigma)
    rotation = random_orthogonal(12, seed=1) if rotated else None
    if rotated:  # the factors as H2 leaves them
        down, up = rotation.T @ down, up @ rotation
    new_down, new_up = rebalance(down, up, sigma, 0.6, rotation)
    torch.testing.assert_close(new_up @ new_down, up @ down)
    reference_down, reference_up, _ = _factors(beta=0.8)
    if rotated:
        reference_down, reference_up = rotation.T @ reference_down, reference_up @ rotation
    torch.testing.assert_close(new_down, reference_down)
    torch.testing.assert_close(new_up, reference_up)


def test_search_returns_the_smallest_error_of_the_grid_and_reads_sigma_only_below_one():
    down, up, sigma = _factors(beta=0.2)
    inputs = torch.randn(256, 24, generator=torch.Generator().manual_seed(2))
    fmt = WeightFormat(bits=3, clip_search=False)
    best, errors = choose_beta(inputs, down, up, sigma, 0.2, lambda w: quantize_rtn(w, fmt).dequantize(),
                               lambda x: quantize_per_token(x, 4))
    assert set(errors) == set(BETA_GRID) and errors[best] == min(errors.values())
    assert len({round(e, 6) for e in errors.values()}) > 1  # β matters once quantized
    exact, exact_errors = choose_beta(inputs, down, up, sigma, 0.2, lambda w: w, lambda x: x)
    assert max(exact_errors.values()) < 1e-6 * (inputs @ down.float().T @ up.float().T).pow(2).sum()
    with pytest.raises(ValueError, match="β < 1"):
        latent_singular_values(up, 1.0)


def test_rebalancing_gives_the_numbers_of_the_diagonal_matrix_formula():
    """Rᵀ·s by columns is Rᵀ @ diag(s) exactly, so M B and A M⁻¹ are bit for bit those of the written formula."""
    down, up, sigma = _factors(beta=0.2)
    rotation = random_orthogonal(12, seed=1)
    scale = sigma.pow(0.3)
    new_down, new_up = rebalance(down, up, sigma, 0.3, rotation)
    assert torch.equal(new_down, (rotation.T @ torch.diag(scale) @ rotation) @ down)
    assert torch.equal(new_up, up @ (rotation.T @ torch.diag(1.0 / scale) @ rotation))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_search_runs_on_the_device_of_the_inputs():
    down, up, sigma = _factors(beta=0.2)
    inputs = torch.randn(256, 24, generator=torch.Generator().manual_seed(2))
    fmt = WeightFormat(bits=3)
    rotation = random_orthogonal(12, seed=1)
    best, errors = choose_beta(inputs.cuda(), down, up, sigma, 0.2, lambda w: quantize_rtn(w, fmt).dequantize(),
                               lambda x: quantize_per_token(x, 4), rotation)
    assert best in BETA_GRID and errors[best] == min(errors.values())
