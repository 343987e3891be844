"""The multiple-choice tasks through every stage, from tiny local copies in the hub's schemas (offline): the data
stage, calibration on them (statistics, SVD, gradients, a Fisher rank plan, the low-rank model), evaluation and the
report, whose lmms-eval score is recomputed from the saved predictions."""

import csv
import json

import datasets
import pytest

from qsvd.artefacts import read_json
from qsvd.data.materialise import materialise_dataset
from qsvd.data.records import read_records
from qsvd.evaluation.answers import strict_accuracy
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.decompose import run_decompose
from qsvd.stages.evaluate import run_evaluate
from qsvd.stages.importance import run_importance
from qsvd.stages.lowrank_model import run_lowrank_model
from qsvd.stages.rank_plan import run_rank_plan
from qsvd.stages.report import write_report
from tests.data.test_materialise import scienceqa_rows, seedbench_rows

LOCAL_COPIES = {"seedbench-img": ("test", seedbench_rows), "scienceqa-img": ("test", scienceqa_rows)}


@pytest.mark.parametrize("task", sorted(LOCAL_COPIES))
def test_a_choice_task_through_every_stage(task, saved_tiny_model, tmp_path):
    split, rows = LOCAL_COPIES[task]
    datasets.DatasetDict({split: rows()}).save_to_disk(str(tmp_path / "local"))
    data = tmp_path / "data"
    materialise_dataset(task, split, None, 0, data, tmp_path / "local")
    records = read_records(data)
    assert len(records) == 3 and {r.task for r in records} == {task}

    source, _, _ = saved_tiny_model("llava")
    stats = run_activation_stats(str(source), "llava", data, tmp_path / "stats")
    decomposition = run_decompose(str(source), "llava", stats, "joint", "abs_mean", 0.5, tmp_path / "svd")
    importance = run_importance(str(source), "llava", decomposition, data, tmp_path / "importance", fisher=True)
    plan = run_rank_plan(decomposition, importance, "fisher", "R1", 0.6, 1, tmp_path / "plan.json")
    lowrank = run_lowrank_model(str(source), "llava", decomposition, plan, 0.2, tmp_path / "lowrank")

    labels = {"model": "tiny", "seed": 0}
    full = dict(labels, method="uncompressed", budget="full", budget_kind="none", budget_value=1.0)
    compressed = dict(labels, method="joint-fib", budget="R1=0.6", budget_kind="R1", budget_value=0.6)
    results = [run_evaluate(str(source), "llava", data, tmp_path / "uncompressed" / f"{task}.json", 4, full),
               run_evaluate(str(lowrank), "llava", data, tmp_path / "joint-fib" / f"{task}.json", 4, compressed)]
    for path in results:
        result = read_json(path)
        assert result["task"] == task and result["metric"] == "accuracy" and result["num_samples"] == 3
        predictions = [json.loads(line) for line in path.with_suffix(".predictions.jsonl").read_text().splitlines()]
        assert [p["gold"] for p in predictions] == [r.answer for r in records]

    out = tmp_path / "report"
    write_report(results, out / "results.csv", out / "tables.md", out / "tradeoff.png")
    with open(out / "results.csv", newline="") as f:
        rows_out = list(csv.DictReader(f))
    for row, path in zip(rows_out, results):  # uncompressed first, as the results were given
        predictions = [json.loads(line) for line in path.with_suffix(".predictions.jsonl").read_text().splitlines()]
        assert float(row["strict_score"]) == pytest.approx(strict_accuracy(task, predictions))
        assert float(row["score"]) == pytest.approx(sum(p["score"] for p in predictions) / 3)
    tables = (out / "tables.md").read_text()
    assert f"## tiny: {task} (accuracy, %)" in tables and f"### tiny: {task}, scored by lmms-eval's rule" in tables
    assert "| joint-fib |  | " in tables
