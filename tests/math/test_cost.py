import pytest

from qsvd.math.cost import LayerShape, plan_cost

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("fraction, r1, r2", [(0.45, 0.60, 0.225), (0.75, 1.00, 0.375)])
def test_paper_worked_values_mha(fraction, r1, r2):
    e = 4096
    shapes = [LayerShape(e, e, e, e)] * 2
    cost = plan_cost(shapes, [round(fraction * e)] * 2)
    assert cost.R1 == pytest.approx(r1, abs=1e-3)
    assert cost.R2 == pytest.approx(r2, abs=1e-3)
    assert cost.rank_fraction == pytest.approx(fraction, abs=1e-3)


def test_gqa_caches_the_cheaper_of_latent_and_kv():
    # SmolLM2-135M: E=576, 9 heads, 3 kv heads of 64 -> d_k = d_v = 192
    shape = LayerShape(576, 576, 192, 192)
    cost = plan_cost([shape, shape], [300, 400])
    assert cost.latent_cached_layers == [0]
    assert cost.kv_cache_bytes_per_token == (300 + 384) * 2
    assert cost.dense_kv_cache_bytes_per_token == 384 * 2 * 2
    assert cost.R1 == pytest.approx((300 + 400) * (576 + 960) / (2 * 576 * 960))


def test_rank_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="ranks"):
        plan_cost([LayerShape(8, 8, 8, 8)], [1, 2])
