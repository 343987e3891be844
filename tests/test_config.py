import copy
import dataclasses
import typing

import pytest
import yaml

import qsvd.config
from qsvd.config import SCHEMA_PATH, ConfigError, QsvdConfig, load_config, number_key
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
    # FIB shares qsvd's decomposition and so its importance stage, whose gradients give the Fisher information
    assert config.svd.key(METHODS["joint-fib"]) == "joint-abs_mean-a0.5" and METHODS["joint-fib"].reads_importance
    assert config.rank.key(0.8, METHODS["joint-fib"]) == "fisher-R10.8-min1"
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
        (["rank", "budgets"], [0.5, 0.5], r"rank.budgets: .*non-unique"),  # one model, two labels
        (["quantization"], {"formats": ["W8A8", "W8A8"]}, r"quantization.formats: .*non-unique"),
        (["quantization"], {"seeds": [0, 0]}, r"quantization.seeds: .*non-unique"),
        (["quantization"], {"formats": ["W16A16"]}, r"quantization.formats\[0\] = W16A16 quantizes nothing"),
        (["calibration", "split"], "train/a", r"calibration.split"),  # a path segment of the cache key
        (["evaluation", "tasks"], [{"dataset": "easy-vqa", "split": "test"}, {"dataset": "easy-vqa", "split": "test", "seed": 0}],
         r"evaluation.tasks\[1\] repeats evaluation.tasks\[0\]"),
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


def test_act_order_is_a_gptq_option_with_a_key_of_its_own():
    gptq = {"formats": ["W4A4"], "weight_method": "gptq"}
    quant = load_config(_with(["quantization"], gptq | {"act_order": True})).quantization
    assert quant.act_order and quant.key("W4A4", 0, True, None) == "W4A4-gptq-ao-c0.9-0.85-rot-s0"
    # unset, the keys of existing GPTQ models are unchanged
    assert load_config(_with(["quantization"], gptq)).quantization.key("W4A4", 0, True, None) == "W4A4-gptq-c0.9-0.85-rot-s0"
    with pytest.raises(ConfigError, match="quantization.act_order.*weight_method gptq"):
        load_config(_with(["quantization"], {"formats": ["W4A4"], "act_order": True}))


@pytest.mark.parametrize("key,value", [("formats", ["W9A8"]), ("formats", ["8-bit"]), ("lm_clip", 1.5), ("weight_method", "awq"), ("bits", 4)])
def test_bad_quantization_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match="quantization"):
        load_config(_with(["quantization"], {key: value}))


def test_keys_of_the_values_in_use_are_unchanged():
    """Cached results and the README's paths (rank~importance-R10.1-min1) keep their keys: `:g` where it round-trips."""
    config = load_config(_with(["rank", "budgets"], [0.1, 0.07, 0.05, 0.5333, 0.4667, 1]))
    assert [config.rank.key(b, METHODS["qsvd"]) for b in config.rank.budgets] == [
        "importance-R10.1-min1", "importance-R10.07-min1", "importance-R10.05-min1", "importance-R10.5333-min1",
        "importance-R10.4667-min1", "importance-R11-min1"]
    assert [number_key(v) for v in (0.5, 0.01, 0.2, 0.85, 1e-05, 2.0)] == ["0.5", "0.01", "0.2", "0.85", "1e-05", "2"]


def test_values_that_differ_beyond_six_digits_get_their_own_keys():
    data = _with(["rank", "budgets"], [0.1, 0.1000001])
    data["svd"] = {"alpha": 0.5000001}
    data["factors"] = {"beta": 0.2000001}
    data["quantization"] = {"formats": ["W4A4"], "beta": 0.2, "beta_ablation": [0.2000001], "lm_clip": 0.9000001}
    config = load_config(data)
    assert {config.rank.key(b, METHODS["qsvd"]) for b in config.rank.budgets} == {"importance-R10.1-min1", "importance-R10.1000001-min1"}
    assert config.svd.key(METHODS["qsvd"]) == "joint-abs_mean-a0.5000001" and config.factors.key == "beta0.2000001"
    keys = [config.quantization.key(*s) for s in config.quantization.settings()]
    assert len(set(keys)) == len(keys) == 3 and "W4A4-rtn-c0.9000001-0.85-beta0.2000001-rot-s0" in keys
    assert all(float(number_key(v)) == v for v in (0.1 + 0.2, 1 / 3, 2.5e-7, 123456789.0))


def _text_tasks(*paths):
    return _with(["evaluation", "tasks"], [{"dataset": "text", "split": "test", "local_dir": str(p)} for p in paths])


def test_dataset_key_names_the_local_copy(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("text")
    tasks = load_config(_text_tasks(tmp_path / "a.txt", tmp_path / "b.txt")).evaluation.tasks
    assert tasks[0].key != tasks[1].key and all(t.key.startswith("text-test-nall-s0-local-") for t in tasks)
    assert load_config(BASE).calibration.key == "easy-vqa-train-n8-s0"  # no local copy: the key as before
    with pytest.raises(ConfigError, match=r"evaluation.tasks\[1\] repeats evaluation.tasks\[0\]"):  # one file, written two ways
        load_config(_text_tasks(tmp_path / "a.txt", f"{tmp_path}/./a.txt"))


def test_configs_whose_keys_would_collide_are_refused(tmp_path, monkeypatch):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("text")
    monkeypatch.setattr(qsvd.config, "path_digest", lambda path: "00000000")  # two copies, one key
    with pytest.raises(ConfigError, match=r"evaluation.tasks\[0\] and evaluation.tasks\[1\] differ but would share "
                                          r"the cache path text-test-nall-s0-local-00000000"):
        load_config(_text_tasks(tmp_path / "a.txt", tmp_path / "b.txt"))


def test_config_files_merge_as_snakemake_merges_them(tmp_path):
    (tmp_path / "base.yaml").write_text("rank:\n  budgets: [0.8]\n  r_min: 2\nmethods: [qsvd]\n")
    (tmp_path / "overlay.yaml").write_text("rank:\n  budgets: [0.5]\n")
    merged = qsvd.config.read_config_files([tmp_path / "base.yaml", tmp_path / "overlay.yaml"])
    assert merged == {"rank": {"budgets": [0.5], "r_min": 2}, "methods": ["qsvd"]}


def test_a_yaml_error_is_named_by_file_line_and_column(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("methods: [qsvd\nrank: {}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:2:5: not valid YAML: .*flow sequence at line 1, column 10"):
        qsvd.config.read_config_files([bad])


def test_a_missing_or_non_mapping_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml does not exist; check the path given to --configfile"):
        qsvd.config.read_config_files([tmp_path / "missing.yaml"])
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list\.yaml holds a list, not a mapping"):
        qsvd.config.read_config_files([tmp_path / "list.yaml"])


def test_check_config_runs_the_start_up_checks_on_the_merged_files(tmp_path, monkeypatch, capsys):
    from qsvd.cli import main

    repo = SCHEMA_PATH.parents[2]
    monkeypatch.chdir(repo)
    main(["check-config", "config/test.yaml"])
    assert "config OK (config/config.yaml + config/test.yaml): model demo-test" in capsys.readouterr().out
    (tmp_path / "typo.yaml").write_text("rank:\n  budget: [0.5]\n")
    with pytest.raises(SystemExit, match=r"qsvd check-config: config key rank.*budget"):
        main(["check-config", "config/test.yaml", str(tmp_path / "typo.yaml")])
