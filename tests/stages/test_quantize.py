"""The quantization stage on tiny models: rotations exact in full precision, W8A8 close, reload identical."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from qsvd.artefacts import read_json
from qsvd.data.records import Record, write_records
from qsvd.math.quantize import QuantizedWeight
from qsvd.models.checkpoint import QUANTIZED_WEIGHTS, load_checkpoint, open_checkpoint
from qsvd.models.prompts import encode_prompt
from qsvd.models.quantized import quantization_targets
from qsvd.models.registry import decoder_layers, family_by_name, vision_layers
from qsvd.models.rotation import latent_modules
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.decompose import run_decompose
from qsvd.stages.evaluate import run_evaluate
from qsvd.stages.lowrank_model import run_lowrank_model
from qsvd.stages.quantize import QuantSpec, hessian_batches, run_quantize
from qsvd.stages.rank_plan import run_rank_plan
from tests.models.test_rotation import _randomise_vision_norms
from tests.stages.test_pipeline_tiny import _saved, dataset  # noqa: F401  (fixture)


def _logits(model, processor, family, image):
    batch = encode_prompt(processor, family, "what color is the shape?", image if family.multimodal else None)
    with torch.no_grad():
        return model(**batch).logits


def _lowrank_checkpoint(name, model, processor, data, tmp_path):
    source = _saved(model, processor, tmp_path / "model")
    stats = run_activation_stats(str(source), name, data, tmp_path / "stats")
    decomposition = run_decompose(str(source), name, stats, "joint", "abs_mean", 0.5, tmp_path / "decomposition")
    plan = run_rank_plan(decomposition, None, "uniform", "R1", 1.0, 1, tmp_path / "plan.json")
    return run_lowrank_model(str(source), name, decomposition, plan, 0.2, tmp_path / "lowrank")


def test_full_precision_rotated_checkpoint_reloads_with_the_same_logits(tiny, dataset, tmp_path, images):  # noqa: F811
    name, model, processor = tiny
    family = family_by_name(name)
    lowrank = _lowrank_checkpoint(name, model, processor, dataset, tmp_path)
    reference, _, _ = load_checkpoint(lowrank)
    expected = _logits(reference, processor, family, images[0])
    out = run_quantize(str(lowrank), name, None, QuantSpec(weight_bits=None, act_bits=None), tmp_path / "rotated")
    rotated, _, manifest = load_checkpoint(out)
    torch.testing.assert_close(_logits(rotated, processor, family, images[0]), expected, rtol=1e-4, atol=1e-4)
    assert manifest["quantization"]["label"] == "W16A16" and manifest["quantization"]["simulated"] is True
    assert {"residual", "mlp_down", "heads", "head_dim"} <= set(manifest["quantization"]["rotations"])
    assert any(role.startswith("latent.") for role in manifest["quantization"]["rotations"])


@pytest.mark.parametrize(("name", "kv_heads"), [("llava", 4), ("smolvlm", 2)])  # a pre-norm shell; a connector bias shell
def test_rotated_vision_tower_reloads_with_the_same_logits(tiny_model, tmp_path, images, name, kv_heads):
    model, processor = tiny_model(name, kv_heads=kv_heads)
    family = family_by_name(name)
    _randomise_vision_norms(model, family)
    expected = _logits(model, processor, family, images[0])
    source = _saved(model, processor, tmp_path / "model")
    out = run_quantize(str(source), name, None, QuantSpec(weight_bits=None, act_bits=None), tmp_path / "rotated")
    rotated, _, manifest = open_checkpoint(out, name)
    torch.testing.assert_close(_logits(rotated, processor, family, images[0]), expected, rtol=1e-4, atol=1e-4)
    roles = manifest["quantization"]["rotations"]
    assert {"vision_residual", "vision_mlp_down", "vision_heads", "vision_head_dim"} <= set(roles)
    vision = [entry for entry in manifest["quantization"]["layers"] if entry["part"] == "vision"]
    assert sum(entry.get("input_rotation") == "hadamard(64)" for entry in vision) == len(vision_layers(rotated, family))
    unrotated = run_quantize(str(source), name, None, QuantSpec(weight_bits=None, act_bits=None, vision=False), tmp_path / "lm")
    assert not any(role.startswith("vision_") for role in read_json(unrotated / "manifest.json")["quantization"]["rotations"])


def test_w8a8_stays_close_reloads_bit_identically_and_exports_integer_codes(tiny_model, dataset, tmp_path, images):  # noqa: F811
    model, processor = tiny_model("llava", kv_heads=4)
    family = family_by_name("llava")
    lowrank = _lowrank_checkpoint("llava", model, processor, dataset, tmp_path)
    reference, _, base = load_checkpoint(lowrank)
    expected = _logits(reference, processor, family, images[0])
    # No activation clipping at 8 bits (measured: clip 0.9 alone costs 6% of the logits' norm here).
    out = run_quantize(str(lowrank), "llava", dataset, QuantSpec(weight_bits=8, act_bits=8, lm_clip=1.0, vision_clip=1.0), tmp_path / "w8a8")
    quantized, _, manifest = load_checkpoint(out)
    logits = _logits(quantized, processor, family, images[0])
    relative = (logits - expected).norm() / expected.norm()
    assert 0 < relative < 0.02, float(relative)  # measured 0.008
    out4 = run_quantize(str(lowrank), "llava", dataset, QuantSpec(weight_bits=4, act_bits=4), tmp_path / "w4a4")
    relative4 = (_logits(load_checkpoint(out4)[0], processor, family, images[0]) - expected).norm() / expected.norm()
    assert relative < relative4, (float(relative), float(relative4))

    # Reloading rebuilds rotations and quantizers from the manifest: the same logits exactly.
    again, _, _ = load_checkpoint(out)
    torch.testing.assert_close(_logits(again, processor, family, images[0]), logits, rtol=0, atol=0)

    # Every LM linear, the latent, the vision tower and the projector are listed, with their bits.
    layers = {entry["name"]: entry for entry in manifest["quantization"]["layers"]}
    assert {entry["part"] for entry in layers.values()} == {"lm", "vision", "projector"}
    assert manifest["quantization"]["full_precision"] == ["embeddings", "lm_head", "vision embeddings", "vision pre-norm affine map (rotated)"]
    downs = [e for e in layers.values() if e["kind"] == "latent_down"]
    assert len(downs) == len(decoder_layers(quantized, family)) and all(e["latent_bits"] == 8 for e in downs)
    assert all(e["weight_bits"] == 8 and e["input_bits"] == 8 for e in layers.values())
    assert all(e["input_clip"] == 1.0 for e in layers.values() if "input_clip" in e)
    assert manifest["cost"]["R1"] == pytest.approx(base["cost"]["R1"] / 2)
    # bytes: the latent cached at 8 bits plus one fp16 scale per layer and token; weights about halved
    cost = manifest["cost"]
    assert cost["kv_cache_bytes_per_token"] == base["cost"]["kv_cache_bytes_per_token"] / 2 + 2 * len(downs)
    assert 0.5 * cost["dense_weight_bytes"] < cost["weight_bytes"] < 0.75 * cost["dense_weight_bytes"]
    # β chosen per layer on the calibration inputs, with every grid point's error recorded
    assert manifest["beta"] == "per layer (searched)" and all(0 <= e["beta"] <= 1 and len(e["beta_errors"]) == 11 for e in downs)
    assert all(e["beta_errors"][f"{e['beta']:g}"] == min(e["beta_errors"].values()) for e in downs)

    # The exported integer codes dequantize to exactly the weights the model computes with.
    codes = load_file(str(out / QUANTIZED_WEIGHTS))
    for name in list(layers)[:6]:
        weight = quantized.get_submodule(name).weight
        stored = QuantizedWeight(codes[f"{name}.codes"], codes[f"{name}.scale"], None, weight.shape[1])
        assert codes[f"{name}.codes"].dtype == torch.int8 and codes[f"{name}.codes"].int().abs().max() <= 128
        torch.testing.assert_close(stored.dequantize(), weight, rtol=0, atol=0)

    result = read_json(run_evaluate(str(out), "llava", dataset, tmp_path / "eval.json", 3, {"method": "qsvd"}))
    assert result["quantization"] == "W8A8 (simulated quantization)" and result["R1"] == manifest["cost"]["R1"]


def test_fixed_beta_rebalances_every_latent_without_data_and_search_needs_data(tiny_model, dataset, tmp_path):  # noqa: F811
    model, processor = tiny_model("smolvlm", kv_heads=2)
    family = family_by_name("smolvlm")
    lowrank = _lowrank_checkpoint("smolvlm", model, processor, dataset, tmp_path)
    with pytest.raises(ValueError, match="calibration data"):
        run_quantize(str(lowrank), "smolvlm", None, QuantSpec(weight_bits=4, act_bits=8), tmp_path / "never")
    with pytest.raises(ValueError, match="beta must be in"):
        QuantSpec(beta=1.5)
    factors = {}
    for beta in (0.2, 0.8):  # the low-rank model was built with β = 0.2
        spec = QuantSpec(weight_bits=None, act_bits=8, rotate=False, rotate_latent=False, beta=beta)
        out = run_quantize(str(lowrank), "smolvlm", None, spec, tmp_path / f"beta{beta}")
        quantized, _, manifest = load_checkpoint(out)
        assert manifest["beta"] == beta and manifest["quantization"]["label"] == f"W16A8, fixed β {beta:g} without rotations"
        downs = [e for e in manifest["quantization"]["layers"] if e["kind"] == "latent_down"]
        assert downs and all(e["beta"] == beta for e in downs)
        factors[beta] = [(down.weight.detach().double(), torch.cat([u.weight.detach() for u in ups]).double())
                         for down, ups in latent_modules(quantized, family)]
    for (down, up), (moved_down, moved_up) in zip(factors[0.2], factors[0.8]):
        assert not torch.allclose(down, moved_down)  # σ^0.6 moved from A into B ...
        torch.testing.assert_close(moved_up @ moved_down, up @ down, rtol=1e-4, atol=1e-5)  # ... same product


def test_gptq_uses_calibration_inputs_and_rejects_a_missing_dataset(tiny_model, dataset, tmp_path, images):  # noqa: F811
    model, processor = tiny_model("llama", kv_heads=1)
    source = _saved(model, processor, tmp_path / "model")
    spec = QuantSpec(weight_bits=4, act_bits=None, weight_method="gptq", rotate_latent=False)
    with pytest.raises(ValueError, match="calibration data"):
        run_quantize(str(source), "llama", None, spec, tmp_path / "gptq")
    text = tmp_path / "text"
    write_records(text, [Record(id=str(i), task="text", question="the state of the union is strong " * 4, answer="", answers=[]) for i in range(2)])
    out = run_quantize(str(source), "llama", text, spec, tmp_path / "gptq")
    manifest = read_json(out / "manifest.json")
    assert manifest["quantization"]["label"] == "W4A16" and manifest["layout"] is None
    assert all(e["weight_method"] == "gptq" for e in manifest["quantization"]["layers"])
    # Hessians beyond the memory limit take further calibration passes: every target is quantized once.
    targets = quantization_targets(model, family_by_name("llama"), vision=False)
    sizes = [8 * model.get_submodule(t.name).weight.shape[1] ** 2 for t in targets]
    batches = hessian_batches(model, targets, max(sizes))
    assert [t for batch in batches for t in batch] == targets and len(batches) > len(targets) // 2
    assert all(sum(8 * model.get_submodule(t.name).weight.shape[1] ** 2 for t in batch) <= max(sizes) for batch in batches)
    assert hessian_batches(model, targets, sum(sizes)) == [targets]
    small = run_quantize(str(source), "llama", text, dataclasses.replace(spec, hessian_memory_gib=max(sizes) / 2**30), tmp_path / "gptq-small")
    assert set(load_file(str(small / QUANTIZED_WEIGHTS))) == set(load_file(str(out / QUANTIZED_WEIGHTS)))
    with pytest.raises(ValueError, match="no vision tower"):
        quantization_targets(model, family_by_name("llama"), vision=True)
