import csv
import json

import pytest
from PIL import Image

from qsvd.artefacts import DamagedArtefact
from qsvd.stages.report import COLUMNS, DERIVED_COLUMNS, OPTIONAL_COLUMNS, write_report

pytestmark = pytest.mark.unit


def _result(**overrides) -> dict:
    result = {
        "stage": "evaluate", "model": "demo", "method": "qsvd", "budget": "r0.5", "budget_kind": "rank_fraction",
        "budget_value": 0.5, "R1": 2 / 3, "R2": 0.25, "seed": 0, "task": "easy-vqa", "metric": "accuracy",
        "score": 0.91, "num_samples": 500, "quantization": "none (full precision)", "predictions": "x.jsonl",
    }
    return {**result, **overrides}


def _write(tmp_path, results: list[dict]) -> list:
    """Each result as a file; one with `_predictions` [(generated, gold), ...] also gets its predictions file."""
    paths = []
    for i, result in enumerate(results):
        path = tmp_path / "results" / f"{i}.json"
        path.parent.mkdir(exist_ok=True)
        result = dict(result)
        if "_predictions" in result:
            pairs = result.pop("_predictions")
            lines = [json.dumps({"id": str(n), "gold": gold, "generated": text}) + "\n" for n, (text, gold) in enumerate(pairs)]
            (path.parent / f"{i}.predictions.jsonl").write_text("".join(lines))
            result.update(predictions=f"{i}.predictions.jsonl", num_samples=len(pairs))
        path.write_text(json.dumps(result))
        paths.append(path)
    return paths


FULL = dict(method="uncompressed", budget="full", budget_kind="none", budget_value=None, R1=1.0, R2=1.0)
RESULTS = [
    _result(method="svd-llm", budget="r0.5", R1=1 / 3 + 2 / 3, R2=0.5, score=0.70),
    _result(budget="r0.75", budget_value=0.75, R1=1.0, R2=0.375, score=0.90, seed=0),
    _result(budget="r0.75", budget_value=0.75, R1=1.0, R2=0.375, score=0.80, seed=1),
    _result(score=0.85),  # qsvd r0.5 seed 0
    _result(**FULL, score=0.95),
    # lenient 3 of 5, lmms-eval's rule 1 of 5 ("(B)", "The answer is C" are not its answers)
    _result(**FULL, task="scienceqa-img", score=0.6,
            _predictions=[("A", "A"), ("(B)", "B"), ("The answer is C", "C"), ("B", "D"), ("x", "A")]),
    # lenient 2 of 4, lmms-eval's rule 1 of 4 ("A. cat" counts for both, "A cat" for neither)
    _result(task="scienceqa-img", score=0.5, _predictions=[("A. cat", "A"), ("(B)", "B"), ("C", "D"), ("A cat", "A")]),
]


def _report(tmp_path, results=RESULTS):
    out = tmp_path / "report"
    write_report(_write(tmp_path, results), out / "results.csv", out / "tables.md", out / "tradeoff.png")
    return out


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    """The report of RESULTS, written once for the tests that only read it."""
    return _report(tmp_path_factory.mktemp("report"))


def test_csv_has_one_tidy_row_per_result(report_dir):
    out = report_dir
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS + list(OPTIONAL_COLUMNS) + list(DERIVED_COLUMNS) and len(rows) == len(RESULTS)
    easy = [r for r in rows if r["task"] == "easy-vqa"]
    assert [(r["method"], r["budget"], r["seed"]) for r in easy] == [
        ("uncompressed", "full", "0"), ("qsvd", "r0.75", "0"), ("qsvd", "r0.75", "1"), ("qsvd", "r0.5", "0"), ("svd-llm", "r0.5", "0"),
    ]
    assert float(easy[1]["score"]) == 0.9 and float(easy[3]["R1"]) == pytest.approx(2 / 3) and easy[0]["budget_value"] == ""
    assert {r["quantization"] for r in rows} == {"none (full precision)"} and {r["num_samples"] for r in easy} == {"500"}
    assert {r["strict_score"] for r in easy} == {""}  # no lmms-eval rule for easy-vqa
    science = [r for r in rows if r["task"] == "scienceqa-img"]
    assert [(r["method"], float(r["strict_score"])) for r in science] == [("uncompressed", 0.2), ("qsvd", 0.25)]


def test_markdown_tables_per_model_and_task(report_dir):
    text = (report_dir / "tables.md").read_text()
    easy, science = text.split("## demo: easy-vqa (accuracy, %)")[1].split("## demo: scienceqa-img (accuracy, %)")
    lines = [line for line in easy.splitlines() if line.startswith("|")]
    assert lines[0] == "| method | full | r0.75 | r0.5 |"
    assert lines[2] == "| uncompressed | 95.00 (100.0/100.0) |  |  |"  # uncompressed row first
    assert lines[3] == "| qsvd |  | 85.00 ± 7.07 (100.0/37.5) | 85.00 (66.7/25.0) |"  # mean ± std over 2 seeds
    assert lines[4] == "| svd-llm |  |  | 70.00 (100.0/50.0) |"
    assert "Seeds: 0, 1." in easy and "Quantization: none (full precision)." in easy
    lenient, strict = science.split("### demo: scienceqa-img, scored by lmms-eval's rule (accuracy, %)")
    science_lines = [line for line in lenient.splitlines() if line.startswith("|")]
    assert science_lines[0] == "| method | full | r0.5 |" and science_lines[3] == "| qsvd |  | 50.00 (66.7/25.0) |"
    strict_lines = [line for line in strict.splitlines() if line.startswith("|")]
    assert strict_lines[0] == "| method | full | r0.5 |"
    assert strict_lines[2:] == ["| uncompressed | 20.00 (100.0/100.0) |  |", "| qsvd |  | 25.00 (66.7/25.0) |"]
    assert "Lenient minus strict: 32.50 points on average over 2 results, the largest difference +40.00 (uncompressed, full," in strict
    assert "scored by lmms-eval's rule" not in easy  # only tasks that lmms-eval scores by a letter rule


def test_a_multiple_choice_result_without_its_predictions_names_the_rebuild(tmp_path):
    (path,) = _write(tmp_path, [_result(task="seedbench-img", predictions="gone.predictions.jsonl")])
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=r"gone\.predictions\.jsonl, the predictions of .*0\.json.*re-run the evaluate stage"):
        write_report([path], out / "a.csv", out / "a.md", out / "a.png")
    (path,) = _write(tmp_path, [_result(task="seedbench-img", _predictions=[("A", "A")])])
    counted = json.loads(path.read_text()) | {"num_samples": 2}
    path.write_text(json.dumps(counted))
    with pytest.raises(ValueError, match=r"counts 2 samples but its predictions hold 1"):
        write_report([path], out / "a.csv", out / "a.md", out / "a.png")
    assert not out.exists()


def test_several_quantizations_get_their_own_rows(tmp_path):
    results = [_result(**FULL, score=0.9), _result(score=0.8), _result(score=0.7, quantization="W4A4 (simulated)")]
    text = (_report(tmp_path, results) / "tables.md").read_text()
    assert "| qsvd (W4A4 (simulated)) |  | 70.00 (66.7/25.0) |" in text
    assert "| qsvd (none (full precision)) |  | 80.00 (66.7/25.0) |" in text


def test_precision_table_has_methods_as_rows_and_precisions_as_columns(tmp_path):
    """The paper's Table 2 view: one table per budget; uncompressed and QuaRot (no budget) in each."""
    w4 = "W4A4 (simulated quantization)"
    results = [
        _result(**FULL, score=0.9),
        _result(**{**FULL, "method": "quarot", "R1": 0.25, "R2": 0.25}, score=0.5, quantization=w4, seed=0),
        _result(**{**FULL, "method": "quarot", "R1": 0.25, "R2": 0.25}, score=0.7, quantization=w4, seed=1),
        _result(score=0.8),
        _result(score=0.75, quantization=w4, R1=1 / 6, R2=0.0625),
    ]
    text = (_report(tmp_path, results) / "tables.md").read_text()
    table = text.split("### demo: easy-vqa at r0.5, by precision (accuracy, %)")[1]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == f"| method | none (full precision) | {w4} |"
    assert lines[2] == "| uncompressed | 90.00 (100.0/100.0) |  |"
    assert lines[3] == "| quarot |  | 60.00 ± 14.14 (25.0/25.0) |"
    assert lines[4] == "| qsvd | 80.00 (66.7/25.0) | 75.00 (16.7/6.2) |"
    assert "simulated quantization" in table


def test_beta_ablation_gets_its_own_table_and_stays_out_of_the_others(tmp_path):
    """The paper's Table 4 view: per method one row per fixed β and one for per-layer β, formats as columns."""
    def quantized(fmt, beta, score, seed=0, rotate=True, ablation=""):
        label = f"{fmt}{'' if beta == 'per layer' else f', fixed β {beta:g}'}{'' if rotate else ' without rotations'} (simulated quantization)"
        return _result(score=score, quantization=label, seed=seed, quant_format=fmt, quant_beta=beta, rotate=rotate, ablation=ablation)

    results = [
        _result(**FULL, score=0.9),
        _result(**{**FULL, "method": "quarot"}, score=0.5, quantization="W4A4 (simulated quantization)", quant_format="W4A4", rotate=True),
        quantized("W4A4", "per layer", 0.80, seed=0), quantized("W4A4", "per layer", 0.70, seed=1),
        quantized("W4A4", "per layer", 0.10, rotate=False),  # the rotation ablation: not in the β table
        quantized("W4A4", 0.2, 0.60, ablation="beta"), quantized("W8A8", 0.2, 0.85, ablation="beta"),
        quantized("W4A4", 0.0, 0.40, ablation="beta"),
        quantized("W8A8", "per layer", 0.88),
    ]
    text = (_report(tmp_path, results) / "tables.md").read_text()
    table = text.split("### demo: easy-vqa at r0.5, by β (accuracy, %)")[1]
    lines = [line for line in table.splitlines() if line.startswith("|")]
    assert lines[0] == "| method | β | W4A4 | W8A8 |"
    assert lines[2].startswith("| qsvd | 0.0 | 40.00 ") and lines[2].endswith("|  |")
    assert lines[3].startswith("| qsvd | 0.2 | 60.00 ") and "| 85.00 " in lines[3]
    assert lines[4].startswith("| qsvd | per layer | 75.00 ± 7.07 ") and "| 88.00 " in lines[4]
    assert len(lines) == 5  # neither QuaRot nor the unrotated setting
    main = text.split("### demo")[0]
    assert "fixed β" not in main and "fixed β" not in text.split("by precision")[1].split("by β")[0]


def test_plot_is_a_non_empty_png_with_two_panels_per_task(report_dir):
    out = report_dir
    with Image.open(out / "tradeoff.png") as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] / 2 > 100  # two rows of panels
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "tables.md", "tradeoff.png"]  # no temporaries


def test_report_without_uncompressed_or_with_one_result(tmp_path):
    out = _report(tmp_path, [_result()])
    assert "| qsvd | 91.00 (66.7/25.0) |" in (out / "tables.md").read_text()
    assert (out / "tradeoff.png").stat().st_size > 0


def test_errors_name_the_file_and_the_key(tmp_path):
    out = tmp_path / "out"
    args = (out / "a.csv", out / "a.md", out / "a.png")
    with pytest.raises(ValueError, match="no result files"):
        write_report([], *args)
    incomplete = {k: v for k, v in _result().items() if k != "R2"}
    (path,) = _write(tmp_path, [incomplete])
    with pytest.raises(ValueError, match=rf"{path} lacks the key 'R2'"):
        write_report([path], *args)
    (path,) = _write(tmp_path, [_result(score="high")])
    with pytest.raises(ValueError, match=rf"{path}: 'score' must be a number"):
        write_report([path], *args)
    first, second = _write(tmp_path, [_result(), _result()])
    with pytest.raises(ValueError, match=rf"{first} and {second} are the same run"):
        write_report([first, second], *args)
    path.write_text("{not json")
    with pytest.raises(DamagedArtefact, match=rf"{path} is not valid JSON.*Rebuild it"):
        write_report([path], *args)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        write_report([tmp_path / "missing.json"], *args)
    assert not out.exists()  # nothing written on error


def test_perplexity_is_shown_as_it_is_and_labelled_lower_is_better(tmp_path):
    text_results = [_result(**FULL, task="sotu", metric="perplexity", score=23.456), _result(task="sotu", metric="perplexity", score=31.5)]
    out = _report(tmp_path, text_results + [_result(**FULL, score=0.9)])
    text = (out / "tables.md").read_text()
    assert "## demo: sotu (perplexity, lower is better)" in text and "## demo: easy-vqa (accuracy, %)" in text
    assert "| uncompressed | 23.46 (100.0/100.0) |  |" in text and "| qsvd |  | 31.50 (66.7/25.0) |" in text
    assert "| uncompressed | 90.00 (100.0/100.0) |" in text  # accuracy still in percent
    assert (out / "tradeoff.png").stat().st_size > 0
