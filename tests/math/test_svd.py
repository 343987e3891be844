"""Thin SVD against torch.linalg.svd: tall, wide, square, rank-deficient and badly conditioned matrices."""

import pytest
import torch

from qsvd.math.svd import GRAM, GRAM_MIN_SIGMA_RATIO, SVD, thin_svd, thin_svd_with_method

pytestmark = pytest.mark.unit


def _orthonormal(rows, columns, generator):
    q, _ = torch.linalg.qr(torch.randn(rows, columns, dtype=torch.float64, generator=generator))
    return q


def _with_spectrum(rows, columns, sigma, seed=0):
    """U diag(σ) Vᵀ with random orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    k = len(sigma)
    return (_orthonormal(rows, k, g) * sigma) @ _orthonormal(columns, k, g).T


def _random(rows, columns, seed=0):
    return torch.randn(rows, columns, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _check_against_full_svd(matrix, u, sigma, v):
    m, n = matrix.shape
    k = min(m, n)
    assert u.shape == (m, k) and sigma.shape == (k,) and v.shape == (n, k)
    assert u.dtype == sigma.dtype == v.dtype == torch.float64
    assert bool((sigma[:-1] >= sigma[1:]).all())
    reference = torch.linalg.svdvals(matrix.to(torch.float64))
    resolved = reference >= 1e-6 * reference[0]
    relative = (sigma - reference).abs()[resolved] / reference[resolved]
    assert relative.max() <= 1e-8, float(relative.max())
    reconstruction = ((u * sigma) @ v.T - matrix).norm() / matrix.norm()
    assert reconstruction <= 1e-10, float(reconstruction)


SHAPES = pytest.mark.parametrize("shape", [(96, 40), (40, 96), (64, 64)], ids=["tall", "wide", "square"])


@SHAPES
def test_random_matrices_match_the_full_svd(shape):
    _check_against_full_svd(_random(*shape), *thin_svd(_random(*shape)))


@SHAPES
def test_well_conditioned_matrices_take_the_gram_path(shape):
    k = min(shape)
    matrix = _with_spectrum(*shape, torch.linspace(3.0, 0.01, k, dtype=torch.float64)) + 1e-3 * _random(*shape, seed=1)
    u, sigma, v, method = thin_svd_with_method(matrix)
    assert method == GRAM
    _check_against_full_svd(matrix, u, sigma, v)
    eye = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(u.T @ u, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(v.T @ v, eye, rtol=0, atol=1e-10)
    eigh_factor = v if shape[0] >= shape[1] else u  # orthonormal to float64 precision
    torch.testing.assert_close(eigh_factor.T @ eigh_factor, eye, rtol=0, atol=1e-13)


@pytest.mark.parametrize("shape", [(80, 30), (30, 80)], ids=["tall", "wide"])
def test_badly_conditioned_matrices_fall_back_to_the_full_svd(shape):
    sigma = torch.logspace(0, -12, min(shape), dtype=torch.float64)
    matrix = _with_spectrum(*shape, sigma)
    u, found, v, method = thin_svd_with_method(matrix)
    assert method == SVD
    _check_against_full_svd(matrix, u, found, v)
    torch.testing.assert_close(found, sigma, rtol=1e-8, atol=1e-15)  # down to 1e-12, not only 1e-6


@pytest.mark.parametrize("shape", [(70, 30), (30, 70)], ids=["tall", "wide"])
def test_rank_deficient_matrices_fall_back_to_the_full_svd(shape):
    matrix = _random(shape[0], 10) @ _random(10, shape[1], seed=1)
    u, sigma, v, method = thin_svd_with_method(matrix)
    assert method == SVD
    _check_against_full_svd(matrix, u, sigma, v)
    assert sigma[10:].max() <= 1e-12 * sigma[0]


def test_the_threshold_separates_the_two_paths():
    just_inside = torch.linspace(1.0, 1.5 * GRAM_MIN_SIGMA_RATIO, 20, dtype=torch.float64)
    just_outside = torch.linspace(1.0, 0.5 * GRAM_MIN_SIGMA_RATIO, 20, dtype=torch.float64)
    matrix = _with_spectrum(50, 20, just_inside)
    u, sigma, v, method = thin_svd_with_method(matrix)
    assert method == GRAM
    _check_against_full_svd(matrix, u, sigma, v)
    torch.testing.assert_close(u.T @ u, torch.eye(20, dtype=torch.float64), rtol=0, atol=1e-8)
    assert thin_svd_with_method(_with_spectrum(50, 20, just_outside))[3] == SVD
    assert thin_svd_with_method(torch.zeros(6, 4))[3] == SVD


def test_inputs_of_other_dtypes_give_float64_results_on_the_requested_device():
    matrix = _random(48, 20).to(torch.bfloat16)
    u, sigma, v = thin_svd(matrix, device="cpu")
    assert u.device.type == sigma.device.type == v.device.type == "cpu" and sigma.dtype == torch.float64
    _check_against_full_svd(matrix.to(torch.float64), u, sigma, v)
    with pytest.raises(ValueError, match="matrix"):
        thin_svd(torch.ones(2, 3, 4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_the_gpu_svd():
    matrix = _random(96, 40)
    u, sigma, v, method = thin_svd_with_method(matrix, device="cuda")
    assert method == SVD and u.device.type == "cuda"
    _check_against_full_svd(matrix, u.cpu(), sigma.cpu(), v.cpu())
