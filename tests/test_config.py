import copy
import dataclasses
import typing

import pytest
import yaml

from qsvd.config import SCHEMA_PATH, ConfigError, QsvdConfig, load_config
from qsvd.methods import METHODS

pytestmark = pytest.mark.unit

BASE = {
    "model": {"name": "demo", "source": "demo", "family": "llava"},
    "calibration": {"dataset": "easy-vqa", "split": "train", "num_samples": 8},
    "evaluation": {"tasks": [{"dataset": "easy-vqa", "split": "test", "num_samples": 10}]},
    "svd": {},
    "rank": {"budgets": [0.8, 0.5]},
    "factors": {},
}


def _with(path, value):
    data = copy.deepcopy(BASE)
    node = data
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return data


def _schema_node(schema, node):
    return schema["$defs"][node["$ref"].split("/")[-1]] if "$ref" in node else node


def test_schema_and_dataclasses_agree_on_keys_and_defaults():
    """The JSON schema and the typed view are one source of truth: same keys, same defaults."""
    schema = yaml.safe_load(SCHEMA_PATH.read_text())

    def check(cls, node):
        node = _schema_node(schema, node)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(fields) == set(node["properties"]), cls.__name__
        hints = typing.get_type_hints(cls)
        for name, f in fields.items():
            prop = _schema_node(schema, node["properties"][name])
            if f.default is not dataclasses.MISSING:
                default = list(f.default) if isinstance(f.default, tuple) else f.default
                assert prop.get("default") == default, f"{cls.__name__}.{name}"
            if dataclasses.is_dataclass(hints[name]):
                check(hints[name], prop)
            if typing.get_origin(hints[name]) is tuple and dataclasses.is_dataclass(typing.get_args(hints[name])[0]):
                check(typing.get_args(hints[name])[0], prop["items"])

    check(QsvdConfig, schema)


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "config").glob("*.yaml")):
        load_config(yaml.safe_load(path.read_text()))


def test_defaults_and_cache_keys():
    config = load_config(copy.deepcopy(BASE))
    assert config.methods == ("qsvd",)
    assert config.svd.key(METHODS["qsvd"]) == "joint-abs_mean-a0.5"
    assert config.svd.key(METHODS["joint-uniform"]) == "joint-abs_mean-a0.5"  # shares the decomposition
    assert config.svd.key(METHODS["svd-llm"]) == "kv-whiten-d0.01"
    assert config.calibration.key == "easy-vqa-train-n8-s0"
    assert config.rank.key(0.8, METHODS["qsvd"]) == "importance-R10.8-min1"
    assert config.rank.key(0.8, METHODS["asvd"]) == "uniform-R10.8-min1"
    assert config.factors.key == "beta0.2"


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["svd", "alhpa"], 0.5, r"svd.*alhpa"),
        (["model", "family"], "gpt", r"model.family"),
        (["rank", "budgets"], [0.8, 2.5], r"rank.budgets.1"),
        (["methods"], ["qsvd", "lora"], r"methods.1"),
        (["rank", "budgets"], [-0.1], r"rank.budgets.0"),
        (["factors", "beta"], 1.5, r"factors.beta"),
        (["model", "source"], "/no/such/model", r"model.source.*does not exist"),
        (["calibration", "local_dir"], "/no/such/data", r"calibration.local_dir.*does not exist"),
        (["benchmark"], {"peers": ["vllm"]}, r"benchmark.peers.0"),
        (["benchmark"], {"contexts": [0]}, r"benchmark.contexts.0"),
        (["benchmark"], {"cache_modes": ["mla"]}, r"benchmark.cache_modes.0"),
        (["model", "name"], "..", r"model.name"),  # would write outside results/
        (["report_name"], "..", r"report_name"),
    ],
)
def test_bad_values_name_the_key(path, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_with(path, value))


def test_r2_budget_above_one_is_out_of_range():
    data = _with(["rank", "budget_kind"], "R2")
    data["rank"]["budgets"] = [1.2]
    with pytest.raises(ConfigError, match=r"rank.budgets\[0\].*R2"):
        load_config(data)


def test_quantization_settings_keys_and_bits():
    config = load_config(_with(["quantization"], {"formats": ["W8A8", "W4A16"], "seeds": [0, 1], "rotation_ablation": True}))
    quant = config.quantization
    assert quant.bits("W8A8") == (8, 8) and quant.bits("W4A16") == (4, None)
    # rotated settings per seed; without rotations nothing is random, so one seed
    assert quant.settings() == [("W8A8", 0, True, None), ("W8A8", 1, True, None), ("W4A16", 0, True, None),
                                ("W4A16", 1, True, None), ("W8A8", 0, False, None), ("W4A16", 0, False, None)]
    keys = [quant.key(*s) for s in quant.settings()]
    assert len(set(keys)) == len(keys) and keys[0] == "W8A8-rtn-c0.9-0.85-rot-s0"
    assert load_config(BASE).quantization.settings() == []


def test_beta_ablation_adds_each_fixed_beta_and_per_layer_beta_besides_the_main_one():
    quant = load_config(_with(["quantization"], {"formats": ["W4A4"], "seeds": [0, 1], "beta": 0.2, "beta_ablation": [0, 0.2, 0.8]})).quantization
    assert quant.settings()[:2] == [("W4A4", 0, True, 0.2), ("W4A4", 1, True, 0.2)]
    assert quant.beta_ablation_settings() == [("W4A4", s, True, b) for b in (0.0, 0.8, None) for s in (0, 1)]
    assert quant.key("W4A4", 0, True, 0.8) == "W4A4-rtn-c0.9-0.85-beta0.8-rot-s0"
    with pytest.raises(ConfigError, match="quantization.beta_ablation"):
        load_config(_with(["quantization"], {"beta_ablation": [1.5]}))


@pytest.mark.parametrize("key,value", [("formats", ["W9A8"]), ("formats", ["8-bit"]), ("lm_clip", 1.5), ("weight_method", "awq"), ("bits", 4)])
def test_bad_quantization_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match="quantization"):
        load_config(_with(["quantization"], {key: value}))
