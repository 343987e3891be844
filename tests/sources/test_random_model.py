"""Random-weight models from the shipped architecture descriptions: configs, processors, weights, loading.

Most tests build narrowed variants (real vocabularies, image sizes and processors; tiny widths, one layer) so
that every architecture runs end to end in a second; the real widths are checked on the meta device (no
memory) and, marked slow, by full-width builds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open

from qsvd.artefacts import read_json
from qsvd.models.loading import load_model
from qsvd.models.prompts import encode_prompt
from qsvd.models.registry import decoder_layers, family_by_name, family_of, vision_layers
from qsvd.sources.random_model import (
    ARCHITECTURES,
    architecture_config,
    build_processor,
    build_random_model,
    expected_processor_settings,
    load_architecture,
    parameter_count,
    random_weights_model,
)

QUESTION = "what color is the shape?"
NARROW = {  # real vocabularies, image sizes, patch sizes and processors; tiny widths
    "text_config": {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "head_dim": 16},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2},
}
# Parameter counts the hub reports for the full checkpoints (rounded as the model cards show them).
PUBLISHED_PARAMETERS = {"llava-1.5-7b": 7.06e9, "llava-next-7b": 7.06e9, "smolvlm-instruct": 2.25e9}
FAMILIES = {"llava-1.5-7b": "llava", "llava-next-7b": "llava-next", "smolvlm-instruct": "smolvlm"}


def _assert_matches(config: transformers.PretrainedConfig, expected: dict, where: str) -> None:
    for key, value in expected.items():
        if key == "model_type":
            assert config.model_type == value, where
        elif isinstance(value, dict) and key.endswith("_config"):
            _assert_matches(getattr(config, key), value, f"{where}.{key}")
        else:
            assert getattr(config, key) == value, f"{where}.{key}"


@pytest.mark.unit
def test_every_architecture_is_shipped_with_its_hub_id():
    assert set(ARCHITECTURES) == set(FAMILIES)
    for name in ARCHITECTURES:
        arch = load_architecture(name)
        assert arch.name == name and "/" in arch.source and arch.notes
        assert arch.family == FAMILIES[name]


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_config_numbers_match_the_json(name):
    arch = load_architecture(name)
    config = architecture_config(name)
    assert type(config).__name__ == arch.config_class and config.architectures == [arch.model_class]
    _assert_matches(config, arch.config, name)


@pytest.mark.unit
def test_published_widths():
    llava = architecture_config("llava-1.5-7b")
    text, vision = llava.text_config, llava.vision_config
    assert (text.hidden_size, text.intermediate_size, text.num_hidden_layers, text.num_attention_heads) == (
        4096, 11008, 32, 32)
    assert (text.vocab_size, llava.image_token_id, llava.vision_feature_layer) == (32064, 32000, -2)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (1024, 24, 336, 14)
    smol = architecture_config("smolvlm-instruct")
    assert (smol.text_config.hidden_size, smol.text_config.num_hidden_layers, smol.scale_factor) == (2048, 24, 3)
    assert smol.image_token_id < smol.text_config.vocab_size == 49155
    assert (smol.vision_config.hidden_size, smol.vision_config.num_hidden_layers) == (1152, 27)


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_full_parameter_count_is_the_published_one(name):
    assert parameter_count(name) == pytest.approx(PUBLISHED_PARAMETERS[name], rel=5e-3)


@pytest.mark.unit
def test_layers_are_cut():
    config = architecture_config("llava-next-7b", num_layers=2, vision_layers=3)
    assert (config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers) == (2, 3)
    assert config.text_config.hidden_size == 4096  # widths stay
    full, cut = parameter_count("llava-1.5-7b"), parameter_count("llava-1.5-7b", num_layers=2)
    text = architecture_config("llava-1.5-7b").text_config
    per_layer = 4 * text.hidden_size**2 + 3 * text.hidden_size * text.intermediate_size + 2 * text.hidden_size
    assert full - cut == 30 * per_layer


@pytest.mark.unit
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 0}, "num_layers must be between 1 and 32"),
        ({"vision_layers": 25}, "vision_layers must be between 1 and 24"),
        ({"config_overrides": {"text_config": {"hiden_size": 8}}}, "unknown config key 'hiden_size'"),
        ({"config_overrides": {"vision_config": {"image_size": 224}}}, "may not change vision_config.image_size"),
    ],
)
def test_bad_requests_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        architecture_config("llava-1.5-7b", **kwargs)


@pytest.mark.unit
def test_unknown_architecture_and_dtype(tmp_path):
    with pytest.raises(ValueError, match="unknown random-model architecture 'llava-13b'.*llava-1.5-7b"):
        load_architecture("llava-13b")
    with pytest.raises(ValueError, match="dtype must be one of"):
        build_random_model("llava-1.5-7b", tmp_path / "m", dtype="bf16")
    assert not (tmp_path / "m").exists()


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_processor_has_real_vocabulary_and_special_ids(name):
    arch = load_architecture(name)
    config = architecture_config(name)
    assert {k: arch.processor["settings"][k] for k in expected_processor_settings(config)} == (
        expected_processor_settings(config))
    processor = build_processor(arch, config)
    tokenizer = processor.tokenizer
    assert len(tokenizer) == config.text_config.vocab_size
    for token, token_id in arch.processor["tokenizer"]["special_tokens"].items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    assert tokenizer.convert_tokens_to_ids("<image>") == config.image_token_id
    assert tokenizer.pad_token_id == config.text_config.pad_token_id
    ids = tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == QUESTION


@pytest.fixture(scope="module")
def narrow_models(tmp_path_factory):
    """Each architecture built narrow (1 LM layer, 1 vision layer, tiny widths) once: name -> directory."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("random-models")
        return {name: build_random_model(name, root / name, num_layers=1, vision_layers=1, config_overrides=NARROW)
                for name in ARCHITECTURES}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_narrow_model_loads_and_generates(narrow_models, images, single_thread, name):
    directory = narrow_models[name]
    family = family_by_name(FAMILIES[name])
    model, processor = load_model(str(directory), dtype=torch.bfloat16, family=family.name)
    assert family_of(model) is family
    assert len(decoder_layers(model, family)) == 1 and len(vision_layers(model, family)) == 1
    assert len(processor.tokenizer) == model.config.text_config.vocab_size
    batch = encode_prompt(processor, family, QUESTION, images[0])
    assert (batch["input_ids"] == model.config.image_token_id).sum() > 0
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert generated.shape == (1, batch["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_saved_weights_are_bfloat16_and_counted(narrow_models, name):
    directory = narrow_models[name]
    with safe_open(str(directory / "model.safetensors"), framework="pt") as weights:
        dtypes = {weights.get_slice(key).get_dtype() for key in weights.keys()}
        numel = sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())
    assert dtypes == {"BF16"}
    expected = parameter_count(name, num_layers=1, vision_layers=1, config_overrides=NARROW)
    assert numel == expected
    manifest = read_json(directory / "manifest.json")
    assert manifest["stage"] == "random_model" and manifest["weights"] == "random"
    assert "mean nothing" in manifest["note"] and manifest["source"] == load_architecture(name).source
    assert (manifest["architecture"], manifest["num_layers"], manifest["vision_layers"]) == (name, 1, 1)
    assert (manifest["dtype"], manifest["seed"], manifest["parameters"]) == ("bfloat16", 0, expected)
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"


def _narrow(name, num_layers=1):
    return architecture_config(name, num_layers=num_layers, vision_layers=1, config_overrides=NARROW)


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_same_seed_same_weights(single_thread, name):
    model_class = load_architecture(name).model_class
    first, again, other = (random_weights_model(_narrow(name), model_class, torch.bfloat16, seed) for seed in (0, 0, 1))
    for (key, a), b, c in zip(first.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b), key
        if a.dim() >= 2:
            assert not torch.equal(a, c), key
    assert {p.dtype for p in first.parameters()} == {torch.bfloat16}


@pytest.mark.unit
def test_a_layer_does_not_depend_on_how_many_are_kept(single_thread):
    model_class = load_architecture("llava-1.5-7b").model_class
    one, two = (random_weights_model(_narrow("llava-1.5-7b", n), model_class, torch.bfloat16, 0) for n in (1, 2))
    kept = two.state_dict()
    for key, value in one.state_dict().items():
        assert torch.equal(value, kept[key]), key


@pytest.mark.unit
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_weights_and_buffers_are_initialised(single_thread, name):
    config = _narrow(name)
    model_class = load_architecture(name).model_class
    model = random_weights_model(config, model_class, torch.bfloat16, 0)
    reference = getattr(transformers, model_class)(config)  # constructed the ordinary way
    for (key, buffer), expected in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(buffer, expected, rtol=0, atol=0, msg=key)
    std = config.text_config.initializer_range
    for key, param in model.named_parameters():
        values = param.float()
        assert torch.isfinite(values).all(), key
        if param.dim() >= 2:
            assert values.std().item() == pytest.approx(std, rel=0.1), key
        elif "norm" in key and key.endswith("weight"):
            assert torch.equal(values, torch.ones_like(values)), key


_MEASURE = """
import json, resource, sys
from pathlib import Path
from qsvd.sources.random_model import build_random_model
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
build_random_model("llava-1.5-7b", Path(sys.argv[1]), num_layers=2)
print(json.dumps({"before_kib": before, "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


@pytest.mark.slow
def test_full_width_llava_builds_in_its_bf16_bytes(tmp_path):
    """LLaVA-1.5-7B's widths, 2 LM layers, the whole vision tower: ~1 B parameters in ~1.2x their bf16 bytes."""
    out = tmp_path / "llava-2-layers"
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(out)], capture_output=True, text=True, check=True)
    memory = json.loads(run.stdout.strip().splitlines()[-1])
    parameters = parameter_count("llava-1.5-7b", num_layers=2)
    assert read_json(out / "manifest.json")["parameters"] == parameters
    assert (memory["peak_kib"] - memory["before_kib"]) * 1024 <= 1.2 * 2 * parameters
    with safe_open(str(out / "model.safetensors"), framework="pt") as weights:
        assert {weights.get_slice(key).get_dtype() for key in weights.keys()} == {"BF16"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_full_width_model_generates(tmp_path, images, name):
    """Real widths (one LM layer, one vision layer) through qsvd's prompt code and a greedy generate."""
    directory = build_random_model(name, tmp_path / name, num_layers=1, vision_layers=1)
    family = family_by_name(FAMILIES[name])
    model, processor = load_model(str(directory), dtype=torch.bfloat16, family=family.name)
    assert model.config.text_config.hidden_size == architecture_config(name).text_config.hidden_size
    batch = encode_prompt(processor, family, QUESTION, images[0])
    with torch.no_grad():
        generated = model.generate(**batch, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert generated.shape == (1, batch["input_ids"].shape[1] + 2)
