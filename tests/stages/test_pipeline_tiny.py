"""Every stage, in order, on a tiny random model of each family (the path real models take)."""

import pytest
import torch

from qsvd.artefacts import read_artefact, read_json
from qsvd.data.records import Record, write_records
from qsvd.models.checkpoint import load_lowrank_checkpoint
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
    directory = tmp_path / "data"
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

    decomposition = run_decompose(str(source), name, stats, "abs_mean", 0.5, tmp_path / "decomposition")
    svds, shapes, _ = read_decomposition(decomposition)
    assert len(svds) == layers

    importance = run_importance(str(source), name, decomposition, dataset, tmp_path / "importance")
    scores, manifest = read_artefact(importance)
    assert manifest["samples"] == 3
    assert scores["layer.0.importance"].dtype == torch.float32
    assert all(torch.isfinite(scores[f"layer.{i}.importance"]).all() for i in range(layers))

    plan_path = run_rank_plan(decomposition, importance, "importance", "R1", 0.7, 1, tmp_path / "plan.json")
    plan = read_json(plan_path)
    assert plan["cost"]["R1"] <= 0.7
    assert all(1 <= layer["rank"] <= layer["max_rank"] for layer in plan["layers"])

    checkpoint = run_lowrank_model(str(source), name, decomposition, plan_path, 0.2, tmp_path / "lowrank")
    lowrank, lowrank_processor, manifest = load_lowrank_checkpoint(checkpoint)
    assert [l["rank"] for l in manifest["layers"]] == [l["rank"] for l in plan["layers"]]
    q, k, v = qkv_projections(decoder_layers(lowrank, family)[0], family)
    assert q.down is k.down is v.down and q.weight.shape[1] == plan["layers"][0]["rank"]

    result = read_json(run_evaluate(str(checkpoint), name, dataset, tmp_path / "eval.json", 3, {"method": "qsvd"}))
    assert result["num_samples"] == 3 and 0.0 <= result["score"] <= 1.0
    assert result["R1"] == pytest.approx(plan["cost"]["R1"])
    assert (tmp_path / "eval.predictions.jsonl").read_text().count("\n") == 3


def test_full_rank_lowrank_model_matches_the_original(tiny, dataset, tmp_path, images):
    """Keeping every singular value reproduces the original logits (float32 tolerance)."""
    name, model, processor = tiny
    family = family_by_name(name)
    source = _saved(model, processor, tmp_path / "model")
    stats = run_activation_stats(str(source), name, dataset, tmp_path / "stats")
    decomposition = run_decompose(str(source), name, stats, "abs_max", 0.5, tmp_path / "decomposition")
    plan_path = run_rank_plan(decomposition, None, "uniform", "rank_fraction", 1.0, 1, tmp_path / "plan.json")
    checkpoint = run_lowrank_model(str(source), name, decomposition, plan_path, 0.5, tmp_path / "lowrank")
    lowrank, _, _ = load_lowrank_checkpoint(checkpoint)
    batch = encode_prompt(processor, family, "what color is the shape?", images[0] if family.multimodal else None)
    with torch.no_grad():
        torch.testing.assert_close(lowrank(**batch).logits, model(**batch).logits, rtol=1e-4, atol=1e-4)
