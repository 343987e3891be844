import pytest
import torch

from qsvd.math.decompose import (
    activation_scale,
    joint_factors,
    scaled_gradient_projection,
    scaled_svd,
    stack_weights,
    whitening,
)

pytestmark = pytest.mark.unit


def _weights(seed=0, e=24, dq=24, dkv=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, e, generator=g, dtype=torch.float64) for d in (dq, dkv, dkv)]


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 1.0])
def test_full_rank_factors_reproduce_w(beta):
    weights = _weights()
    w = stack_weights(weights)
    scale = activation_scale(torch.rand(24, generator=torch.Generator().manual_seed(1)) + 0.1, 0.5)
    svd = scaled_svd(w, scale)
    factors = joint_factors(svd, torch.arange(len(svd.sigma)), beta, [24, 8, 8])
    for a, w_p in zip(factors.up, weights):
        torch.testing.assert_close(a @ factors.down, w_p, rtol=1e-10, atol=1e-10)


def test_rank_r_error_equals_tail_singular_values():
    w = stack_weights(_weights())
    svd = scaled_svd(w, torch.ones(24, dtype=torch.float64))
    r = 10
    factors = joint_factors(svd, torch.arange(r), 0.3, [24, 8, 8])
    approx = torch.cat(factors.up) @ factors.down
    err = torch.linalg.matrix_norm(approx - w) ** 2
    torch.testing.assert_close(err, (svd.sigma[r:] ** 2).sum(), rtol=1e-9, atol=1e-9)


def test_any_index_set_is_kept():
    w = stack_weights(_weights())
    svd = scaled_svd(w, torch.ones(24, dtype=torch.float64))
    idx = torch.tensor([0, 3, 7])
    factors = joint_factors(svd, idx, 0.5, [24, 8, 8])
    expected = svd.u[:, idx] @ torch.diag(svd.sigma[idx]) @ svd.v[:, idx].T
    torch.testing.assert_close(torch.cat(factors.up) @ factors.down, expected)


def test_dead_channels_are_guarded():
    s = activation_scale(torch.tensor([0.0, 4.0, 1.0]), 0.5)
    assert torch.all(s > 0)
    torch.testing.assert_close(s[1:], torch.tensor([2.0, 1.0], dtype=torch.float64))


def test_out_of_range_beta_and_alpha_are_rejected():
    svd = scaled_svd(stack_weights(_weights()), torch.ones(24, dtype=torch.float64))
    with pytest.raises(ValueError, match="beta"):
        joint_factors(svd, torch.arange(3), 1.5, [24, 8, 8])
    with pytest.raises(ValueError, match="alpha"):
        activation_scale(torch.ones(3), -0.1)


def test_gradient_projection_equals_autograd_through_sigma():
    """g_i = dL/dσ_i when W = U diag(σ) Vᵀ diag(s)^-1 is parameterised by σ."""
    g = torch.Generator().manual_seed(3)
    weights = _weights(seed=2)
    w = stack_weights(weights)
    scale = activation_scale(torch.rand(24, generator=g, dtype=torch.float64) + 0.05, 0.5)
    svd = scaled_svd(w, scale)
    x = torch.randn(5, 24, generator=g, dtype=torch.float64)
    target = torch.randn(5, 40, generator=g, dtype=torch.float64)

    def loss_of(weight):
        return ((x @ weight.T - target) ** 2).sum() + (x @ weight.T).sin().sum()

    sigma = svd.sigma.clone().requires_grad_(True)
    loss_of(svd.u @ torch.diag(sigma) @ svd.v.T / scale[None, :]).backward()

    weight = w.clone().requires_grad_(True)
    loss_of(weight).backward()
    torch.testing.assert_close(scaled_gradient_projection(svd, weight.grad), sigma.grad)


def _gram(tokens=64, e=24, seed=4, rank=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, rank or e, generator=g, dtype=torch.float64)
    if rank is not None:  # activations confined to a subspace: XᵀX is singular
        x = x @ torch.randn(rank, e, generator=g, dtype=torch.float64)
    return x, x.T @ x


def test_whitening_factor_reproduces_the_gram_matrix():
    _, gram = _gram()
    s = whitening(gram, 0.0)
    torch.testing.assert_close(s @ s.T, gram)
    assert torch.equal(s, s.tril())  # the Cholesky path


def test_whitening_falls_back_to_eigh_when_not_positive_definite():
    _, gram = _gram(tokens=10, rank=5)
    s = whitening(gram, 0.0)
    assert torch.isfinite(s).all() and torch.linalg.matrix_rank(s) == 24  # invertible: B = σ^β Vᵀ S⁻¹ exists
    # equal up to the floor that lifts the 19 null directions (1e-6 of the largest eigenvalue each)
    torch.testing.assert_close(s @ s.T, gram, atol=1e-4 * float(gram.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="damping"):
        whitening(gram, -1.0)


@pytest.mark.parametrize("beta", [0.0, 0.2, 1.0])
def test_whitened_full_rank_factors_reproduce_w(beta):
    weights = _weights()
    svd = scaled_svd(stack_weights(weights), whitening(_gram()[1], 0.01))
    factors = joint_factors(svd, torch.arange(len(svd.sigma)), beta, [24, 8, 8])
    for a, w_p in zip(factors.up, weights):
        torch.testing.assert_close(a @ factors.down, w_p, rtol=1e-8, atol=1e-8)


def test_whitened_truncation_error_on_the_calibration_outputs_is_the_tail():
    """SVD-LLM: with S Sᵀ = XᵀX, ‖(W - Ŵ) Xᵀ‖² = Σ_{i>r} σ_i², the optimum over rank-r Ŵ."""
    x, gram = _gram()
    w = stack_weights(_weights())
    svd = scaled_svd(w, whitening(gram, 0.0))
    factors = joint_factors(svd, torch.arange(6), 0.2, [24, 8, 8])
    err = torch.linalg.matrix_norm((w - torch.cat(factors.up) @ factors.down) @ x.T) ** 2
    torch.testing.assert_close(err, (svd.sigma[6:] ** 2).sum(), rtol=1e-8, atol=1e-8)


def test_whitened_gradient_projection_equals_autograd_through_sigma():
    """g_i = dL/dσ_i when W = U diag(σ) Vᵀ S⁻¹ (the gradient of the whitened matrix is G S⁻ᵀ)."""
    g = torch.Generator().manual_seed(5)
    w = stack_weights(_weights(seed=6))
    s = whitening(_gram(seed=7)[1], 0.01)
    svd = scaled_svd(w, s)
    x = torch.randn(5, 24, generator=g, dtype=torch.float64)

    def loss_of(weight):
        return (x @ weight.T).tanh().sum()

    sigma = svd.sigma.clone().requires_grad_(True)
    loss_of(svd.u @ torch.diag(sigma) @ torch.linalg.solve(s.T, svd.v).T).backward()
    weight = w.clone().requires_grad_(True)
    loss_of(weight).backward()
    torch.testing.assert_close(scaled_gradient_projection(svd, weight.grad), sigma.grad)
