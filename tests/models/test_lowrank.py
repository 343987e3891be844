import pytest
import torch
from torch import nn

from qsvd.math.decompose import joint_factors, scaled_svd, stack_weights
from qsvd.models.lowrank import install_lowrank_group

pytestmark = pytest.mark.unit


class ToyAttention(nn.Module):
    def __init__(self, e=16, d_kv=8):
        super().__init__()
        self.q_proj = nn.Linear(e, e, bias=True)
        self.k_proj = nn.Linear(e, d_kv, bias=False)
        self.v_proj = nn.Linear(e, d_kv, bias=True)

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)


def _lowrank_copy(attention, rank):
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    w = stack_weights([p.weight.detach().double() for p in projections])
    svd = scaled_svd(w, torch.ones(w.shape[1], dtype=torch.float64))
    factors = joint_factors(svd, torch.arange(rank), 0.5, [p.out_features for p in projections])
    biases = [p.bias for p in projections]
    down, ups = install_lowrank_group(
        attention,
        "qkv",
        projections,
        lambda which, module: setattr(attention, f"{which}_proj", module),
        rank=rank,
        in_features=16,
        biases=tuple(b is not None for b in biases),
        dtype=torch.float64,
    )
    with torch.no_grad():
        down.weight.copy_(factors.down)
        for up, a, b in zip(ups, factors.up, biases):
            up.weight.copy_(a)
            if b is not None:
                up.bias.copy_(b)
    return down


def test_full_rank_lowrank_attention_equals_dense_and_computes_latent_once():
    torch.manual_seed(0)
    attention = ToyAttention().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = attention(x)
    down = _lowrank_copy(attention, rank=16)
    torch.testing.assert_close(attention(x), expected)
    assert down.latent_computations == 1
    attention(x)
    assert down.latent_computations == 2  # a new forward computes a new latent
    assert down._last_latent is None  # released after the attention forward


def test_under_inference_mode_the_latent_is_computed_once_too():
    """Inference-mode tensors carry no version counter: the memo still serves q, k and v from one latent."""
    torch.manual_seed(0)
    attention = ToyAttention().double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    expected = attention(x)
    down = _lowrank_copy(attention, rank=16)
    with torch.inference_mode():
        torch.testing.assert_close(attention(x), expected)
    assert down.latent_computations == 1 and down._last_latent is None


def test_state_dict_holds_the_shared_factor_once():
    attention = ToyAttention().double()
    _lowrank_copy(attention, rank=4)
    keys = set(attention.state_dict())
    assert keys == {"q_proj.weight", "q_proj.bias", "k_proj.weight", "v_proj.weight", "v_proj.bias", "qkv_down.weight"}
    assert attention.q_proj.weight.shape == (16, 4)
    assert "rank=4" in repr(attention)


def test_in_place_change_of_input_recomputes_latent():
    attention = ToyAttention().double()
    down = _lowrank_copy(attention, rank=4)
    x = torch.randn(3, 16, dtype=torch.float64)
    first = attention.q_proj(x)
    x.mul_(2)
    torch.testing.assert_close(attention.q_proj(x) - attention.q_proj.bias, 2 * (first - attention.q_proj.bias))
    assert down.latent_computations == 2
