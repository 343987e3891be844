"""The real workflow on the reduced demo config: every stage runs, and the report is consistent."""

import csv
import json

import pytest
import torch

from qsvd.artefacts import read_artefact

from tests.workflow.conftest import REPO, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def test_workflow_produces_the_report(finished_workdir):
    report = finished_workdir / "results" / "demo-test" / "report"
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert {r["method"] for r in rows} == {"uncompressed", "qsvd", "svd-llm", "quarot"}
    for method in ("qsvd", "svd-llm"):
        compressed = [r for r in rows if r["method"] == method and r["quantization"].startswith("none")]
        assert len({r["R1"] for r in compressed}) == 2  # two budgets, two different plans
        assert all(float(r["R1"]) <= float(r["budget_value"]) + 1e-9 for r in compressed)
        quantized = [r for r in rows if r["method"] == method and not r["quantization"].startswith("none")]
        assert {r["quantization"] for r in quantized} == {"W8A8 (simulated quantization)"} and len(quantized) == 2
        # W8A8 halves R1 and R2 (the paper's Table 2 convention)
        assert sorted(2 * float(r["R1"]) for r in quantized) == pytest.approx(sorted(float(r["R1"]) for r in compressed))
    quarot = [r for r in rows if r["method"] == "quarot"]
    full = next(float(r["score"]) for r in rows if r["method"] == "uncompressed")
    assert len(quarot) == 1 and float(quarot[0]["R1"]) == 0.5 and abs(float(quarot[0]["score"]) - full) <= 0.15
    assert "svd-llm" in (report / "tables.md").read_text()
    assert (report / "tradeoff.png").stat().st_size > 1000
    results = finished_workdir / "results" / "demo-test"
    plans = [json.loads(p.read_text()) for p in results.glob("calib~*/svd~*/rank~*/plan.json")]
    assert len(plans) == 4 and sorted(plan["layout"] for plan in plans) == ["joint", "joint", "kv", "kv"]
    assert plans[0]["config"]["budget_kind"] == "R1" and plans[0]["qsvd_version"] and plans[0]["torch_version"]
    gram, manifest = read_artefact(next(results.glob("calib~*/gram")))  # XᵀX for svd-llm's whitening
    assert manifest["config"]["gram"] and gram["layer.0.gram"].dtype == torch.float64


def test_workflow_benchmarks_every_variant_and_reports_them(finished_workdir):
    results = finished_workdir / "results" / "demo-test"
    benchmarks = {path.parent.parent.relative_to(results).as_posix(): json.loads(path.read_text())
                  for path in results.rglob("bench/inference.json")}
    assert len(benchmarks) == 10 and "uncompressed" in benchmarks  # every evaluated variant
    peers = {row["runner"]: row for row in benchmarks["uncompressed"]["rows"]}
    assert peers["dynamic-float32"]["status"] == peers["quantized-fp8"]["status"] == "ok"
    assert {row["status"] for row in peers.values()} <= {"ok", "not installed"}
    for variant, result in benchmarks.items():
        assert result["machine"]["cpu_capability"] and result["machine"]["threads"] == 1
        ok = [row for row in result["rows"] if row["status"] == "ok"]
        assert ok, variant
        assert all(row["execution"] in ("real", "simulated") for row in result["rows"])
        assert all(row["cache_ratio"] == 1.0 for row in ok if row["predicted_cache_bytes"]), variant
        if "quant~" in variant:  # integer kernels, and the dequantized model beside them
            assert {row["execution"] for row in ok} == {"real", "simulated"}
            assert all(row["kernels"].get("int_mm") for row in ok if row["execution"] == "real")
        if variant != "uncompressed":  # every mode measured, or skipped as caching what an earlier one does
            assert {row["cache_mode"] for row in result["rows"]} == {"kv", "latent", "latent_v"}
            assert all(row["status"] == "ok" or "caches what" in row["reason"] for row in result["rows"])
    held = {(variant, row["execution"], row["cache_mode"]): row["cache_bytes"] for variant, result in benchmarks.items()
            for row in result["rows"] if row["status"] == "ok"}
    assert any(held[key] < held[(*key[:2], "kv")] for key in held if key[2] == "latent")  # some plan caches a latent
    report = results / "report"
    table = (report / "benchmark.md").read_text()
    assert "Machine: " in table and "| real |" in table and "| simulated |" in table
    assert len(list(csv.DictReader((report / "benchmark.csv").open()))) == sum(len(r["rows"]) for r in benchmarks.values())
    assert all((report / name).stat().st_size > 1000 for name in
               ("bench_tokens_per_s.png", "bench_cache_bytes.png", "bench_cache_budget.png"))
    assert "benchmark" not in (report / "tables.md").read_text().lower()  # the accuracy report is as it was


def test_bad_config_stops_at_once_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "config" / "test.yaml").read_text().replace("budgets: [0.9, 0.6]", "budgets: [0.9, 3.0]"))
    out = snakemake(tmp_path, "--configfile", str(bad), "--dry-run", "--cores", "1")
    assert out.returncode != 0
    assert "rank.budgets" in out.stderr + out.stdout


def test_unreachable_hub_model_stops_at_once(tmp_path):
    config = (REPO / "config" / "test.yaml").read_text().replace("source: demo", "source: qsvd-test/no-such-model")
    path = tmp_path / "hub.yaml"
    path.write_text(config)
    out = snakemake(tmp_path, "--configfile", str(path), "--dry-run", "--cores", "1")
    assert out.returncode != 0
    assert "qsvd-test/no-such-model" in out.stderr + out.stdout
