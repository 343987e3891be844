"""The "fisher" allocation (Palu's FIB) from the importance stage's gradients: Palu's layer-level Fisher information
against a brute-force recomputation, and the plan it gives at a budget."""

import pytest
import torch

from qsvd.artefacts import read_artefact, read_json
from qsvd.math.allocate import allocate_by_fisher
from qsvd.math.cost import budget_measure
from qsvd.models.checkpoint import open_model
from qsvd.models.registry import decoder_layers, family_by_name
from qsvd.models.surgery import group_projections
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.calibration import calibration_batches
from qsvd.stages.decompose import read_decomposition, run_decompose
from qsvd.stages.importance import run_importance
from qsvd.stages.rank_plan import run_rank_plan
from tests.stages.test_pipeline_tiny import dataset  # noqa: F401  (fixture)

pytestmark = pytest.mark.unit


def _brute_force_fisher(source, family_name, data_dir, units) -> list[float]:
    """mean_jk sqrt(mean_n G_{n,jk}²) of every unit's stacked weight, from one backward per calibration sample."""
    model, processor = open_model(str(source), family_name, torch.float32, "cpu")
    family = family_by_name(family_name)
    layers = decoder_layers(model, family)
    model.requires_grad_(False)
    projections = [group_projections(layers[u.layer], family, u.group) for u in units]
    for group in projections:
        for p in group:
            p.weight.requires_grad_(True)
    squares = [[] for _ in units]
    for batch in calibration_batches(processor, family, data_dir, with_answer=True):
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()
        for i, group in enumerate(projections):
            squares[i].append(torch.cat([p.weight.grad for p in group]).to(torch.float64).pow(2))
    return [torch.stack(s).mean(0).sqrt().mean().item() for s in squares]


@pytest.mark.parametrize("layout", ["joint", "kv"])
def test_fisher_information_of_every_unit_is_palus(saved_tiny_model, dataset, tmp_path, layout):  # noqa: F811
    source, _, _ = saved_tiny_model("smolvlm", kv_heads=2)
    stats = run_activation_stats(str(source), "smolvlm", dataset, tmp_path / "stats")
    decomposition = run_decompose(str(source), "smolvlm", stats, layout, "abs_mean", 0.5, tmp_path / "svd")
    # a budget of one unit's factors per pass: several passes over the samples, the same numbers
    importance = run_importance(str(source), "smolvlm", decomposition, dataset, tmp_path / "importance",
                                factor_memory_gib=1e-9, fisher=True)
    tensors, _ = read_artefact(importance)
    units = read_decomposition(decomposition).units
    expected = _brute_force_fisher(source, "smolvlm", dataset, units)
    stored = [tensors[f"{u.name}.fisher"] for u in units]
    assert all(t.dtype == torch.float64 and t.shape == () for t in stored)
    assert [t.item() for t in stored] == pytest.approx(expected, rel=1e-5)
    assert all(t.item() > 0 for t in stored)


def test_fisher_plan_apportions_the_budget_by_the_stored_information(saved_tiny_model, dataset, tmp_path):  # noqa: F811
    source, _, _ = saved_tiny_model("llava")
    stats = run_activation_stats(str(source), "llava", dataset, tmp_path / "stats")
    decomposition = run_decompose(str(source), "llava", stats, "joint", "abs_mean", 0.5, tmp_path / "svd")
    importance = run_importance(str(source), "llava", decomposition, dataset, tmp_path / "importance", fisher=True)
    tensors, _ = read_artefact(importance)
    read = read_decomposition(decomposition)
    fisher = [tensors[f"{u.name}.fisher"].item() for u in read.units]
    for kind, budget, r_min in (("R1", 0.5, 1), ("R2", 0.2, 1), ("rank_fraction", 0.3, 6)):
        plan = read_json(run_rank_plan(decomposition, importance, "fisher", kind, budget, r_min, tmp_path / f"{kind}.json"))
        measure = budget_measure(read.shapes, kind, "joint")
        expected = allocate_by_fisher(fisher, measure, budget, r_min, [u.max_rank for u in read.units])
        assert [u["indices"] for u in plan["units"]] == [k.tolist() for k in expected]
        assert [u["fisher"] for u in plan["units"]] == fisher
        assert plan["cost"][kind] <= budget and all(u["rank"] >= r_min for u in plan["units"])
        assert all(u["indices"] == list(range(u["rank"])) for u in plan["units"])  # leading singular values
    with pytest.raises(ValueError, match="'fisher' needs the importance stage's output"):
        run_rank_plan(decomposition, None, "fisher", "R1", 0.5, 1, tmp_path / "none.json")


def test_importance_without_fisher_stores_none_and_the_fisher_plan_names_the_rebuild(saved_tiny_model, dataset, tmp_path):  # noqa: F811
    source, _, _ = saved_tiny_model("llava")
    stats = run_activation_stats(str(source), "llava", dataset, tmp_path / "stats")
    decomposition = run_decompose(str(source), "llava", stats, "joint", "abs_mean", 0.5, tmp_path / "svd")
    importance = run_importance(str(source), "llava", decomposition, dataset, tmp_path / "importance")
    tensors, manifest = read_artefact(importance)
    assert not any(name.endswith(".fisher") for name in tensors) and manifest["config"]["fisher"] is False
    with pytest.raises(ValueError, match=r"importance holds no Fisher information of layer.0.qkv: .*only with --fisher"):
        run_rank_plan(decomposition, importance, "fisher", "R1", 0.5, 1, tmp_path / "plan.json")
    run_rank_plan(decomposition, importance, "importance", "R1", 0.5, 1, tmp_path / "plan.json")  # qsvd's plan reads it
