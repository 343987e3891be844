"""Paper tables from evaluation results: one model's slice of a table (the `paper_table` rule: which of the run's
results fill which cell), and the whole table assembled from the slices found under a results folder, a model
without a slice being "not run" in every cell.

A slice holds only our results (score, R1, R2, seed and file of every result in a cell); the published values are
joined when a table is laid out (qsvd.paper.render), so that an edit of published.yaml needs no re-run.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qsvd.artefacts import provenance, read_json, write_json
from qsvd.paper.tables import FULL, PER_LAYER, QUAROT, Column, PaperTable, PaperTableError, Published, Row, TableModel
from qsvd.stages.report import LOWER_IS_BETTER, read_results

log = logging.getLogger(__name__)

SLICE = "paper_table.json"  # results/<model>/<table id>/paper_table.json
SLICE_MARKDOWN = "paper_table.md"  # beside it: the model's rows of the table (the paper_table rule)
STAGE = "paper_table"
VERSION = 1  # of the slice's layout


def slice_path(results: str | Path, table: PaperTable, model: str) -> Path:
    return Path(results) / model / table.id / SLICE


def cell_of(table: PaperTable, result: dict) -> tuple[Row, Column] | None:
    """The cell of `table` a result (a row of qsvd.stages.report.read_results) fills, or None (a result of the run
    the table does not show: an FP16 leaf of a quantized table, a setting without rotations, ...)."""
    for row in table.rows:
        if row.method != result["method"]:
            continue
        for column in table.columns():
            if column.task == result["task"] and table.has_cell(row, column) and _fills(table, row, column, result):
                return row, column
    return None


def _fills(table: PaperTable, row: Row, column: Column, result: dict) -> bool:
    quantized = result["quant_format"] != ""

    def at_budget(budget: float) -> bool:
        return result["budget_kind"] == table.budget_kind and result["budget_value"] == budget

    if table.kind == "budgets":
        if quantized:
            return False
        return result["budget"] == FULL if column.budget == FULL else at_budget(column.budget)
    if not quantized or result["quant_format"] != column.format or result["rotate"] is not True:
        return False
    if row.method == QUAROT:
        return result["budget"] == FULL
    beta = row.beta if table.kind == "beta" else PER_LAYER
    return at_budget(table.budgets[0]) and _same_beta(result["quant_beta"], beta)


def _same_beta(label: Any, beta: float | str) -> bool:
    if beta == PER_LAYER or label == PER_LAYER:
        return label == beta
    return isinstance(label, (int, float)) and float(label) == float(beta)


def _column_record(column: Column) -> dict:
    return {"task": column.task, "budget": column.budget, "format": column.format}


def write_slice(table: PaperTable, result_files: list[Path], out_path: Path) -> dict:
    """The slice of `table` that the evaluation results of one model's run fill, written to `out_path` (JSON)."""
    if not result_files:
        raise ValueError("the paper table got no result files: give the evaluate stage outputs of the run")
    results = [(path, read_results([path])[0]) for path in map(Path, result_files)]  # checked as the report checks them
    models = sorted({result["model"] for _, result in results})
    if len(models) != 1:
        raise PaperTableError(f"the results given are of models {models}: a slice holds one model's results")
    model = table.model(models[0]).name
    cells: dict[tuple[str, Column], list[dict]] = {}
    unmatched = 0
    for path, result in results:
        cell = cell_of(table, result)
        if cell is None:
            unmatched += 1
            continue
        row, column = cell
        entries = cells.setdefault((row.label, column), [])
        if any(e["seed"] == result["seed"] for e in entries):
            first = next(e["file"] for e in entries if e["seed"] == result["seed"])
            raise PaperTableError(f"result files {first} and {path} both fill {table.id}'s cell {row.label!r}, "
                                  f"{table.column_label(column)} at seed {result['seed']}: give the results of one run")
        entries.append({"seed": result["seed"], "score": result["score"], "metric": result["metric"], "R1": result["R1"],
                        "R2": result["R2"], "num_samples": result["num_samples"], "file": str(path)})
    slice_data = provenance(STAGE, {"table": table.id, "result_files": len(result_files)}) | {
        "version": VERSION, "table": table.id, "model": model, "unmatched_results": unmatched,
        "cells": [{"row": label, **_column_record(column), "results": sorted(entries, key=lambda e: e["seed"])}
                  for (label, column), entries in cells.items()],
    }
    write_json(out_path, slice_data)
    log.info("%s, %s: %d results in %d of its %d cells (%d results of the run are not in the table)", table.id, model,
             len(result_files) - unmatched, len(cells), len(table.cells()), unmatched)
    return slice_data


def read_slice(path: Path, table: PaperTable) -> tuple[str, dict[tuple[str, Column], list[dict]]]:
    """(model, {(row label, column): results}) of a slice written by write_slice, checked against `table`."""
    data = read_json(path)  # its digest: DamagedArtefact names the rebuild
    if not isinstance(data, dict) or data.get("stage") != STAGE or data.get("version") != VERSION:
        raise PaperTableError(f"{path} is not a paper-table slice of version {VERSION}: rebuild it with "
                              f"`snakemake paper_table --forcerun paper_table --configfile config/paper/<its config>`")
    if data["table"] != table.id:
        raise PaperTableError(f"{path} is a slice of {data['table']}, not of {table.id}")
    model = table.model(data["model"]).name
    cells = {}
    for i, cell in enumerate(data["cells"]):
        row = table.row(cell["row"])
        column = Column(cell["task"], cell["budget"], cell["format"])
        if column not in table.columns() or not table.has_cell(row, column):
            raise PaperTableError(f"{path}: cells[{i}] ({row.label}, {column}) is not a cell of {table.id}: rebuild "
                                  "the slice (`--forcerun paper_table`)")
        cells[(row.label, column)] = cell["results"]
    return model, cells


@dataclass(frozen=True)
class CellView:
    """One cell as a table shows it: our results (one per seed), the seeds the paper's setting asks for, the
    published value."""

    model: TableModel
    row: Row
    column: Column
    results: tuple[dict, ...]
    seeds: tuple[int, ...]
    published: Published | None

    def _mean(self, key: str, scale: float = 100.0) -> float | None:
        return statistics.fmean(scale * r[key] for r in self.results) if self.results else None

    @property
    def _scale(self) -> float:
        """Shares (accuracy) in percent, as the paper prints them; perplexity as it is."""
        return 1.0 if any(r["metric"] in LOWER_IS_BETTER for r in self.results) else 100.0

    @property
    def ours(self) -> float | None:
        """Our score (mean over seeds)."""
        return self._mean("score", self._scale)

    @property
    def std(self) -> float | None:
        """The sample standard deviation over seeds; None with fewer than two."""
        scores = [self._scale * r["score"] for r in self.results]
        return statistics.stdev(scores) if len(scores) > 1 else None

    @property
    def r1(self) -> float | None:
        return self._mean("R1")

    @property
    def r2(self) -> float | None:
        return self._mean("R2")

    @property
    def difference(self) -> float | None:
        """Ours minus the paper's, in points; None where either is missing."""
        if self.ours is None or self.published is None or self.published.value is None:
            return None
        return self.ours - self.published.value

    @property
    def status(self) -> str:
        """"not run", "complete" (every seed of the paper's setting) or "partial"."""
        if not self.results:
            return "not run"
        return "complete" if {r["seed"] for r in self.results} == set(self.seeds) else "partial"

    def record(self) -> dict:
        return {"model": self.model.name, "row": self.row.label, **_column_record(self.column), "status": self.status,
                "ours": self.ours, "std": self.std, "R1": self.r1, "R2": self.r2,
                "seeds": [r["seed"] for r in self.results], "expected_seeds": list(self.seeds),
                "published": None if self.published is None else self.published.value,
                "published_source": None if self.published is None else self.published.source,
                "published_why": None if self.published is None else self.published.why,
                "difference": self.difference, "files": [r["file"] for r in self.results]}


def table_cells(table: PaperTable, slices: dict[str, dict[tuple[str, Column], list[dict]]],
                models: list[str] | None = None) -> list[CellView]:
    """Every cell of `table` for `models` (default: all its models), filled from `slices` (model -> its cells)."""
    chosen = [table.model(name) for name in models] if models is not None else list(table.models)
    return [CellView(model, row, column, tuple(slices.get(model.name, {}).get((row.label, column), ())), table.seeds,
                     table.published_value(model.name, row.label, column))
            for model in chosen for row, column in table.cells()]


def assemble(table: PaperTable, results: Path) -> tuple[list[CellView], list[str]]:
    """Every cell of `table` from the slices under `results` (results/<model>/<table id>/paper_table.json); the
    models that have a slice."""
    slices = {}
    for model in table.models:
        path = slice_path(results, table, model.name)
        if path.is_file():
            name, cells = read_slice(path, table)
            if name != model.name:
                raise PaperTableError(f"{path} holds the slice of {name}, not of {model.name}: it was moved; rebuild it")
            slices[name] = cells
    if not slices:
        log.warning("no slice of %s under %s: every cell is 'not run' (run a config of config/paper/ first)", table.id, results)
    return table_cells(table, slices), list(slices)
