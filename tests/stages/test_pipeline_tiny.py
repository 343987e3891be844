"""Every stage, in order, on a tiny random model of each family (the path real models take)."""

import pytest
import torch
from safetensors.torch import load_file

from qsvd.artefacts import read_artefact, read_json
from qsvd.data.records import Record, write_records
from qsvd.methods import LAYOUTS, METHODS
from qsvd.models.checkpoint import TENSORS, load_checkpoint
from qsvd.models.prompts import encode_prompt
from qsvd.models.registry import decoder_layers, family_by_name, qkv_projections
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.decompose import read_decomposition, run_decompose
from qsvd.stages.evaluate import run_evaluate
from qsvd.stages.importance import run_importance
from qsvd.stages.lowrank_model import run_lowrank_model
from qsvd.stages.rank_plan import run_rank_plan


@pytest.fixture
def dataset(tmp_path, images):
    return write_dataset(tmp_path / "data", images)


def write_dataset(directory, images):
    """Three easy-vqa-style questions about `images` as a materialised dataset in `directory`."""
    (directory / "images").mkdir(parents=True)
    records = []
    for i, (question, answer) in enumerate([("what color is the shape?", "red"), ("is there a circle?", "yes"), ("what shape is it?", "triangle")]):
        images[i].save(directory / "images" / f"{i}.png")
        records.append(Record(id=str(i), task="easy-vqa", question=question, answer=answer, answers=[answer], image=f"images/{i}.png"))
    write_records(directory, records)
    return directory


def _saved(model, processor, directory):
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def test_every_stage_on_a_tiny_model(tiny, dataset, tmp_path, images):
    name, model, processor = tiny
    family = family_by_name(name)
    source = _saved(model, processor, tmp_path / "model")

    stats = run_activation_stats(str(source), name, dataset, tmp_path / "stats")
    tensors, manifest = read_artefact(stats)
    layers = len(decoder_layers(model, family))
    assert set(tensors) == {f"layer.{i}.{s}" for i in range(layers) for s in ("abs_mean", "abs_max")}
    assert all(entry["tokens"] > 0 for entry in manifest["layers"])

    decomposition = run_decompose(str(source), name, stats, "joint", "abs_mean", 0.5, tmp_path / "decomposition")
    assert len(read_decomposition(decomposition).svds) == layers

    importance = run_importance(str(source), name, decomposition, dataset, tmp_path / "importance")
    scores, manifest = read_artefact(importance)
    assert manifest["samples"] == 3
    assert scores["layer.0.qkv.importance"].dtype == torch.float32
    assert all(torch.isfinite(scores[f"layer.{i}.qkv.importance"]).all() for i in range(layers))

    plan_path = run_rank_plan(decomposition, importance, "importance", "R1", 0.7, 1, tmp_path / "plan.json")
    plan = read_json(plan_path)
    assert plan["cost"]["R1"] <= 0.7
    assert all(1 <= unit["rank"] <= unit["max_rank"] for unit in plan["units"])

    checkpoint = run_lowrank_model(str(source), name, decomposition, plan_path, 0.2, tmp_path / "lowrank")
    lowrank, lowrank_processor, manifest = load_checkpoint(checkpoint)
    assert [u["rank"] for u in manifest["units"]] == [u["rank"] for u in plan["units"]]
    q, k, v = qkv_projections(decoder_layers(lowrank, family)[0], family)
    assert q.down is k.down is v.down and q.weight.shape[1] == plan["units"][0]["rank"]

    result = read_json(run_evaluate(str(checkpoint), name, dataset, tmp_path / "eval.json", 3, {"method": "qsvd"}))
    assert result["num_samples"] == 3 and 0.0 <= result["score"] <= 1.0
    assert result["R1"] == pytest.approx(plan["cost"]["R1"])
    assert (tmp_path / "eval.predictions.jsonl").read_text().count("\n") == 3


@pytest.mark.parametrize("layout, transform", [("joint", "abs_max"), ("separate", "whiten"), ("kv", "abs_mean")])
def test_full_rank_lowrank_model_matches_the_original(tiny, dataset, tmp_path, images, layout, transform):
    """Keeping every singular value reproduces the original logits (float32 tolerance), for every layout."""
    name, model, processor = tiny
    family = family_by_name(name)
    source = _saved(model, processor, tmp_path / "model")
    stats = run_activation_stats(str(source), name, dataset, tmp_path / "stats", gram=transform == "whiten")
    decomposition = run_decompose(str(source), name, stats, layout, transform, 0.5, tmp_path / "decomposition", damping=0.01)
    plan_path = run_rank_plan(decomposition, None, "uniform", "rank_fraction", 1.0, 1, tmp_path / "plan.json")
    checkpoint = run_lowrank_model(str(source), name, decomposition, plan_path, 0.5, tmp_path / "lowrank")
    lowrank, _, _ = load_checkpoint(checkpoint)
    batch = encode_prompt(processor, family, "what color is the shape?", images[0] if family.multimodal else None)
    with torch.no_grad():
        torch.testing.assert_close(lowrank(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_through_the_stages(method, saved_tiny_model, dataset, tmp_path):
    """Each method's decomposition, allocation and factors on a GQA model; the plan's cost is the method's own."""
    spec = METHODS[method]
    source, model, processor = saved_tiny_model("smolvlm", kv_heads=2)
    family = family_by_name("smolvlm")
    whiten = spec.transform == "whiten"
    stats = run_activation_stats(str(source), "smolvlm", dataset, tmp_path / "stats", gram=whiten)
    transform = "whiten" if whiten else "abs_mean"
    decomposition = run_decompose(str(source), "smolvlm", stats, spec.layout, transform, 0.5, tmp_path / "svd")
    importance = None
    if spec.reads_importance:
        importance = run_importance(str(source), "smolvlm", decomposition, dataset, tmp_path / "importance",
                                    fisher=spec.allocation == "fisher")
    # Q dense costs 1/3 of R1 (plus what GQA's smaller K/V leave): 0.7 fits every method.
    plan_path = run_rank_plan(decomposition, importance, spec.allocation, "R1", 0.7, 1, tmp_path / "plan.json")
    plan = read_json(plan_path)
    groups = {u["group"] for u in plan["units"]}
    assert groups == set(LAYOUTS[spec.layout]) and plan["layout"] == spec.layout and plan["cost"]["R1"] <= 0.7
    if spec.allocation == "uniform":
        assert len({u["rank"] for u in plan["units"] if u["max_rank"] > u["rank"]}) <= 1
    if spec.allocation == "fisher":  # leading singular values, ranks from the stored Fisher information
        assert all(u["indices"] == list(range(u["rank"])) and u["fisher"] > 0 for u in plan["units"])
    checkpoint = run_lowrank_model(str(source), "smolvlm", decomposition, plan_path, 0.2, tmp_path / "lowrank")
    lowrank, _, manifest = load_checkpoint(checkpoint)
    q, k, v = qkv_projections(decoder_layers(lowrank, family)[0], family)
    if spec.layout == "joint":
        assert q.down is k.down is v.down
    elif spec.layout == "separate":
        assert len({id(q.down), id(k.down), id(v.down)}) == 3
    elif spec.layout == "q-kv":
        assert k.down is v.down and q.down is not k.down
    else:
        assert isinstance(q, torch.nn.Linear) and k.down is not v.down
    result = read_json(run_evaluate(str(checkpoint), "smolvlm", dataset, tmp_path / "eval.json", 3, {"method": method}))
    assert result["num_samples"] == 3 and result["R1"] == pytest.approx(plan["cost"]["R1"])


def test_an_unreachable_budget_names_the_layout(saved_tiny_model, dataset, tmp_path):
    source, _, _ = saved_tiny_model("llava")
    stats = run_activation_stats(str(source), "llava", dataset, tmp_path / "stats")
    decomposition = run_decompose(str(source), "llava", stats, "kv", "abs_mean", 0.5, tmp_path / "svd")
    with pytest.raises(ValueError, match="'kv' layout, R1 budget 0.2"):  # Q dense alone costs 1/3
        run_rank_plan(decomposition, None, "uniform", "R1", 0.2, 1, tmp_path / "plan.json")


def test_same_inputs_give_bit_identical_plans_and_factors(saved_tiny_model, dataset, tmp_path):
    source, _, _ = saved_tiny_model("smolvlm", kv_heads=2)
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        stats = run_activation_stats(str(source), "smolvlm", dataset, out / "stats")
        decomposition = run_decompose(str(source), "smolvlm", stats, "joint", "abs_mean", 0.5, out / "svd")
        importance = run_importance(str(source), "smolvlm", decomposition, dataset, out / "importance")
        plan = run_rank_plan(decomposition, importance, "importance", "R1", 0.6, 1, out / "plan.json")
        checkpoint = run_lowrank_model(str(source), "smolvlm", decomposition, plan, 0.2, out / "model")
        outputs.append((read_json(plan)["units"], load_file(checkpoint / TENSORS)))
    (plan_a, weights_a), (plan_b, weights_b) = outputs
    assert plan_a == plan_b
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
