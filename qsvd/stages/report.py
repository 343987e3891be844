"""Stage 9 (report): one tidy CSV of every result, markdown tables (methods × budgets) and trade-off plots.

Reads only the evaluate stage's result JSON files and the predictions saved beside them (the inference
benchmark's tables and plots are qsvd.stages.benchmark_report's, a rule of their own). Accuracy scores are
in [0, 1] in the CSV and in percent in the tables and plots; perplexity (lower is better) is shown as it
is. R1 (parameter/FLOP share of QKV) and R2 (KV-cache share) are in [0, 1] in the CSV and in percent
elsewhere. Multiple-choice tasks (ScienceQA-IMG, SEED-Bench-IMG) are scored twice: `score` by qsvd's
lenient letter extraction, `strict_score` by lmms-eval's own rule, recomputed from the saved predictions
(qsvd.evaluation.predictions); the tables show both, and how far apart they are.
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from collections import defaultdict
from pathlib import Path

from qsvd.artefacts import atomic_write, read_json
from qsvd.evaluation.answers import STRICT_RULE_SUMMARIES
from qsvd.evaluation.predictions import strict_score

log = logging.getLogger(__name__)

COLUMNS = ["model", "method", "budget", "budget_kind", "budget_value", "R1", "R2", "seed", "task", "metric", "score", "num_samples", "quantization"]
NUMERIC = ("R1", "R2", "score")
# Labels of quantized results, absent from others: format, β ("per layer" or a number), rotations, and
# "beta" for the β-ablation settings, which get their own table (paper Table 4) instead of the main ones.
OPTIONAL_COLUMNS = ("quant_format", "quant_beta", "rotate", "ablation")
# Recomputed here from the saved predictions, empty where the task has no such rule: lmms-eval's score.
DERIVED_COLUMNS = ("strict_score",)
UNCOMPRESSED = "uncompressed"
LOWER_IS_BETTER = ("perplexity",)  # metrics shown as they are; every other metric is a share, shown in %


def _scale(metric: str) -> float:
    return 1.0 if metric in LOWER_IS_BETTER else 100.0


def _metric_label(metric: str) -> str:
    return f"{metric}, lower is better" if metric in LOWER_IS_BETTER else f"{metric}, %"


def read_results(result_files: list[Path]) -> list[dict]:
    """One row per result file with exactly the report's columns, sorted for stable output."""
    if not result_files:
        raise ValueError("the report got no result files: give at least one evaluate stage output")
    rows, origin = [], {}
    for path in map(Path, result_files):
        if not path.is_file():
            raise FileNotFoundError(f"result file {path} does not exist: run the evaluate stage that writes it")
        result = read_json(path)  # checks its digest and its predictions file: DamagedArtefact names the rebuild
        if not isinstance(result, dict):
            raise ValueError(f"result file {path} holds a {type(result).__name__}, not a JSON object")
        for key in COLUMNS:
            if key not in result:
                raise ValueError(f"result file {path} lacks the key {key!r}: re-run the evaluate stage that wrote it")
        for key in NUMERIC:
            if isinstance(result[key], bool) or not isinstance(result[key], (int, float)):
                raise ValueError(f"result file {path}: {key!r} must be a number, got {result[key]!r}")
        row = {key: result[key] for key in COLUMNS} | {key: result.get(key, "") for key in OPTIONAL_COLUMNS}
        strict = strict_score(path, result)
        row["strict_score"] = "" if strict is None else strict
        identity = tuple(str(row[k]) for k in ("model", "task", "method", "quantization", "budget", "seed"))
        if identity in origin:
            raise ValueError(f"result files {origin[identity]} and {path} are the same run (model, task, method, quantization, budget, seed)")
        origin[identity] = path
        rows.append(row)
    return sorted(rows, key=_row_order)


def _row_order(row: dict) -> tuple:
    return (str(row["model"]), str(row["task"]), row["method"] != UNCOMPRESSED, str(row["method"]),
            str(row["quantization"]), *_budget_order(row), str(row["seed"]))


def _budget_order(row: dict) -> tuple:
    """Full model first, then budgets from the largest value down."""
    value = row["budget_value"] if isinstance(row["budget_value"], (int, float)) else 0.0
    return (row["budget"] != "full", -value, str(row["budget"]))


def _series_label(row: dict, several_quantizations: bool) -> str:
    return f"{row['method']} ({row['quantization']})" if several_quantizations else str(row["method"])


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["task"])].append(row)
    return groups


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _cell(rows: list[dict], key: str = "score") -> str:
    """'score (R1/R2)', R1 and R2 in percent; 'mean ± std' over seeds when there are several."""
    mean, std = _mean_std([_scale(r["metric"]) * r[key] for r in rows])
    score = f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
    r1, r2 = (statistics.fmean(100 * r[k] for r in rows) for k in ("R1", "R2"))
    return f"{score} ({r1:.1f}/{r2:.1f})"


def markdown_tables(rows: list[dict]) -> str:
    """Per (model, task): methods as rows (uncompressed first), budgets as columns."""
    parts = ["# Results\n"]
    for (model, task), everything in _groups(rows).items():
        group = _main(everything)
        budgets = list(dict.fromkeys(r["budget"] for r in sorted(group, key=_budget_order)))
        parts.append(f"## {model}: {task} ({_metric_label(group[0]['metric'])})\n")
        parts.extend(_method_budget_table(group, budgets, "score"))
        seeds = sorted({str(r["seed"]) for r in group})
        quantizations = sorted({str(r["quantization"]) for r in group})
        parts.append(
            f"\nCells: score (R1 % / R2 %), mean ± sample std where several seeds. "
            f"Seeds: {', '.join(seeds)}. Quantization: {'; '.join(quantizations)}.\n"
        )
        parts.extend(_strict_table(model, task, group, budgets))
        parts.extend(_precision_tables(model, task, group, budgets))
        parts.extend(_beta_tables(model, task, everything, budgets))
    return "\n".join(parts)


def _method_budget_table(group: list[dict], budgets: list[str], key: str) -> list[str]:
    """Methods as rows (one per quantization where several), budgets as columns, cells `_cell` of `key`."""
    several = len({r["quantization"] for r in group}) > 1
    labels = list(dict.fromkeys(_series_label(r, several) for r in group))
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for r in group:
        cells[(_series_label(r, several), r["budget"])].append(r)
    lines = ["| method | " + " | ".join(map(str, budgets)) + " |", "|---" * (len(budgets) + 1) + "|"]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(_cell(cells[(label, b)], key) if cells[(label, b)] else "" for b in budgets) + " |")
    return lines


def _strict_table(model: str, task: str, group: list[dict], budgets: list[str]) -> list[str]:
    """The same table scored by lmms-eval's rule, and how far the lenient scores lie above it (points)."""
    if any(r["strict_score"] == "" for r in group):
        return []
    gaps = [(100 * (r["score"] - r["strict_score"]), r) for r in group]
    mean_gap = statistics.fmean(g for g, _ in gaps)
    widest, at = max(gaps, key=lambda gap: abs(gap[0]))
    parts = [f"### {model}: {task}, scored by lmms-eval's rule ({_metric_label(group[0]['metric'])})\n"]
    parts.extend(_method_budget_table(group, budgets, "strict_score"))
    parts.append(
        f"\nThe same generations, scored by lmms-eval's parser for {task} ({STRICT_RULE_SUMMARIES[task]}) instead of "
        f"qsvd's lenient letter extraction; prompts and generation are qsvd's. Lenient minus strict: {mean_gap:.2f} points on average over "
        f"{len(gaps)} results, the largest difference {widest:+.2f} ({at['method']}, {at['budget']}, {at['quantization']}).\n"
    )
    return parts


def _main(rows: list[dict]) -> list[dict]:
    """Every row but the β ablation's."""
    return [r for r in rows if r["ablation"] != "beta"]


def _beta_tables(model: str, task: str, group: list[dict], budgets: list[str]) -> list[str]:
    """The paper's Table 4 view, one table per budget: per method, one row per fixed β and one for β
    chosen per layer; formats as columns. Only settings with the β ablation's rotations are compared."""
    ablation = [r for r in group if r["ablation"] == "beta"]
    if not ablation:
        return []
    rotate = ablation[0]["rotate"]
    formats = list(dict.fromkeys(r["quant_format"] for r in ablation))
    parts = []
    for budget in [b for b in budgets if any(r["budget"] == b for r in ablation)]:
        chosen = [r for r in group if r["budget"] == budget and r["quant_format"] in formats and r["rotate"] == rotate and r["quant_beta"] != ""]
        cells: dict[tuple, list[dict]] = defaultdict(list)
        for r in chosen:
            cells[(str(r["method"]), str(r["quant_beta"]), r["quant_format"])].append(r)
        rows = sorted({(m, b) for m, b, _ in cells}, key=lambda mb: (mb[0], mb[1] == "per layer", mb[1]))
        parts.append(f"### {model}: {task} at {budget}, by β ({_metric_label(group[0]['metric'])})\n")
        parts.append("| method | β | " + " | ".join(formats) + " |")
        parts.append("|---|---" + "|---" * len(formats) + "|")
        for method, beta in rows:
            parts.append(f"| {method} | {beta} | " + " | ".join(_cell(cells[(method, beta, f)]) if cells[(method, beta, f)] else "" for f in formats) + " |")
        parts.append(f"\nFixed β in every layer versus β chosen per layer (paper Eq. 14); rotations {'on' if rotate else 'off'}; simulated quantization.\n")
    return parts


def _precision_tables(model: str, task: str, group: list[dict], budgets: list[str]) -> list[str]:
    """The paper's Table 2 view, one table per budget: methods as rows, precisions as columns
    (full precision first); unbudgeted rows (uncompressed, QuaRot) appear in every table."""
    precisions = sorted({str(r["quantization"]) for r in group}, key=lambda q: (not q.startswith("none"), q))
    if len(precisions) < 2:
        return []
    parts = []
    for budget in [b for b in budgets if b != "full"]:
        chosen = [r for r in group if r["budget"] in (budget, "full")]
        methods = list(dict.fromkeys(str(r["method"]) for r in sorted(chosen, key=lambda r: r["budget"] != "full")))
        cells: dict[tuple, list[dict]] = defaultdict(list)
        for r in chosen:
            cells[(str(r["method"]), str(r["quantization"]))].append(r)
        parts.append(f"### {model}: {task} at {budget}, by precision ({_metric_label(group[0]['metric'])})\n")
        parts.append("| method | " + " | ".join(precisions) + " |")
        parts.append("|---" * (len(precisions) + 1) + "|")
        for method in methods:
            parts.append(f"| {method} | " + " | ".join(_cell(cells[(method, q)]) if cells[(method, q)] else "" for q in precisions) + " |")
        parts.append("\nR1 and R2 fold in the bit widths (R1 × w/16, R2 × a/16); all quantized scores are simulated quantization.\n")
    return parts


def tidy_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS + list(OPTIONAL_COLUMNS) + list(DERIVED_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _plot(rows: list[dict], plot_path: Path) -> None:
    """Per (model, task) two panels, score vs R1 and vs R2; uncompressed as a dashed horizontal line."""
    from matplotlib.figure import Figure  # Figure + savefig render with Agg, without pyplot's global state

    groups = _groups(_main(rows))
    fig = Figure(figsize=(11, 4 * len(groups)), layout="constrained")
    axes = fig.subplots(len(groups), 2, squeeze=False)
    for ((model, task), group), ax_pair in zip(groups.items(), axes):
        several = len({r["quantization"] for r in group}) > 1
        for ax, measure in zip(ax_pair, ("R1", "R2")):
            series: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
            for r in group:
                series[_series_label(r, several)][r["budget"]].append(r)
            for label, by_budget in series.items():
                points = sorted(
                    (statistics.fmean(100 * r[measure] for r in runs), *_mean_std([_scale(r["metric"]) * r["score"] for r in runs]))
                    for runs in by_budget.values()
                )
                if next(iter(by_budget.values()))[0]["method"] == UNCOMPRESSED:
                    ax.axhline(points[0][1], linestyle="--", color="black", alpha=0.7, label=label)
                    continue
                xs, ys, stds = zip(*points)
                ax.errorbar(xs, ys, yerr=[s or 0.0 for s in stds], marker="o", capsize=3, label=label)
            ax.set_xlabel(f"{measure} (%)")
            ax.set_ylabel(_metric_label(group[0]["metric"]))
            if group[0]["metric"] in LOWER_IS_BETTER:
                ax.set_yscale("log")  # perplexity grows multiplicatively under compression
            ax.set_title(f"{model}: {task}, {group[0]['metric']} vs {measure}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    atomic_write(plot_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def write_report(result_files: list[Path], csv_path: Path, markdown_path: Path, plot_path: Path) -> None:
    """Write the tidy CSV, the markdown tables and the trade-off plot, each atomically."""
    rows = read_results(result_files)
    text = tidy_csv(rows)
    atomic_write(Path(csv_path), lambda tmp: tmp.write_text(text))
    tables = markdown_tables(rows)
    atomic_write(Path(markdown_path), lambda tmp: tmp.write_text(tables))
    _plot(rows, Path(plot_path))
    log.info("report of %d results: %s, %s, %s", len(rows), csv_path, markdown_path, plot_path)
