"""The DAG re-runs exactly the stages downstream of a changed hyperparameter."""

from pathlib import Path

import pytest
import yaml

from tests.workflow.conftest import snakemake

pytestmark = pytest.mark.workflow

REPO = Path(__file__).resolve().parents[2]


def _config(tmp_path, **overrides):
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


QUANTIZED_LOWRANK = ("quantize_lowrank", "evaluate_quantized_lowrank")  # config/test.yaml quantizes every leaf
QUAROT = ("quantize_dense", "evaluate_quarot")  # and the dense model, calibrated on the calibration set


def _dry_run(workdir, configfile):
    out = snakemake(workdir, "--configfile", str(configfile), "--dry-run", "--cores", "1", "--quiet", "rules")
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout + out.stderr


def _rules(output: str) -> set[str]:
    names = {"materialise_dataset", "demo_model", "activation_stats", "input_gram", "decompose", "importance",
             "rank_plan", "lowrank_model", "evaluate_uncompressed", "evaluate_lowrank", "report",
             "quantize_lowrank", "quantize_dense", "evaluate_quantized_lowrank", "evaluate_quarot"}
    return {line.split()[0] for line in output.splitlines() if line.split() and line.split()[0] in names}


def test_changing_only_the_budget_reruns_plan_onwards(finished_workdir, tmp_path):
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    budgets = config["rank"]["budgets"] + [0.3]
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"rank.budgets": budgets})))
    assert rules == {"rank_plan", "lowrank_model", "evaluate_lowrank", *QUANTIZED_LOWRANK, "report"}


def test_changing_only_beta_reruns_lowrank_model_onwards(finished_workdir, tmp_path):
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"factors.beta": 0.7})))
    assert rules == {"lowrank_model", "evaluate_lowrank", *QUANTIZED_LOWRANK, "report"}


def test_changing_calibration_size_reruns_statistics_onwards(finished_workdir, tmp_path):
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"calibration.num_samples": 5})))
    assert rules == {"materialise_dataset", "activation_stats", "input_gram", "decompose", "importance",
                     "rank_plan", "lowrank_model", "evaluate_lowrank", *QUANTIZED_LOWRANK, *QUAROT, "report"}


def test_unchanged_config_has_nothing_to_do(finished_workdir, tmp_path):
    assert _rules(_dry_run(finished_workdir, _config(tmp_path))) == set()


def test_adding_a_method_reuses_what_it_shares(finished_workdir, tmp_path):
    """joint-uniform shares qsvd's decomposition: only its plans, models and scores are new."""
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, methods=["qsvd", "svd-llm", "joint-uniform"])))
    assert rules == {"rank_plan", "lowrank_model", "evaluate_lowrank", *QUANTIZED_LOWRANK, "report"}


def test_changing_only_bit_widths_reruns_quantization_onwards(finished_workdir, tmp_path):
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"quantization.formats": ["W8A8", "W4A4"]})))
    assert rules == {*QUANTIZED_LOWRANK, *QUAROT, "report"}


def test_beta_ablation_adds_low_rank_settings_only(finished_workdir, tmp_path):
    """QuaRot has no latent: the fixed-β settings are low-rank models only; everything before is reused."""
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"quantization.beta_ablation": [0.2]})))
    assert rules == {*QUANTIZED_LOWRANK, "report"}
