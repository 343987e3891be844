"""Start-up checks (qsvd.preflight): every value a job would reject, or whose result it would mislabel, stops the run
before any job, naming the dotted key. In-process, on the demo config and tiny local configs: no job runs."""

import copy
import json

import pytest
import transformers

from qsvd.config import ConfigError, load_config
from qsvd.preflight import SMOLLM2, local_splits, preflight

from tests.test_config import BASE

pytestmark = pytest.mark.unit


def _config(**changes):
    """BASE with dotted-key changes, e.g. `**{"rank.budgets": [0.9]}`."""
    data = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return data


def _refused(data, message):
    with pytest.raises(ConfigError, match=message):
        preflight(load_config(data))


def _task(**task):
    return {"evaluation.tasks": [task]}


def _passages(count: int) -> str:
    return "\n\n".join(" ".join(["word"] * 260) for _ in range(count))


def test_shipped_configs_of_built_and_random_sources_pass():
    from pathlib import Path

    import yaml

    for path in sorted((Path(__file__).parents[1] / "config").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data["model"]["source"] in ("demo", "smollm2", "smolvlm-offline", "random"):
            preflight(load_config(data))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"demo.recipe": {"vision_epoch": 2}}, r"unknown config key demo\.recipe\.vision_epoch"),
        ({"demo.recipe": {"vision_epochs": "two"}}, r"demo\.recipe\.vision_epochs must be float"),
        ({"demo.recipe": {"text_heads": 3}}, r"demo\.recipe\.text_hidden = 128 is not a multiple of demo\.recipe\.text_heads"),
        ({"demo.recipe": {"text_layers": 0}}, r"demo\.recipe\.text_layers = 0"),
        ({"model.source": "smolvlm-offline", "model.family": "smolvlm", "demo.recipe": {"text_hidden": 64}},
         r"unknown config key demo\.recipe\.text_hidden \(model\.source smolvlm-offline\)"),  # its LM is SmolLM2's
        ({"model.family": "llava-next"}, r"model\.family is 'llava-next'.*LlavaForConditionalGeneration.*set model\.family: llava"),
        ({"model.source": "smollm2"}, r"model\.family is 'llava'.*LlamaForCausalLM.*set model\.family: llama"),
        ({"calibration.split": "validation"}, r"calibration\.split: easy-vqa has no split 'validation'"),
        (_task(dataset="sotu", split="dev"), r"evaluation\.tasks\[0\]\.split: sotu has no split 'dev'"),
        (_task(dataset="vizwiz", split="test"), r"evaluation\.tasks\[0\]\.split: vizwiz .* no scorable split 'test'"),
        (_task(dataset="seedbench-img", split="train"),
         r"evaluation\.tasks\[0\]\.split: seedbench-img \(hub lmms-lab/SEED-Bench\) has no scorable split 'train'"),
        (_task(dataset="easy-vqa", split="test", num_samples=100000),
         r"evaluation\.tasks\[0\]\.num_samples = 100000, but easy-vqa test has 9673"),
        (_task(dataset="easy-vqa", split="test", local_dir="."), r"evaluation\.tasks\[0\]\.local_dir: easy-vqa .* takes no local_dir"),
        (_task(dataset="text", split="test"), r"evaluation\.tasks\[0\]\.local_dir: dataset text reads local files"),
    ],
)
def test_what_a_job_would_reject_stops_at_start_up(changes, message):
    _refused(_config(**changes), message)


def test_text_task_split_and_size_are_checked_against_its_files(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_passages(20))  # 18 train and 2 test passages
    preflight(load_config(_config(**_task(dataset="text", split="test", num_samples=2, local_dir=str(corpus)))))
    _refused(_config(**_task(dataset="text", split="test", num_samples=3, local_dir=str(corpus))),
             r"evaluation\.tasks\[0\]\.num_samples = 3, but text test has 2")
    _refused(_config(**_task(dataset="text", split="validation", local_dir=str(corpus))),
             r"evaluation\.tasks\[0\]\.split, evaluation\.tasks\[0\]\.local_dir: .*not 'validation'")


def test_local_copy_of_a_hub_dataset_must_hold_the_split(tmp_path):
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation"]}))
    _refused(_config(**_task(dataset="scienceqa-img", split="test", local_dir=str(saved))),
             r"evaluation\.tasks\[0\]\.split: .*saved holds splits \['train', 'validation'\], not 'test'")
    snapshot = tmp_path / "snapshot" / "data"
    snapshot.mkdir(parents=True)
    (snapshot / "val-00000-of-00001.parquet").touch()
    assert local_splits(snapshot.parent) == {"val"}
    (tmp_path / "parquet-free").mkdir()
    assert local_splits(tmp_path / "parquet-free") is None  # no listing: any split is left to the job


def test_offline_hub_dataset_must_be_in_the_datasets_cache(tmp_path, monkeypatch):
    from datasets.naming import camelcase_to_snakecase

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = _config(**_task(dataset="vizwiz", split="val"))
    _refused(data, r"evaluation\.tasks\[0\]\.dataset: hub dataset lmms-lab/VizWiz-VQA .* not in the datasets cache")
    (tmp_path / f"lmms-lab___{camelcase_to_snakecase('VizWiz-VQA')}" / "default" / "0.0.0" / "abc").mkdir(parents=True)
    preflight(load_config(data))


def test_a_relative_model_path_without_dot_slash_gets_the_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _refused(_config(**{"model.source": "checkpoints/llava"}), r"not in the local cache.*write it as \./checkpoints/llava")
    _refused(_config(**{"model.source": "runs/7b/checkpoint"}), r"model\.source: .* is not a hub id.*write it as \./runs/7b")


@pytest.fixture
def local_llama(tmp_path):
    """A directory holding only a text model's config.json (GQA: 4 heads, 2 KV heads of 16)."""
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp_path / "llama")
    return str(tmp_path / "llama")


def test_family_is_checked_against_the_checkpoints_architecture(local_llama, tmp_path):
    _refused(_config(**{"model.source": local_llama}), r"model\.family is 'llava'.*LlamaForCausalLM.*set model\.family: llama")
    preflight(load_config(_config(**{"model.source": local_llama, "model.family": "llama"})))
    (tmp_path / "empty").mkdir()
    _refused(_config(**{"model.source": str(tmp_path / "empty")}), r"model\.source: cannot read the config")


@pytest.mark.parametrize(
    "changes, message",
    [  # the demo: 2 layers of multi-head attention, width 128 (q, k, v 128 each)
        ({"rank.budget_kind": "R2", "rank.budgets": [0.9]},  # the joint latent caches at most 128 of 256 K/V values
         r"rank\.budgets\[0\] = 0\.9 \(R2\) is out of reach of method qsvd .* full rank.* R2 0\.00390625 .* to 0\.5 \(full rank\)"),
        ({"rank.budgets": [0.5, 1.9]}, r"rank\.budgets\[1\] = 1\.9 \(R1\) .* method qsvd .* to 1\.33333 \(full rank\)"),
        ({"methods": ["qsvd", "asvd"], "rank.budgets": [0.3]},  # Q stays dense: a third of the QKV weights
         r"rank\.budgets\[0\] = 0\.3 \(R1\) is out of reach of method asvd \(kv layout\).*no plan costs that little.* R1 0\.34375"),
        ({"methods": ["svd-llm"], "rank.budget_kind": "rank_fraction", "rank.budgets": [0.001]}, r"method svd-llm .* 0\.0078125"),
        ({"rank.r_min": 129}, r"rank\.r_min = 129 is above the full rank 128 of method qsvd's qkv units"),
    ],
)
def test_budgets_a_method_cannot_reach_are_refused(changes, message):
    _refused(_config(**changes), message)


def test_budget_ranges_follow_the_layout_on_gqa_shapes(local_llama):
    """k and v of 32 rows each (2 KV heads of 16): separate K and V reach their dense cache, joint QKV half of it."""
    llama = {"model.source": local_llama, "model.family": "llama", "rank.budget_kind": "R2"}
    preflight(load_config(_config(**llama, methods=["asvd", "qsvd-kv", "separate"], **{"rank.budgets": [1.0]})))
    preflight(load_config(_config(**llama, **{"rank.budgets": [1.0]})))  # a rank-64 latent caches all 64 K/V values
    _refused(_config(**llama, methods=["asvd"], **{"rank.r_min": 33, "rank.budgets": [0.9]}),
             r"rank\.r_min = 33 is above the full rank 32 of method asvd's k units")


def test_group_size_as_wide_as_every_layer_is_refused():
    quant = {"quantization.formats": ["W4A4"]}
    _refused(_config(**quant, **{"quantization.group_size": 256}),
             r"quantization\.group_size = 256 is at least the widest input .* \(256 columns\)")
    preflight(load_config(_config(**quant, **{"quantization.group_size": 128})))
    preflight(load_config(_config(**{"quantization.formats": ["W16A4"], "quantization.group_size": 256})))  # no weights


@pytest.mark.slow
def test_smollm2_shapes_are_those_of_the_gguf_model(gguf_smollm2):
    config = gguf_smollm2[0].config
    assert {key: getattr(config, key) for key in SMOLLM2} == SMOLLM2
