import pytest

from qsvd.math.cost import LayerShape, layout_units, plan_cost

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
    assert cost.latent_cached_units == ["layer.0.qkv"]
    assert cost.kv_cache_bytes_per_token == (300 + 384) * 2
    assert cost.dense_kv_cache_bytes_per_token == 384 * 2 * 2
    assert cost.R1 == pytest.approx((300 + 400) * (576 + 960) / (2 * 576 * 960))


def test_rank_count_mismatch_is_an_error():
    with pytest.raises(ValueError, match="ranks"):
        plan_cost([LayerShape(8, 8, 8, 8)], [1, 2])


@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_baselines_as_the_paper_counts_them(fraction):
    """K and V separately at rank r, Q dense: R1 = 1/3 + 4r/(3E), R2 = r/E (method.md §2)."""
    e = 4096
    r = round(fraction * e)
    cost = plan_cost([LayerShape(e, e, e, e)] * 2, [r] * 4, layout="kv")
    assert cost.R1 == pytest.approx(1 / 3 + 4 * r / (3 * e))
    assert cost.R2 == pytest.approx(r / e)
    assert cost.latent_cached_units == ["layer.0.k", "layer.0.v", "layer.1.k", "layer.1.v"]


def test_separate_layout_counts_every_projection_and_caches_nothing_for_q():
    shape = LayerShape(576, 576, 192, 192)  # GQA: K/V cache 192 values each
    units = layout_units([shape], "separate")
    assert [u.group for u in units] == ["q", "k", "v"] and [u.max_rank for u in units] == [576, 192, 192]
    cost = plan_cost([shape], [100, 192, 50], layout="separate")
    assert cost.params == 100 * (576 + 576) + 192 * (576 + 192) + 50 * (576 + 192)
    assert cost.R2 == pytest.approx((192 + 50) / 384)
    assert cost.rank_fraction == pytest.approx(342 / 960)
    assert units[0].caches(100) == "none" and units[1].caches(192) == "kv" and units[2].caches(50) == "latent"
    assert units[1].caches(191) == "latent"  # at rank = K's size the latent saves nothing and needs the rebuild
