import pytest
import torch

from qsvd.math.allocate import (
    allocate_by_fisher,
    allocate_by_importance,
    allocate_uniform,
    clamp_indices,
    fisher_information,
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


def test_fisher_information_is_the_mean_root_mean_square_gradient():
    grads = [torch.tensor([[1.0, -2.0], [0.0, 3.0]]), torch.tensor([[-1.0, 2.0], [4.0, 0.0]])]
    # per entry sqrt(mean_n G²): [[1, 2], [sqrt(8), sqrt(4.5)]]; their mean
    expected = (1 + 2 + 8**0.5 + 4.5**0.5) / 4
    assert fisher_information(sum(g.pow(2) for g in grads), 2) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="at least one sample"):
        fisher_information(torch.zeros(2, 2), 0)


def _sainte_lague(fisher: list[float], total: int, r_max: list[int]) -> list[int]:
    """The sequential Sainte-Laguë procedure: each rank in turn to the unit of largest F / (2r + 1) not yet full."""
    ranks = [0] * len(fisher)
    for _ in range(total):
        open_units = [u for u in range(len(fisher)) if ranks[u] < r_max[u]]
        best = max(open_units, key=lambda u: (fisher[u] / (2 * ranks[u] + 1), -u))
        ranks[best] += 1
    return ranks


def _rank_fraction(r_max: list[int]):
    return lambda ranks: sum(ranks) / sum(r_max)


def test_fisher_allocation_is_proportional_to_the_fisher_information():
    r_max = [100] * 4
    kept = allocate_by_fisher([1.0, 2.0, 3.0, 4.0], _rank_fraction(r_max), 20 / 400, 1, r_max)
    assert [len(k) for k in kept] == [2, 4, 6, 8]  # T = 20 shared as 1 : 2 : 3 : 4
    assert all(k.tolist() == list(range(len(k))) for k in kept)  # the leading singular values, as a truncated SVD


def test_fisher_allocation_passes_a_full_units_excess_on_and_clamps_to_r_min():
    r_max = [5, 100, 100]
    kept = allocate_by_fisher([10.0, 1.0, 1.0], _rank_fraction(r_max), 25 / 205, 1, r_max)
    assert [len(k) for k in kept] == [5, 10, 10]  # the first unit's share (≈ 20.8) is capped at its full rank
    kept = allocate_by_fisher([1.0, 0.0], _rank_fraction([10, 10]), 0.5, 3, [10, 10])
    assert [len(k) for k in kept] == [7, 3]  # no Fisher information: r_min, the rest to the other unit


def test_fisher_allocation_equals_sainte_lague_and_is_maximal_for_every_budget_kind():
    g = torch.Generator().manual_seed(1)
    shapes = [LayerShape(64, 64, 16, 16)] * 5  # GQA: a latent above 32 costs the cache K/V, not r
    fisher = torch.rand(5, generator=g).tolist()
    r_max = [64] * 5
    for kind, budget in (("rank_fraction", 0.3), ("R1", 0.5), ("R2", 0.6)):
        measure = budget_measure(shapes, kind)
        ranks = [len(k) for k in allocate_by_fisher(fisher, measure, budget, 1, r_max)]
        assert measure(ranks) <= budget
        assert ranks == _sainte_lague(fisher, sum(ranks), r_max)
        assert measure(_sainte_lague(fisher, sum(ranks) + 1, r_max)) > budget  # one rank more would not fit


def test_fisher_allocation_refuses_bad_information_and_unreachable_budgets():
    with pytest.raises(ValueError, match="unit 1 has Fisher information nan"):
        allocate_by_fisher([1.0, float("nan")], _rank_fraction([4, 4]), 0.5, 1, [4, 4])
    with pytest.raises(ValueError, match="r_min"):
        allocate_by_fisher([1.0, 1.0], _rank_fraction([4, 4]), 0.1, 2, [4, 4])
