"""The model door: lean checkpoints (changed tensors + base reference) round-trip, export standalone, reload on meta."""

import pytest
import torch
import transformers
from safetensors.torch import load_file

from qsvd.artefacts import read_json
from qsvd.models.base import BaseModelMismatch
from qsvd.models.checkpoint import QUANTIZED_WEIGHTS, TENSORS, export_checkpoint, load_checkpoint
from qsvd.models.registry import family_by_name
from qsvd.stages.quantize import QuantSpec, run_quantize
from tests.stages.test_pipeline_tiny import dataset  # noqa: F401  (fixture)
from tests.stages.test_quantize import _logits, _lowrank_checkpoint

pytestmark = pytest.mark.unit


def _bytes(path):
    return sum(f.stat().st_size for f in path.iterdir() if f.suffix == ".safetensors")


def test_lean_lowrank_checkpoint_stores_only_the_factors_and_reloads_with_the_same_logits(
    tiny_model, dataset, tmp_path, images  # noqa: F811
):
    model, processor = tiny_model("llava")
    family = family_by_name("llava")
    expected_model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    lowrank = _lowrank_checkpoint("llava", model, processor, dataset, tmp_path)
    manifest = read_json(lowrank / "manifest.json")
    stored = load_file(str(lowrank / TENSORS))
    assert all(".language_model.layers." in name and ".self_attn." in name for name in stored), sorted(stored)[:5]
    ranks = {unit["rank"] for unit in manifest["units"]}
    assert all(t.shape[-1] in ranks or name.endswith("qkv_down.weight") for name, t in stored.items() if t.dim() == 2)
    assert _bytes(lowrank) < 0.5 * expected_model_bytes
    assert manifest["base"]["source"] == str(tmp_path / "model")
    assert all(len(entry["sha256"]) == 64 for entry in manifest["base"]["files"].values())

    reloaded, _, _ = load_checkpoint(lowrank)
    standalone = export_checkpoint(lowrank, tmp_path / "standalone")
    assert "base" not in read_json(standalone / "manifest.json")
    exported, _, _ = load_checkpoint(standalone)
    torch.testing.assert_close(_logits(exported, processor, family, images[0]), _logits(reloaded, processor, family, images[0]),
                               rtol=0, atol=0)
    assert _bytes(standalone) > _bytes(lowrank)


def test_standalone_reload_builds_no_full_model_with_random_weights(tiny_model, dataset, tmp_path, monkeypatch):  # noqa: F811
    model, processor = tiny_model("llama", kv_heads=2)
    standalone = export_checkpoint(_lowrank_checkpoint("llama", model, processor, dataset, tmp_path), tmp_path / "standalone")
    built = []
    original = transformers.LlamaForCausalLM.post_init

    def spy(self):
        built.append({p.device.type for p in self.parameters()})
        return original(self)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "post_init", spy)
    load_checkpoint(standalone)
    assert built == [{"meta"}]  # the skeleton's parameters were never allocated, let alone initialised


def test_a_changed_base_model_is_refused_with_the_fix(tiny_model, dataset, tmp_path):  # noqa: F811
    model, processor = tiny_model("llama", kv_heads=2)
    lowrank = _lowrank_checkpoint("llama", model, processor, dataset, tmp_path)
    weights = next((tmp_path / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(BaseModelMismatch, match="base model's weight files changed.*forcerun"):
        load_checkpoint(lowrank)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_checkpoint_stores_integer_codes_not_weights_and_reloads_identically(
    tiny_model, dataset, tmp_path, images, bits  # noqa: F811
):
    model, processor = tiny_model("llava")
    family = family_by_name("llava")
    lowrank = _lowrank_checkpoint("llava", model, processor, dataset, tmp_path)
    out = run_quantize(str(lowrank), "llava", dataset, QuantSpec(weight_bits=bits, act_bits=8), tmp_path / "quantized")
    manifest = read_json(out / "manifest.json")
    stored, codes = load_file(str(out / TENSORS)), load_file(str(out / QUANTIZED_WEIGHTS))
    quantized = [layer for layer in manifest["quantization"]["layers"] if layer["weight_bits"]]
    assert quantized and not any(f"{layer['name']}.weight" in stored for layer in quantized)
    for layer in quantized:
        packed = codes[f"{layer['name']}.codes"]
        expected_columns = (layer["weight_columns"] + 1) // 2 if bits == 4 else layer["weight_columns"]
        assert packed.dtype == (torch.uint8 if bits == 4 else torch.int8) and packed.shape[1] == expected_columns
    simulated, _, _ = load_checkpoint(out)
    integer, _, _ = load_checkpoint(out, packed=True)
    exported = export_checkpoint(out, tmp_path / "standalone")
    standalone, _, _ = load_checkpoint(exported)  # a transformers directory: integer codes, packed modules
    in_file = load_file(str(exported / "model.safetensors"))
    codes = [t for n, t in in_file.items() if n.endswith(".packed.codes")]
    assert len(codes) == len(quantized) and {t.dtype for t in codes} == {torch.uint8 if bits == 4 else torch.int8}
    assert not any(n.endswith("self_attn.qkv_down.weight") for n in in_file)
    expected = _logits(integer, processor, family, images[0])
    torch.testing.assert_close(_logits(standalone, processor, family, images[0]), expected, rtol=0, atol=0)
    # integer = simulated up to summation order (and the activation codes that order moves across a rounding step)
    reference = _logits(simulated, processor, family, images[0])
    assert (expected - reference).abs().max() <= 1e-2 * reference.abs().max()


def test_every_family_has_each_quantization_target_once(tiny):
    """SmolVLM's projector is itself a Linear: it used to be listed (and quantized) twice."""
    from qsvd.models.quantized import quantization_targets

    name, model, _ = tiny
    family = family_by_name(name)
    targets = quantization_targets(model, family, vision=family.multimodal)
    assert len(targets) == len({t.name for t in targets})
    if family.multimodal:
        assert family.projector_output in {t.name for t in targets}


@pytest.mark.parametrize("quantized", [False, True], ids=["lowrank", "W8A8"])
def test_qsvd_from_pretrained_loads_lean_and_standalone_checkpoints_generating_with_the_latent_cache(
    tiny_model, dataset, tmp_path, images, quantized  # noqa: F811
):
    import qsvd
    from qsvd.models.latent_cache import LatentCache
    from qsvd.models.prompts import encode_prompt

    model, processor = tiny_model("llava")
    family = family_by_name("llava")
    path = _lowrank_checkpoint("llava", model, processor, dataset, tmp_path)
    if quantized:
        path = run_quantize(str(path), "llava", dataset, QuantSpec(weight_bits=8, act_bits=8), tmp_path / "quantized")
    standalone = export_checkpoint(path, tmp_path / "standalone")
    batch = encode_prompt(processor, family, "what color is the shape?", images[0])
    dense, _, _ = load_checkpoint(path)
    with torch.no_grad():
        expected = dense.generate(**batch, max_new_tokens=6, do_sample=False)
    for source in (path, standalone):
        compressed = qsvd.from_pretrained(source, cache_mode="latent")
        kernels = {getattr(m, "kernel", None) for m in compressed.modules()} - {None}
        assert kernels == ({"int_mm"} if quantized else set())  # W8A8: every quantized layer computes in integers
        caches = []
        original = LatentCache.record_positions

        def spy(self, *args):
            caches.append(self)
            return original(self, *args)

        rebuilt = []
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(LatentCache, "record_positions", spy)
            if quantized:
                from qsvd.models.packed import PackedLatentUpProjection

                own = PackedLatentUpProjection.project_codes
                patch.setattr(PackedLatentUpProjection, "project_codes",
                              lambda self, *args: rebuilt.append(self) or own(self, *args))
            tokens = compressed.generate(**batch, max_new_tokens=6, do_sample=False)
        assert torch.equal(tokens, expected)
        assert caches  # K was rebuilt from cached latents
        if quantized:  # ... from their int8 codes (in latent mode k_proj itself never runs: only the rebuild)
            k_ups = {id(layer.self_attn.k_proj) for layer in compressed.model.language_model.layers}
            assert k_ups <= {id(up) for up in rebuilt}


def test_qsvd_from_pretrained_refuses_a_checkpoint_missing_a_tensor(tiny_model, dataset, tmp_path):  # noqa: F811
    import qsvd
    from safetensors.torch import save_file

    model, processor = tiny_model("llama", kv_heads=2)
    standalone = export_checkpoint(_lowrank_checkpoint("llama", model, processor, dataset, tmp_path), tmp_path / "standalone")
    tensors = load_file(str(standalone / "model.safetensors"))
    missing = next(name for name in tensors if name.endswith("qkv_down.weight"))
    save_file({n: t for n, t in tensors.items() if n != missing}, str(standalone / "model.safetensors"),
              metadata={"format": "pt"})
    import json

    from qsvd.artefacts import file_records, write_json

    manifest = json.loads((standalone / "manifest.json").read_text())  # re-recorded: intact but wrong, not damage
    write_json(standalone / "manifest.json", manifest | {"files": file_records(standalone)})
    with pytest.raises(RuntimeError, match="does not match the qsvd architecture.*missing_keys.*qkv_down"):
        qsvd.from_pretrained(standalone)


@pytest.mark.parametrize("quantized", [None, QuantSpec(weight_bits=4, act_bits=8),
                                       QuantSpec(weight_bits=4, act_bits=8, vocabulary_bits=8)],
                         ids=["lowrank", "W4A8", "W4A8-vocabulary8"])
@pytest.mark.parametrize("family_name", ["llava", "llama"])
def test_automodel_from_pretrained_rebuilds_an_export_and_save_pretrained_round_trips(
    tiny_model, dataset, tmp_path, images, quantized, family_name  # noqa: F811
):
    import qsvd  # noqa: F401  registers quant_method "qsvd"
    from qsvd.models.latent_cache import LatentCache
    from qsvd.models.prompts import encode_prompt

    model, processor = tiny_model(family_name, kv_heads=2)
    family = family_by_name(family_name)
    path = _lowrank_checkpoint(family_name, model, processor, dataset, tmp_path)
    if quantized:
        path = run_quantize(str(path), family_name, dataset, quantized, tmp_path / "quantized")
    exported = export_checkpoint(path, tmp_path / "export")
    auto = transformers.AutoModelForImageTextToText if family.multimodal else transformers.AutoModelForCausalLM
    loaded = auto.from_pretrained(exported)
    reference, _, _ = load_checkpoint(path, packed=True)
    batch = encode_prompt(processor, family, "what color is the shape?", images[0] if family.multimodal else None)
    with torch.no_grad():
        expected = reference.generate(**batch, max_new_tokens=6, do_sample=False)
        made = []
        with pytest.MonkeyPatch.context() as patch:
            own = LatentCache.__init__
            patch.setattr(LatentCache, "__init__", lambda self, *a, **k: made.append(self) or own(self, *a, **k))
            assert torch.equal(loaded.generate(**batch, max_new_tokens=6, do_sample=False), expected)
        assert made and any(layer.parts for layer in made[0].layers if hasattr(layer, "parts"))  # the latent cache
        loaded.save_pretrained(tmp_path / "again")
        again = auto.from_pretrained(tmp_path / "again")
        assert torch.equal(again.generate(**batch, max_new_tokens=6, do_sample=False), expected)
    if quantized:
        assert any(getattr(m, "kernel", None) == "int_mm" for m in again.modules())
    if quantized and quantized.vocabulary_bits:
        assert again.get_input_embeddings().kernel == "row gather" and again.lm_head.kernel == "int_mm"


def test_a_rotated_checkpoint_of_a_tied_model_reloads_without_a_missing_lm_head(tmp_path, monkeypatch):
    """The rotations untie lm_head from the embeddings; the base (tied) has no lm_head tensor. Reloading must not load
    the base under the untied config (transformers would report lm_head missing and initialise it at random)."""
    from tests.conftest import build_tiny

    model, tokenizer = build_tiny("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "tied")
    tokenizer.save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in load_file(str(tmp_path / "tied" / "model.safetensors"))
    out = run_quantize(str(tmp_path / "tied"), "llama", None, QuantSpec(weight_bits=8, act_bits=8, clip_search=False),
                       tmp_path / "w8a8")
    reports = []
    real = transformers.modeling_utils.log_state_dict_report
    monkeypatch.setattr(transformers.modeling_utils, "log_state_dict_report",
                        lambda **kw: reports.append(kw["loading_info"]) or real(**kw))
    for packed in (False, True):
        reloaded, _, manifest = load_checkpoint(out, packed=packed)
        assert "base" in manifest and not reloaded.config.tie_word_embeddings
        assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    assert reports and not any(info.missing_keys for info in reports), [info.missing_keys for info in reports]
