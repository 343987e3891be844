"""The decomposition reads each LM layer's q/k/v straight from the safetensors files, one layer at a time, and
gets bit-identical factors to those of the whole model loaded by from_pretrained."""

import weakref

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qsvd.models.shards as shards
from qsvd.artefacts import read_artefact, read_json, write_artefact, write_json
from qsvd.models.registry import decoder_layers, family_by_name
from qsvd.models.shards import INDEX_FILE, SINGLE_FILE, stored_qkv, stored_weight_files
from qsvd.stages.decompose import run_decompose
from tests.conftest import FAMILY_CASES

pytestmark = pytest.mark.unit
CASES = [pytest.param(family, kv, id=f"{family}-kv{kv}") for family, kv in FAMILY_CASES]
SHARD_SIZE = "20KB"  # a tiny model's 64x64 float32 q_proj is 16 KiB: one layer's q, k, v land in different shards


def _stats(model, family: str, directory):
    """An activation-statistics artefact: positive abs_mean and XᵀX of random inputs per LM layer."""
    generator = torch.Generator().manual_seed(0)
    hidden = model.config.get_text_config().hidden_size
    tensors = {}
    for layer in range(len(decoder_layers(model, family_by_name(family)))):
        x = torch.randn(3 * hidden, hidden, generator=generator, dtype=torch.float64)
        tensors[f"layer.{layer}.abs_mean"] = x.abs().mean(0).float()
        tensors[f"layer.{layer}.gram"] = x.T @ x
    return write_artefact(directory, tensors, {"stage": "activation_stats"})


def _sharded(model, processor, directory):
    model.save_pretrained(directory, max_shard_size=SHARD_SIZE)
    processor.save_pretrained(directory)
    assert (directory / INDEX_FILE).is_file() and len(set(read_json(directory / INDEX_FILE)["weight_map"].values())) > 2
    return directory


class FromPretrainedCalls:
    """Counts whole-model loads."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        original = transformers.PreTrainedModel.from_pretrained.__func__

        def from_pretrained(cls, *args, **kwargs):
            self.calls.append(cls.__name__)
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(from_pretrained))


def _decompose(source, family, stats, out, layout="joint", transform="abs_mean", dtype=torch.float32):
    out = run_decompose(str(source), family, stats, layout, transform, 0.5, out, dtype=dtype, device="cpu")
    return read_artefact(out)


@pytest.mark.parametrize("sharded", [False, True], ids=["one-file", "sharded"])
@pytest.mark.parametrize("family,kv_heads", CASES)
def test_per_layer_reading_gives_bit_identical_factors_to_the_whole_model(
    family, kv_heads, sharded, saved_tiny_model, tmp_path, monkeypatch
):
    source, model, processor = saved_tiny_model(family, kv_heads)
    if sharded:
        source = _sharded(model, processor, tmp_path / "sharded")
    stats = _stats(model, family, tmp_path / "stats")
    loads = FromPretrainedCalls(monkeypatch)
    for layout, transform in (("joint", "abs_mean"), ("kv", "whiten")):
        per_layer, per_layer_manifest = _decompose(source, family, stats, tmp_path / f"per-layer-{layout}", layout,
                                                   transform)
        assert loads.calls == []
        with monkeypatch.context() as whole_model_path:
            whole_model_path.setattr(shards, "stored_weight_files", lambda source: None)
            whole, whole_manifest = _decompose(source, family, stats, tmp_path / f"whole-{layout}", layout, transform)
        assert loads.calls == [type(model).__name__]
        loads.calls.clear()
        assert per_layer.keys() == whole.keys()
        assert all(torch.equal(per_layer[name], whole[name]) for name in whole)
        assert per_layer_manifest["layers"] == whole_manifest["layers"]


def test_a_bfloat16_checkpoint_is_read_in_the_requested_dtype(saved_tiny_model, tmp_path, monkeypatch):
    _, model, processor = saved_tiny_model("smolvlm", 2)
    source = _sharded(model.to(torch.bfloat16), processor, tmp_path / "bf16")
    stats = _stats(model, "smolvlm", tmp_path / "stats")
    for dtype in (torch.bfloat16, torch.float32):
        per_layer, _ = _decompose(source, "smolvlm", stats, tmp_path / f"shards-{dtype}", dtype=dtype)
        with monkeypatch.context() as whole_model_path:
            whole_model_path.setattr(shards, "stored_weight_files", lambda source: None)
            whole, _ = _decompose(source, "smolvlm", stats, tmp_path / f"whole-{dtype}", dtype=dtype)
        assert all(torch.equal(per_layer[name], whole[name]) for name in whole)


class TensorReads:
    """Wraps safe_open in qsvd.models.shards: records every tensor read and how many read earlier are still alive."""

    def __init__(self, monkeypatch):
        self.keys: list[str] = []
        self.alive_before_read: list[list[str]] = []
        self._refs: list[tuple[str, weakref.ref]] = []
        spy = self

        class Opened:
            def __init__(self, *args, **kwargs):
                self._file = safe_open(*args, **kwargs)

            def __enter__(self):
                self._stored = self._file.__enter__()
                return self

            def __exit__(self, *exc):
                return self._file.__exit__(*exc)

            def get_slice(self, key):
                return self._stored.get_slice(key)

            def get_tensor(self, key):
                spy.alive_before_read.append([name for name, ref in spy._refs if ref() is not None])
                tensor = self._stored.get_tensor(key)
                spy.keys.append(key)
                spy._refs.append((key, weakref.ref(tensor)))
                return tensor

        monkeypatch.setattr(shards, "safe_open", Opened)


@pytest.mark.parametrize("family,kv_heads", CASES)
def test_only_one_layers_qkv_weights_are_held_at_a_time(family, kv_heads, saved_tiny_model, tmp_path, monkeypatch):
    source, model, processor = saved_tiny_model(family, kv_heads)
    source = _sharded(model, processor, tmp_path / "sharded")
    stats = _stats(model, family, tmp_path / "stats")
    loads, reads = FromPretrainedCalls(monkeypatch), TensorReads(monkeypatch)
    run_decompose(str(source), family, stats, "joint", "abs_mean", 0.5, tmp_path / "svd", device="cpu")

    assert loads.calls == []  # the model is never instantiated with weights
    stored = stored_qkv(source, family)
    expected = [layer[p] for layer in stored.keys for p in "qkv"]
    assert reads.keys == expected  # the q/k/v weights of the LM, layer by layer, each once: nothing else
    assert all(".self_attn." in key and key.endswith("_proj.weight") for key in expected)
    layers = len(stored.keys)
    assert layers == len(decoder_layers(model, family_by_name(family))) == 2
    for index, alive in enumerate(reads.alive_before_read):
        assert set(alive) <= set(expected[index - index % 3 : index])  # only this layer's q/k/v read so far


def test_stored_keys_follow_transformers_renaming(saved_tiny_model):
    source, _, _ = saved_tiny_model("llava", 4)
    stored = stored_qkv(source, "llava")
    assert stored.keys[1] == {p: f"language_model.model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"}


def test_without_the_renaming_a_suffix_match_must_be_unique(saved_tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_renamed_by_transformers", lambda model, keys: None)
    smolvlm, _, _ = saved_tiny_model("smolvlm", 2)  # stored under its in-memory names
    assert stored_qkv(smolvlm, "smolvlm").keys[0]["q"] == "model.text_model.layers.0.self_attn.q_proj.weight"
    llava, _, _ = saved_tiny_model("llava", 4)  # LM and vision layers both end in layers.0.self_attn.q_proj.weight
    with pytest.raises(KeyError, match=r"model\.language_model\.layers\.0\.self_attn\.q_proj\.weight.*ambiguous"):
        stored_qkv(llava, "llava")


def test_a_missing_or_misshapen_tensor_is_named(saved_tiny_model):
    source, _, _ = saved_tiny_model("llama", 1)
    tensors = load_file(source / SINGLE_FILE)
    key = "model.layers.1.self_attn.k_proj.weight"
    save_file({name: t for name, t in tensors.items() if name != key}, source / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        stored_qkv(source, "llama")
    tensors[key] = tensors[key][:-1]
    save_file(tensors, source / SINGLE_FILE, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shape"):
        stored_qkv(source, "llama")


def test_a_wrong_family_is_named(saved_tiny_model):
    source, _, _ = saved_tiny_model("llama", 1)
    with pytest.raises(ValueError, match=r"model.family is 'smolvlm'.*LlamaForCausalLM"):
        stored_qkv(source, "smolvlm")


def test_only_local_safetensors_directories_are_read_per_layer(saved_tiny_model, tmp_path):
    source, _, _ = saved_tiny_model("llama", 1)
    assert set(stored_weight_files(source).values()) == {source / SINGLE_FILE}
    assert stored_weight_files("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub id: loaded whole
    assert stored_weight_files(tmp_path / "stats-like") is None  # not there
    (tmp_path / "empty").mkdir()
    assert stored_weight_files(tmp_path / "empty") is None  # no safetensors
    write_json(source / "manifest.json", {"stage": "lowrank_model"})
    assert stored_weight_files(source) is None  # a qsvd checkpoint: loaded by its own door
