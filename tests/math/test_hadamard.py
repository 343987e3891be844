"""Hadamard constructions: orthogonal for every supported order, transform = explicit matrix."""

import importlib.util
import math

import pytest
import torch

from qsvd.math.hadamard import (
    hadamard_factorisation,
    hadamard_matrix,
    hadamard_transform,
    make_rotation,
    mean_preserving_rotation,
    random_orthogonal,
)

# Orders the models need: demo (64, 128, 256), SmolLM2 (576 = 36·16, 1536 = 12·128), head dims,
# SigLIP (1152 = 36·32), LLaVA (4096); and the paper's list of odd factors where constructible.
MODEL_ORDERS = [64, 128, 256, 576, 1536, 1152, 4096]
PAPER_FACTORS = [12, 20, 28, 36, 40, 60, 108, 140]


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 44, 48, 60, 68, 72, 76, 84, 108, 140, 576, 1536])
def test_every_constructed_order_is_a_hadamard_matrix(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("n", MODEL_ORDERS + PAPER_FACTORS)
def test_model_and_paper_orders_are_constructible(n):
    k, power = hadamard_factorisation(n)
    assert k * power == n and power & (power - 1) == 0


def test_orders_without_a_construction_are_reported_not_faked():
    assert hadamard_factorisation(4304) is None  # SigLIP-so400m's MLP width, 16·269
    assert hadamard_factorisation(11008) == (5504, 2)  # LLaVA-1.5-7B's MLP width: Paley I with q = 5503
    with pytest.raises(ValueError, match="make_rotation"):
        hadamard_matrix(4304)
    with pytest.raises(ValueError, match="make_rotation"):
        hadamard_transform(torch.zeros(2, 4304))


# 216 = 108·2, 272 = 68·4, 5504 (LLaVA-7B's 11008 = 5504·2): Paley I factors above BROADCAST_FACTOR_MAX, by FFT;
# 4096 = 2^12: two Sylvester matmuls (64·64)
@pytest.mark.parametrize("n", [8, 12, 36, 576, 1536, 216, 272, 5504, 4096])
def test_transform_equals_multiplication_by_the_normalised_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    expected = x @ hadamard_matrix(n) / math.sqrt(n)
    torch.testing.assert_close(hadamard_transform(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("fast_hadamard_transform") is None,
                    reason="the fast-hadamard-transform path needs CUDA and the package")
@pytest.mark.parametrize("n", [64, 576, 1536])
def test_cuda_accelerated_transform_equals_the_explicit_matrix(n):
    x = torch.randn(3, 5, n, generator=torch.Generator().manual_seed(n))
    expected = x.double() @ hadamard_matrix(n) / math.sqrt(n)
    torch.testing.assert_close(hadamard_transform(x.cuda()).cpu().double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hadamard_transform(x.double().cuda()).cpu(), expected, rtol=1e-12, atol=1e-12)


def test_transform_keeps_the_dtype_and_the_norm():
    x = torch.randn(4, 576, generator=torch.Generator().manual_seed(0))
    y = hadamard_transform(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_random_orthogonal_is_orthogonal_and_seeded():
    q = random_orthogonal(269, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(269, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(q, random_orthogonal(269, seed=3)) and q.is_contiguous()  # kron and views need it
    assert not torch.equal(q, random_orthogonal(269, seed=4))


def test_make_rotation_prefers_hadamard_and_falls_back_to_random():
    rotation = make_rotation(576, seed=0)
    assert rotation.kind == "hadamard"
    torch.testing.assert_close(rotation.matrix, hadamard_matrix(576) / 24.0, rtol=0, atol=0)
    rotation = make_rotation(1076, seed=0)  # 4·269: no construction, like SigLIP's 16·269
    assert rotation.kind == "random" and torch.equal(rotation.matrix, random_orthogonal(1076, seed=0))


def test_randomized_hadamard_is_a_signed_hadamard_that_depends_on_the_seed():
    plain = hadamard_matrix(48) / math.sqrt(48)
    rotation = make_rotation(48, seed=1, randomized=True)
    assert rotation.kind == "randomized-hadamard"
    matrix = rotation.matrix
    torch.testing.assert_close(matrix @ matrix.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-12)
    signs = matrix[:, 0] / plain[:, 0]
    assert set(signs.tolist()) == {-1.0, 1.0}  # both signs occur: D is not ±I
    torch.testing.assert_close(matrix, signs[:, None] * plain, rtol=0, atol=0)
    assert torch.equal(matrix, make_rotation(48, seed=1, randomized=True).matrix)
    assert not torch.equal(matrix, make_rotation(48, seed=2, randomized=True).matrix)


@pytest.mark.parametrize("n", [2, 32, 37, 1024])  # 31, 36 (a Hadamard), 1023: R random or randomized Hadamard
def test_mean_preserving_rotation_is_orthogonal_fixes_the_ones_vector_and_depends_on_the_seed(n):
    q = mean_preserving_rotation(n, seed=1)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    ones = torch.ones(n, dtype=torch.float64)
    torch.testing.assert_close(q @ ones, ones, rtol=0, atol=1e-12)
    assert torch.equal(q, mean_preserving_rotation(n, seed=1))
    if n > 2:  # order 2 leaves only R = ±1
        assert not torch.allclose(q, mean_preserving_rotation(n, seed=2))
        assert not torch.allclose(q, torch.eye(n, dtype=torch.float64))


def test_mean_preserving_rotation_commutes_with_an_affine_free_layer_norm():
    x = torch.randn(5, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 3.0
    q = mean_preserving_rotation(48, seed=0)
    norm = torch.nn.functional.layer_norm
    torch.testing.assert_close(norm(x @ q, (48,)), norm(x, (48,)) @ q, rtol=0, atol=1e-12)
