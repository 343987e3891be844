"""Stage 9: one tidy CSV of every result, markdown tables (methods × budgets) and trade-off plots."""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path

from qsvd.artefacts import atomic_write, read_json

COLUMNS = ["model", "method", "budget", "budget_kind", "budget_value", "R1", "R2", "seed", "task", "metric", "score", "num_samples", "quantization"]
UNCOMPRESSED = "uncompressed"


def read_results(result_files: list[Path]) -> list[dict]:
    """One row per result file, with exactly the report's columns."""
    if not result_files:
        raise ValueError("no result files given to the report")
    rows = []
    for path in result_files:
        result = read_json(path)
        missing = [c for c in COLUMNS if c not in result]
        if missing:
            raise KeyError(f"{path} lacks the key {missing[0]!r}: re-run the evaluate stage that wrote it")
        rows.append({c: result[c] for c in COLUMNS})
    return sorted(rows, key=lambda r: (r["model"], r["task"], r["method"] != UNCOMPRESSED, r["method"], -r["R1"], r["seed"]))


def _cell(rows: list[dict]) -> str:
    scores = [100 * r["score"] for r in rows]
    value = f"{scores[0]:.2f}" if len(scores) == 1 else f"{statistics.fmean(scores):.2f} ± {statistics.stdev(scores):.2f}"
    return f"{value} ({100 * rows[0]['R1']:.1f}/{100 * rows[0]['R2']:.1f})"


def markdown_tables(rows: list[dict]) -> str:
    """Per (model, task): methods as rows, budgets as columns, cells 'score (R1%/R2%)'."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["task"])].append(row)
    parts = []
    for (model, task), group in groups.items():
        budgets = list(dict.fromkeys(r["budget"] for r in group if r["method"] != UNCOMPRESSED))
        methods = list(dict.fromkeys(r["method"] for r in group))
        metric = group[0]["metric"]
        parts.append(f"## {model} — {task} ({metric} %, cells: score (R1 % / R2 %))\n")
        parts.append("| method | " + " | ".join(["full"] + budgets) + " |")
        parts.append("|---" * (len(budgets) + 2) + "|")
        for method in methods:
            cells = []
            for budget in ["full"] + budgets:
                matching = [r for r in group if r["method"] == method and r["budget"] == budget]
                cells.append(_cell(matching) if matching else "")
            parts.append(f"| {method} | " + " | ".join(cells) + " |")
        quantization = sorted({r["quantization"] for r in group})
        parts.append(f"\nQuantization: {', '.join(quantization)}. Seeds: {sorted({r['seed'] for r in group})}.\n")
    return "\n".join(parts)


def _plot(rows: list[dict], plot_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys((r["model"], r["task"]) for r in rows))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(10, 4 * len(tasks)), squeeze=False)
    for (model, task), ax_pair in zip(tasks, axes):
        group = [r for r in rows if (r["model"], r["task"]) == (model, task)]
        for ax, measure in zip(ax_pair, ("R1", "R2")):
            for method in dict.fromkeys(r["method"] for r in group):
                points = defaultdict(list)
                for r in group:
                    if r["method"] == method:
                        points[r[measure]].append(100 * r["score"])
                xs = sorted(points)
                ys = [statistics.fmean(points[x]) for x in xs]
                if method == UNCOMPRESSED:
                    ax.axhline(ys[0], linestyle="--", color="grey", label=UNCOMPRESSED)
                else:
                    ax.plot([100 * x for x in xs], ys, marker="o", label=method)
            ax.set_xlabel(f"{measure} (%)")
            ax.set_ylabel(f"{group[0]['metric']} (%)")
            ax.set_title(f"{model}: {task}")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.tight_layout()
    atomic_write(plot_path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def write_report(result_files: list[Path], csv_path: Path, markdown_path: Path, plot_path: Path) -> None:
    """Write the CSV, the markdown tables and the plot from evaluation result files only."""
    rows = read_results([Path(p) for p in result_files])
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(Path(csv_path), lambda tmp: tmp.write_text(buffer.getvalue()))
    atomic_write(Path(markdown_path), lambda tmp: tmp.write_text(markdown_tables(rows)))
    _plot(rows, Path(plot_path))
