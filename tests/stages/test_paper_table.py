"""The paper-table report (qsvd.paper): evaluation results as the evaluate stage writes them (qsvd.artefacts.write_json,
with their predictions files) -> one model's slice per run (`qsvd paper-table --evaluations`) -> the whole table from
the slices under results/ (`qsvd paper-table --results`), laid out as the paper does: ours, the published value and
the difference per cell, "not run" where no result is."""

import json

import pytest
import yaml

from qsvd.artefacts import DamagedArtefact, read_json, write_json
from qsvd.cli import main
from qsvd.paper.tables import PaperTableError
from tests.workflow.conftest import REPO, snakemake

pytestmark = pytest.mark.unit

SAMPLES = 200  # scores are multiples of 0.5 %
FULL = {"method": "uncompressed", "budget": "full", "budget_kind": "none", "budget_value": 1.0}


def _lowrank(method: str, budget: float) -> dict:
    """The labels common.smk gives a low-rank leaf (eval_labels)."""
    return {"method": method, "budget": f"R1={budget:g}", "budget_kind": "R1", "budget_value": budget, "allocation": "importance",
            "layout": "joint", "transform": "abs_mean", "beta": 0.2, "alpha": 0.5}


def _quantized(labels: dict, fmt: str, seed: int, beta="per layer", rotate=True, ablation=None) -> dict:
    """The labels common.smk gives a quantized model (quantized_labels): QuaRot when `labels` are the full model's."""
    out = {**labels, "seed": seed, "quant_format": fmt, "rotate": rotate, "weight_method": "rtn"}
    if labels["method"] == "uncompressed":
        out["method"] = "quarot"
    else:
        out["quant_beta"] = beta
        if ablation:
            out["ablation"] = ablation
    fixed = "" if beta == "per layer" or out["method"] == "quarot" else f", fixed β {beta:g}"
    out["quantization"] = f"{fmt}{fixed}{'' if rotate else ' without rotations'} (simulated quantization)"
    return out


def _write_result(results, model: str, variant: str, task: str, labels: dict, percent: float, r1: float, r2: float):
    """One evaluate-stage output: <results>/<model>/<variant>/eval/<task>.json and its predictions, `percent` % right."""
    path = results / model / variant / "eval" / f"{task}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    right = round(percent * SAMPLES / 100)
    predictions = [{"id": str(i), "gold": "A", "generated": "A" if i < right else "B", "score": float(i < right)}
                   for i in range(SAMPLES)]
    (path.with_suffix(".predictions.jsonl")).write_text("".join(json.dumps(p) + "\n" for p in predictions))
    result = {"stage": "evaluate", "model": model, "seed": 0, "quantization": "none (full precision)", **labels,
              "R1": r1, "R2": r2, "task": task, "metric": "vqa_accuracy" if task == "vizwiz" else "accuracy",
              "score": right / SAMPLES, "num_samples": SAMPLES, "predictions": path.with_suffix(".predictions.jsonl").name}
    write_json(path, result)
    return path


def _slice(results, table: str, model: str, files) -> tuple:
    out = results / model / table
    main(["paper-table", "--table", table, "--evaluations", *map(str, files), "--json", str(out / "paper_table.json"),
          "--markdown", str(out / "paper_table.md")])
    return out / "paper_table.json", out / "paper_table.md"


def _whole(results, table: str, out):
    main(["paper-table", "--table", table, "--results", str(results), "--json", str(out / f"{table}.json"),
          "--markdown", str(out / f"{table}.md")])
    return read_json(out / f"{table}.json"), (out / f"{table}.md").read_text()


def _rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines() if line.startswith("|")]


def _cell(table: dict, **address) -> dict:
    (cell,) = [c for c in table["cells"] if all(c[k] == v for k, v in address.items())]
    return cell


@pytest.fixture(scope="module")
def table1(tmp_path_factory):
    """Table 1/7 with a few of LLaVA-1.5-7B's results (and one the table does not show), no other model run."""
    results = tmp_path_factory.mktemp("paper") / "results"
    model = "llava-1.5-7b"
    files = [
        _write_result(results, model, "uncompressed", "scienceqa-img", FULL, 68.5, 1.0, 1.0),
        _write_result(results, model, "svd~a/rank~q06", "scienceqa-img", _lowrank("qsvd", 0.6), 66.0, 0.6, 0.225),
        _write_result(results, model, "svd~a/rank~s053", "scienceqa-img", _lowrank("svd-llm", 0.5333), 53.0, 0.5333, 0.2),
        _write_result(results, model, "svd~a/rank~a04", "vizwiz", _lowrank("asvd", 0.4), 30.0, 0.4, 0.05),
        _write_result(results, model, "svd~a/rank~q06/quant~x", "scienceqa-img",  # not a cell of an FP16 table
                      _quantized(_lowrank("qsvd", 0.6), "W4A4", 0), 40.0, 0.15, 0.056),
    ]
    slice_json, slice_md = _slice(results, "paper-table1-llava", model, files)
    table, markdown = _whole(results, "paper-table1-llava", results.parent)
    return {"results": results, "slice": slice_json, "slice_md": slice_md.read_text(), "table": table, "markdown": markdown}


def test_the_whole_table_is_laid_out_as_the_paper_does(table1):
    rows = _rows(table1["markdown"])
    budgets = ["R1 60%", "R1 53.3%", "R1 46.7%", "R1 40%"]
    assert rows[0] == ["model", "method", "ScienceQA-IMG FP16", *[f"ScienceQA-IMG {b}" for b in budgets],
                       "VizWiz FP16", *[f"VizWiz {b}" for b in budgets]]
    body = rows[2:]
    models = ["LLaVA-1.5-7B", "LLaVA-1.5-13B", "LLaVA-NeXT-7B", "LLaVA-NeXT-13B"]
    methods = ["FP16", "ASVD", "SVD-LLM", "QSVD-noQ"]
    assert [row[:2] for row in body] == [[m, r] for m in models for r in methods]
    fp16, asvd, svd_llm, qsvd = body[:4]
    assert fp16[2] == "68.50 (100.0/100.0) · paper 68.01 · Δ +0.49"
    assert fp16[3:7] == ["", "", "", ""] and qsvd[2] == ""  # FP16 fills only its own columns, methods only budgets
    assert qsvd[3:7] == ["66.00 (60.0/22.5) · paper 66.12 · Δ -0.12", "not run · paper 65.64", "not run · paper 64.06",
                         "not run · paper 61.68"]
    assert svd_llm[3:7] == ["not run · paper 55.23", "53.00 (53.3/20.0) · paper —", "not run · paper —",
                            "not run · paper 51.17"]
    assert asvd[11] == "30.00 (40.0/5.0) · paper —"  # VizWiz: no published value recorded
    assert fp16[7] == "not run · paper —"
    thirteen = body[4:8]
    assert thirteen[0][2] == "not run · paper 71.78" and thirteen[3][3] == "not run · paper 71.79"
    assert all(c in ("", "not run · paper —") or c.startswith("not run · paper ") for row in body[4:] for c in row[2:])


def test_the_table_says_how_complete_it_is(table1):
    text = table1["markdown"]
    assert "Run: 4 of 104 cells (4 with every seed of the paper's setting)" in text
    assert "models with results: LLaVA-1.5-7B; not run: LLaVA-1.5-13B, LLaVA-NeXT-7B, LLaVA-NeXT-13B." in text
    assert "Published values in these cells: 19, of which 2 beside a result of ours: mean Δ +0.18" in text
    assert "LLaVA-1.5-7B, SVD-LLM, ScienceQA-IMG R1 53.3%: the source gives only the endpoints" in text


def test_the_table_json_has_ours_the_paper_and_the_difference_per_cell(table1):
    table = table1["table"]
    assert table["models_run"] == ["llava-1.5-7b"] and len(table["cells"]) == 104
    qsvd = _cell(table, model="llava-1.5-7b", row="QSVD-noQ", task="scienceqa-img", budget=0.6)
    assert qsvd["status"] == "complete" and qsvd["ours"] == pytest.approx(66.0) and qsvd["published"] == 66.12
    assert qsvd["difference"] == pytest.approx(-0.12) and qsvd["R1"] == pytest.approx(60.0) and qsvd["seeds"] == [0]
    assert qsvd["published_source"] == "method-notes" and qsvd["files"][0].endswith("rank~q06/eval/scienceqa-img.json")
    missing = _cell(table, model="llava-next-7b", row="FP16", task="scienceqa-img", budget="full")
    assert (missing["status"], missing["ours"], missing["published"], missing["difference"]) == ("not run", None, 69.51, None)
    left_out = _cell(table, model="llava-1.5-7b", row="ASVD", task="scienceqa-img", budget=0.5333)
    assert left_out["published"] is None and "endpoints" in left_out["published_why"]


def test_a_slice_holds_only_its_models_results_and_its_rows(table1):
    data = read_json(table1["slice"])
    assert (data["stage"], data["table"], data["model"], data["unmatched_results"]) == ("paper_table", "paper-table1-llava", "llava-1.5-7b", 1)
    assert sorted((c["row"], c["task"], c["budget"]) for c in data["cells"]) == [
        ("ASVD", "vizwiz", 0.4), ("FP16", "scienceqa-img", "full"), ("QSVD-noQ", "scienceqa-img", 0.6),
        ("SVD-LLM", "scienceqa-img", 0.5333)]
    assert all("published" not in c for c in data["cells"])  # joined when laid out, so edits need no re-run
    assert [row[0] for row in _rows(table1["slice_md"])[2:]] == ["LLaVA-1.5-7B"] * 4
    assert "65.64" in table1["slice_md"] and "LLaVA-1.5-13B" not in table1["slice_md"].split("Run:")[0]


def test_a_damaged_slice_is_refused_with_its_rebuild(table1, tmp_path):
    results = tmp_path / "results"
    target = results / "llava-1.5-7b" / "paper-table1-llava"
    target.mkdir(parents=True)
    damaged = json.loads(table1["slice"].read_text())
    damaged["cells"][0]["results"][0]["score"] = 0.99
    (target / "paper_table.json").write_text(json.dumps(damaged))
    with pytest.raises(DamagedArtefact, match="paper_table.json"):
        _whole(results, "paper-table1-llava", tmp_path)


def test_quantized_tables_average_seeds_and_show_partial_cells(tmp_path):
    """Table 2: formats x tasks, five seeds; QuaRot is the dense model quantized; settings the table does not show
    (no rotations, a fixed β of the β ablation, the FP16 leaf) stay out of it."""
    results, model = tmp_path / "results", "llava-1.5-7b"
    qsvd, asvd = _lowrank("qsvd", 1.0), _lowrank("asvd", 1.0)
    files = [_write_result(results, model, f"q/quant~w4-s{s}", "scienceqa-img", _quantized(qsvd, "W4A4", s), p, 0.25, 0.09375)
             for s, p in enumerate([55.0, 56.0, 54.0, 55.5, 54.5])]
    files += [_write_result(results, model, f"q/quant~w8-s{s}", "scienceqa-img", _quantized(qsvd, "W8A8", s), 67.5, 0.5, 0.1875)
              for s in (0, 1)]
    files += [_write_result(results, model, f"quarot/quant~w4-s{s}", "scienceqa-img", _quantized(FULL, "W4A4", s), 49.0, 0.25, 0.25)
              for s in range(5)]
    files += [_write_result(results, model, "a/quant~w4-s0", "vizwiz", _quantized(asvd, "W4A4", 0), 40.0, 0.25, 0.0625),
              _write_result(results, model, "q/quant~w4-norot", "scienceqa-img", _quantized(qsvd, "W4A4", 0, rotate=False), 20.0, 0.25, 0.09375),
              _write_result(results, model, "q/quant~w4-b04", "scienceqa-img", _quantized(qsvd, "W4A4", 0, beta=0.4, ablation="beta"), 54.0, 0.25, 0.09375),
              _write_result(results, model, "q", "scienceqa-img", qsvd, 66.0, 1.0, 0.375)]
    slice_json, _ = _slice(results, "paper-table2", model, files)
    assert read_json(slice_json)["unmatched_results"] == 3
    table, markdown = _whole(results, "paper-table2", tmp_path)
    rows = _rows(markdown)
    tasks = ["ScienceQA-IMG", "VizWiz", "SEED-Bench-IMG"]
    assert rows[0] == ["model", "method", *[f"{f} {t}" for f in ("W8A8", "W8A4", "W4A4") for t in tasks]]
    assert [r[1] for r in rows[2:]] == ["QuaRot", "QASVD", "QSVD"]
    quarot, qasvd, qsvd_row = rows[2:]
    assert qsvd_row[8] == "55.00 ± 0.79 (25.0/9.4) · paper 55.16 · Δ -0.16"
    assert qsvd_row[2] == "67.50 ± 0.00 (50.0/18.8) [seeds 0, 1 of 0, 1, 2, 3, 4] · paper 67.57 · Δ -0.07"
    assert quarot[8] == "49.00 ± 0.00 (25.0/25.0) · paper 49.08 · Δ -0.08" and quarot[2] == "not run · paper —"
    assert qasvd[9] == "40.00 (25.0/6.2) [seeds 0 of 0, 1, 2, 3, 4] · paper —"
    assert _cell(table, row="QSVD", format="W8A8", task="scienceqa-img")["status"] == "partial"
    assert _cell(table, row="QSVD", format="W4A4", task="scienceqa-img")["seeds"] == [0, 1, 2, 3, 4]
    assert "Run: 4 of 27 cells (2 with every seed of the paper's setting)" in markdown


def test_beta_rows_take_the_ablation_and_the_learned_beta(tmp_path):
    results, model, qsvd = tmp_path / "results", "llava-1.5-7b", _lowrank("qsvd", 1.0)
    files = [_write_result(results, model, f"q/quant~b{beta}", "scienceqa-img",
                           _quantized(qsvd, "W4A4", 0, beta=beta, ablation=None if beta == "per layer" else "beta"), p, 0.25, 0.09375)
             for beta, p in ((0.0, 54.5), ("per layer", 55.0), (0.4, 55.0), (0.8, 6.0))]
    _slice(results, "paper-table4", model, files)
    _, markdown = _whole(results, "paper-table4", tmp_path)
    rows = _rows(markdown)
    assert rows[0] == ["model", "β", "W4A4 ScienceQA-IMG"]
    assert [r[1:] for r in rows[2:]] == [
        ["β = 0", "54.50 (25.0/9.4) [seeds 0 of 0, 1, 2, 3, 4] · paper 54.53 · Δ -0.03"],
        ["learned β", "55.00 (25.0/9.4) [seeds 0 of 0, 1, 2, 3, 4] · paper 55.16 · Δ -0.16"],
        ["β = 0.4", "55.00 (25.0/9.4) [seeds 0 of 0, 1, 2, 3, 4] · paper 54.83 · Δ +0.17"],
        ["β = 0.8", "6.00 (25.0/9.4) [seeds 0 of 0, 1, 2, 3, 4] · paper 6.09 · Δ -0.09"]]


@pytest.mark.parametrize("case, message", [
    ("two runs", r"both fill paper-table1-llava's cell 'QSVD-noQ', ScienceQA-IMG R1 60% at seed 0: give the results of one run"),
    ("two models", r"the results given are of models \['llava-1.5-13b', 'llava-1.5-7b'\]: a slice holds one model's"),
    ("other model", r"model 'demo' is not a model of paper-table1-llava .*run it with one of config/paper/'s configs"),
    ("unknown table", r"has no table 'paper-table9'; its tables are \['paper-table1-llava'"),
])
def test_what_does_not_fit_the_table_is_refused_by_name(tmp_path, case, message):
    results = tmp_path / "results"
    one = _write_result(results, "llava-1.5-7b", "a", "scienceqa-img", _lowrank("qsvd", 0.6), 60.0, 0.6, 0.225)
    other = {"two runs": ("llava-1.5-7b", "b"), "two models": ("llava-1.5-13b", "a"), "other model": ("demo", "a"),
             "unknown table": ("llava-1.5-7b", "c")}[case]
    two = _write_result(results, *other, "scienceqa-img", _lowrank("qsvd", 0.6 if case != "unknown table" else 0.4), 61.0, 0.6, 0.225)
    files = [two] if case == "other model" else [one, two]
    table = "paper-table9" if case == "unknown table" else "paper-table1-llava"
    with pytest.raises(PaperTableError, match=message):
        _slice(results, table, "llava-1.5-7b", files)
    assert not (results / "llava-1.5-7b" / table / "paper_table.json").exists()


@pytest.mark.workflow
def test_the_rule_writes_the_slice_of_the_configs_table(tmp_path):
    """`snakemake paper_table` with a config naming a table as report_name: one job over the run's evaluation results,
    the published values an input (an edit re-runs it). Dry run on the offline test config."""
    overlay = tmp_path / "paper.yaml"
    overlay.write_text(yaml.safe_dump({"report_name": "paper-table1-llava", "benchmark": {"enabled": False}}))
    out = snakemake(tmp_path, "paper_table", "--dry-run", "--printshellcmds", "--configfile",
                    str(REPO / "config" / "test.yaml"), str(overlay))
    assert out.returncode == 0, out.stderr[-5000:]
    shell = next(line for line in out.stdout.splitlines() if "qsvd.cli paper-table" in line)
    assert "--table paper-table1-llava" in shell and f"--published {REPO}/qsvd/paper/published.yaml" in shell
    assert "--json results/demo-test/paper-table1-llava/paper_table.json" in shell
    assert shell.count("/eval/easy-vqa-test-n40-s0.json") > 1
    # The default target builds it too where report_name names a paper table, and only there.
    default = snakemake(tmp_path, "--dry-run", "--configfile", str(REPO / "config" / "test.yaml"), str(overlay))
    assert default.returncode == 0 and "rule paper_table:" in default.stdout, default.stderr[-3000:]
    plain = snakemake(tmp_path, "--dry-run", "--configfile", str(REPO / "config" / "test.yaml"))
    assert plain.returncode == 0 and "rule paper_table:" not in plain.stdout, plain.stderr[-3000:]
