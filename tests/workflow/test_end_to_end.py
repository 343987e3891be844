"""The real workflow on the reduced demo config: every stage runs, and the report is consistent."""

import csv
import json

import pytest

from tests.workflow.conftest import REPO, snakemake

pytestmark = [pytest.mark.workflow, pytest.mark.slow]


def test_workflow_produces_the_report(finished_workdir):
    report = finished_workdir / "results" / "demo-test" / "report"
    rows = list(csv.DictReader((report / "results.csv").open()))
    assert {r["method"] for r in rows} == {"uncompressed", "qsvd"}
    assert sorted(float(r["R1"]) for r in rows if r["method"] == "qsvd") == sorted(
        float(r["R1"]) for r in rows if r["method"] == "qsvd"
    )
    assert all(float(r["R1"]) <= float(r["budget_value"]) + 1e-9 for r in rows if r["method"] == "qsvd")
    assert "qsvd" in (report / "tables.md").read_text()
    assert (report / "tradeoff.png").stat().st_size > 1000
    plans = list((finished_workdir / "results" / "demo-test").glob("calib~*/svd~*/rank~*/plan.json"))
    assert len(plans) == 2
    plan = json.loads(plans[0].read_text())
    assert plan["config"]["budget_kind"] == "R1" and plan["qsvd_version"] and plan["torch_version"]


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
