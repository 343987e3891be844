"""A paper table laid out as the paper lays it out (rows = its rows, columns = its columns), each cell our score with
its R1/R2, the paper's published value beside it and the difference; cells without a result say "not run"."""

from __future__ import annotations

import statistics
from pathlib import Path

from qsvd.artefacts import atomic_write, provenance, write_json
from qsvd.paper.slices import CellView
from qsvd.paper.tables import PaperTable

NOT_RUN = "not run"


def cell_text(cell: CellView) -> str:
    """`ours (R1 %/R2 %) · paper P · Δ D`; `not run · paper P` without a result; `paper —` without a published value."""
    if cell.ours is None:
        ours = NOT_RUN
    else:
        spread = "" if cell.std is None else f" ± {cell.std:.2f}"
        seeds = "" if cell.status == "complete" else f" [seeds {', '.join(str(r['seed']) for r in cell.results)} of " \
                                                       f"{', '.join(map(str, cell.seeds))}]"
        ours = f"{cell.ours:.2f}{spread} ({cell.r1:.1f}/{cell.r2:.1f}){seeds}"
    if cell.published is None or cell.published.value is None:
        return f"{ours} · paper —"
    difference = "" if cell.difference is None else f" · Δ {cell.difference:+.2f}"
    return f"{ours} · paper {cell.published.value:.2f}{difference}"


def markdown_table(table: PaperTable, cells: list[CellView], run_models: list[str]) -> str:
    """The table, its legend and how complete it is: which models have results, how many cells, how far from the
    paper's values."""
    columns = table.columns()
    by_cell = {(c.model.name, c.row.label, c.column): c for c in cells}
    models = list(dict.fromkeys(c.model for c in cells))
    lines = [f"## Paper Table {table.paper_table}: {table.caption}\n",
             "| model | " + ("β" if table.kind == "beta" else "method") + " | "
             + " | ".join(table.column_label(c) for c in columns) + " |",
             "|---|---" + "|---" * len(columns) + "|"]
    for model in models:
        for row in table.rows:
            texts = [cell_text(by_cell[(model.name, row.label, c)]) if (model.name, row.label, c) in by_cell else ""
                     for c in columns]
            lines.append(f"| {model.label} | {row.label} | " + " | ".join(texts) + " |")
    lines.append(f"\n{_legend(table)}\n")
    lines.append(_completeness(table, cells, run_models, models))
    left_out = [c for c in cells if c.published is not None and c.published.value is None]
    if left_out:
        lines.append("\nCells the source leaves out (no published value is given for them):")
        lines += [f"- {c.model.label}, {c.row.label}, {table.column_label(c.column)}: {c.published.why}" for c in left_out]
    return "\n".join(lines) + "\n"


def _legend(table: PaperTable) -> str:
    seeds = ", ".join(map(str, table.seeds))
    spread = " ± sample std over seeds" if len(table.seeds) > 1 else ""
    quantized = "; quantized scores are simulated quantization, R1 × w/16 and R2 × a/16" if table.kind != "budgets" else ""
    budget = "" if table.kind == "budgets" else f" at {table.budget_kind} {100 * table.budgets[0]:.3g}% before quantization"
    return (f"Cells: our score, %{spread} (our R1 % / R2 %) · the paper's published value · Δ = ours − paper, in "
            f"points. \"{NOT_RUN}\": no result of ours; \"paper —\": no published value recorded "
            f"(qsvd/paper/published.yaml). Seeds of the paper's setting: {seeds}{budget}{quantized}. Table `{table.id}`.")


def _completeness(table: PaperTable, cells: list[CellView], run_models: list[str], models) -> str:
    ran = [c for c in cells if c.status != NOT_RUN]
    complete = sum(c.status == "complete" for c in cells)
    not_run = [m.label for m in models if m.name not in run_models]
    compared = [c for c in cells if c.difference is not None]
    recorded = sum(c.published is not None and c.published.value is not None for c in cells)
    text = (f"Run: {len(ran)} of {len(cells)} cells ({complete} with every seed of the paper's setting); models with "
            f"results: {', '.join(m.label for m in models if m.name in run_models) or 'none'}"
            + (f"; not run: {', '.join(not_run)}" if not_run else "") + ". "
            f"Published values in these cells: {recorded}, of which {len(compared)} beside a result of ours")
    if compared:
        widest = max(compared, key=lambda c: abs(c.difference))
        text += (f": mean Δ {statistics.fmean(c.difference for c in compared):+.2f}, mean |Δ| "
                 f"{statistics.fmean(abs(c.difference) for c in compared):.2f}, largest {widest.difference:+.2f} "
                 f"({widest.model.label}, {widest.row.label}, {table.column_label(widest.column)})")
    return text + "."


def write_table(table: PaperTable, cells: list[CellView], run_models: list[str], json_path: Path,
                markdown_path: Path) -> None:
    """The table as JSON (one record per cell, with its provenance) and as markdown, each written atomically."""
    # not the paper_table rule's stage: `qsvd paper-table --results` assembles it from that rule's slices
    made = provenance("paper_table_assembly", {"table": table.id, "models_run": run_models})
    write_json(json_path, made | {"table": table.id, "paper_table": table.paper_table, "caption": table.caption,
                                  "models_run": run_models, "cells": [c.record() for c in cells]})
    write_markdown(table, cells, run_models, markdown_path)


def write_markdown(table: PaperTable, cells: list[CellView], run_models: list[str], markdown_path: Path) -> None:
    text = markdown_table(table, cells, run_models)
    atomic_write(Path(markdown_path), lambda tmp: tmp.write_text(text))
