import pytest
import torch

from qsvd.math.allocate import (
    allocate_by_importance,
    allocate_uniform,
    clamp_indices,
    importance,
    top_k_indices,
)
from qsvd.math.cost import LayerShape, budget_measure, plan_cost

pytestmark = pytest.mark.unit


def test_top_k_matches_hand_computed_selection():
    scores = [torch.tensor([5.0, 1.0, 0.5]), torch.tensor([4.0, 3.0, 0.1]), torch.tensor([0.2, 2.0, 6.0])]
    # global order: 6.0 (l2,i2), 5.0 (l0,i0), 4.0 (l1,i0), 3.0 (l1,i1), 2.0 (l2,i1), 1.0 ...
    kept = top_k_indices(scores, 5)
    assert [k.tolist() for k in kept] == [[0], [0, 1], [1, 2]]


def test_top_k_breaks_ties_deterministically():
    scores = [torch.ones(3), torch.ones(3)]
    assert [k.tolist() for k in top_k_indices(scores, 4)] == [[0, 1, 2], [0]]


def test_layer_with_no_kept_values_is_clamped_to_r_min():
    scores = [torch.tensor([9.0, 8.0, 7.0]), torch.tensor([0.3, 0.1, 0.2])]
    kept = clamp_indices(top_k_indices(scores, 3), scores, r_min=2, r_max=[3, 3])
    assert [k.tolist() for k in kept] == [[0, 1, 2], [0, 2]]


def test_importance_is_float32_sigma_squared_times_mean_grad_squared():
    sigma = torch.tensor([3.0, 2.0], dtype=torch.float64)
    out = importance(sigma, torch.tensor([0.5, 4.0], dtype=torch.float64))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([4.5, 16.0]))


MHA = [LayerShape(100, 100, 100, 100)] * 4


def test_importance_allocation_respects_the_budget_and_is_maximal():
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(100, generator=g) for _ in MHA]
    measure = budget_measure(MHA, "R1")
    kept = allocate_by_importance(scores, measure, 0.6, 1, [100] * 4)
    ranks = [len(k) for k in kept]
    assert measure(ranks) <= 0.6
    # one more singular value anywhere would exceed the budget
    assert measure([ranks[0] + 1] + ranks[1:]) > 0.6
    assert sum(ranks) == 180  # 0.6 = 4r/(3E) -> r = 45 per layer on average


def test_uniform_allocation_uses_one_rank():
    scores = [torch.rand(100) for _ in MHA]
    kept = allocate_uniform(scores, budget_measure(MHA, "R2"), 0.2, 1, [100] * 4)
    assert [len(k) for k in kept] == [40] * 4
    assert kept[0].tolist() == list(range(40))


def test_budget_below_minimum_plan_is_an_error():
    scores = [torch.rand(100) for _ in MHA]
    with pytest.raises(ValueError, match="r_min"):
        allocate_by_importance(scores, budget_measure(MHA, "R1"), 0.001, 10, [100] * 4)
