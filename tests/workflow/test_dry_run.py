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


# One evaluate, one benchmark and one quantize rule serve every model variant; a job is named by its rule and, for
# those three, by the kind of model its output path says it is (uncompressed, low-rank, quantized low-rank, QuaRot).
PER_VARIANT = ("evaluate", "quantize", "benchmark")
LOWRANK_SCORED = ("evaluate:lowrank", "benchmark:lowrank")
QUANTIZED_LOWRANK = ("quantize:lowrank", "evaluate:quantized", "benchmark:quantized")  # test.yaml quantizes every leaf
QUAROT = ("quantize:quarot", "evaluate:quarot", "benchmark:quarot")  # and the dense model, calibrated as the leaves
REPORTS = ("report", "benchmark_report")


def _dry_run(workdir, configfile):
    out = snakemake(workdir, "--configfile", str(configfile), "--dry-run", "--cores", "1")
    assert out.returncode == 0, out.stderr + out.stdout
    return out.stdout + out.stderr


def _kind(output: str) -> str:
    if "/quarot/" in output:
        return "quarot"
    if "/quant~" in output:
        return "quantized" if "/eval/" in output or "/bench/" in output else "lowrank"
    return "uncompressed" if "/uncompressed/" in output else "lowrank"


def _rules(output: str) -> set[str]:
    """The rules (evaluate and quantize by model kind) of every job a dry run lists."""
    jobs, rule = set(), None
    for line in output.splitlines():
        words = line.split()
        if line.startswith("rule ") and line.rstrip().endswith(":"):
            rule = words[1].rstrip(":")
            if rule not in (*PER_VARIANT, "all"):
                jobs.add(rule)
        elif rule in PER_VARIANT and words and words[0] == "output:":
            jobs.add(f"{rule}:{_kind(words[1])}")
            rule = None
    return jobs


def test_changing_only_the_budget_reruns_plan_onwards(finished_workdir, tmp_path):
    config = yaml.safe_load((REPO / "config" / "test.yaml").read_text())
    budgets = config["rank"]["budgets"] + [0.4]  # svd-llm (Q dense) reaches R1 0.34 at the least
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"rank.budgets": budgets})))
    assert rules == {"rank_plan", "lowrank_model", *LOWRANK_SCORED, *QUANTIZED_LOWRANK, *REPORTS}


def test_changing_only_beta_reruns_lowrank_model_onwards(finished_workdir, tmp_path):
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"factors.beta": 0.7})))
    assert rules == {"lowrank_model", *LOWRANK_SCORED, *QUANTIZED_LOWRANK, *REPORTS}


def test_changing_calibration_size_reruns_statistics_onwards(finished_workdir, tmp_path):
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"calibration.num_samples": 5})))
    assert rules == {"materialise_dataset", "activation_stats", "input_gram", "decompose", "importance",
                     "rank_plan", "lowrank_model", *LOWRANK_SCORED, *QUANTIZED_LOWRANK, *QUAROT, *REPORTS}


def test_unchanged_config_has_nothing_to_do(finished_workdir, tmp_path):
    assert _rules(_dry_run(finished_workdir, _config(tmp_path))) == set()


def test_adding_a_method_reuses_what_it_shares(finished_workdir, tmp_path):
    """joint-uniform shares qsvd's decomposition: only its plans, models and scores are new."""
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, methods=["qsvd", "svd-llm", "joint-uniform"])))
    assert rules == {"rank_plan", "lowrank_model", *LOWRANK_SCORED, *QUANTIZED_LOWRANK, *REPORTS}


def test_changing_only_bit_widths_reruns_quantization_onwards(finished_workdir, tmp_path):
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"quantization.formats": ["W8A8", "W4A4"]})))
    assert rules == {*QUANTIZED_LOWRANK, *QUAROT, *REPORTS}


def test_beta_ablation_adds_low_rank_settings_only(finished_workdir, tmp_path):
    """QuaRot has no latent: the fixed-β settings are low-rank models only; everything before is reused."""
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"quantization.beta_ablation": [0.2]})))
    assert rules == {*QUANTIZED_LOWRANK, *REPORTS}


def test_changing_only_the_benchmark_grid_reruns_the_benchmarks_only(finished_workdir, tmp_path):
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"benchmark.decode_steps": 3})))
    assert rules == {"benchmark:uncompressed", "benchmark:lowrank", "benchmark:quantized", "benchmark:quarot",
                     "benchmark_report"}


def test_changing_only_the_peers_reruns_the_uncompressed_benchmark_only(finished_workdir, tmp_path):
    rules = _rules(_dry_run(finished_workdir, _config(tmp_path, **{"benchmark.peers": ["quantized-fp8"]})))
    assert rules == {"benchmark:uncompressed", "benchmark_report"}


def test_act_order_reaches_the_quantize_jobs_under_a_key_of_its_own(tmp_path):
    config = _config(tmp_path, **{"quantization.weight_method": "gptq", "quantization.act_order": True})
    out = snakemake(tmp_path, "--configfile", str(config), "--dry-run", "--printshellcmds", "--cores", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    quantize = [line for line in out.stdout.splitlines() if "qsvd.cli" in line and " quantize " in line]
    assert quantize and all('"act_order": true' in line and "-gptq-ao-" in line for line in quantize), quantize[:2]
