"""The paper's tables as data: each table's layout (models, rows, columns, seeds) and the values the paper publishes in
it, read from published.yaml (beside this file) and checked key by key.

A table is one of three kinds, each laid out as the paper lays it out:
- `budgets`: rows are methods (the uncompressed model is the row "FP16"), columns are task x budget, with an FP16
  column per task that only the uncompressed row fills (paper Tables 1/7 and 3);
- `formats`: rows are methods, columns are precision format x task at the table's one budget (Table 2);
- `beta`: rows are values of β (a number in every layer, or learned per layer) for one method, columns are format x
  task at the table's one budget (Table 4).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qsvd.methods import METHODS

PUBLISHED = Path(__file__).with_name("published.yaml")
KINDS = ("budgets", "formats", "beta")
BUDGET_KINDS = ("rank_fraction", "R1", "R2")
FULL = "full"  # the budget of the uncompressed model's column
PER_LAYER = "per layer"  # the β of a quantized low-rank model whose β is chosen per layer (its quant_beta label)
UNCOMPRESSED = "uncompressed"
QUAROT = "quarot"
TASKS = ("scienceqa-img", "vizwiz", "seedbench-img")  # the paper's evaluation tasks (qsvd.data.materialise)
FORMAT = re.compile(r"^W(2|3|4|5|6|7|8|16)A(2|3|4|5|6|7|8|16)$")

_TOP_KEYS = {"sources", "tables"}
_TABLE_KEYS = {"id", "paper_table", "caption", "kind", "budget_kind", "budgets", "tasks", "seeds", "models", "rows",
               "published", "formats"}
_REQUIRED = _TABLE_KEYS - {"formats"}
_ROW_KEYS = {"method", "label", "beta"}
_MODEL_KEYS = {"name", "label"}
_VALUE_KEYS = {"model", "row", "task", "budget", "format", "value", "source", "why"}


class PaperTableError(ValueError):
    """The published-values file, or a results slice, does not fit the paper's tables; the message names the key."""


@dataclass(frozen=True)
class Column:
    """One column: a task at a budget (`budgets` tables: a budget value, or FULL) or in a format (the others)."""

    task: str
    budget: float | str | None = None
    format: str | None = None


@dataclass(frozen=True)
class Row:
    label: str  # as the paper prints it; also the row's name in published values and slices
    method: str  # a qsvd method, "uncompressed" (budgets tables) or "quarot" (formats tables)
    beta: float | str | None = None  # beta tables: a fixed β or PER_LAYER


@dataclass(frozen=True)
class TableModel:
    name: str  # the config's model.name: results/<name>/...
    label: str


@dataclass(frozen=True)
class Published:
    model: str
    row: str
    column: Column
    value: float | None  # None: a cell the source leaves out, said explicitly (`why`)
    source: str
    why: str | None = None


@dataclass(frozen=True)
class PaperTable:
    id: str
    paper_table: str
    caption: str
    kind: str
    budget_kind: str
    budgets: tuple[float, ...]
    tasks: tuple[str, ...]
    seeds: tuple[int, ...]
    models: tuple[TableModel, ...]
    rows: tuple[Row, ...]
    formats: tuple[str, ...] = ()
    published: tuple[Published, ...] = ()

    def columns(self) -> list[Column]:
        if self.kind == "budgets":
            full = [FULL] if any(r.method == UNCOMPRESSED for r in self.rows) else []
            return [Column(task, budget) for task in self.tasks for budget in [*full, *self.budgets]]
        return [Column(task, format=fmt) for fmt in self.formats for task in self.tasks]

    def has_cell(self, row: Row, column: Column) -> bool:
        """Whether the paper's layout has this cell: in a budgets table only the FP16 row fills the FP16 columns."""
        return self.kind != "budgets" or (row.method == UNCOMPRESSED) == (column.budget == FULL)

    def cells(self) -> list[tuple[Row, Column]]:
        return [(row, column) for row in self.rows for column in self.columns() if self.has_cell(row, column)]

    def model(self, name: str) -> TableModel:
        for model in self.models:
            if model.name == name:
                return model
        raise PaperTableError(f"model {name!r} is not a model of {self.id} (paper Table {self.paper_table}); its models "
                              f"are {[m.name for m in self.models]}: run it with one of config/paper/'s configs")

    def row(self, label: str) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        raise PaperTableError(f"{self.id} has no row {label!r}; its rows are {[r.label for r in self.rows]}")

    def published_value(self, model: str, row: str, column: Column) -> Published | None:
        return next((p for p in self.published if (p.model, p.row, p.column) == (model, row, column)), None)

    def column_label(self, column: Column) -> str:
        task = TASK_LABELS.get(column.task, column.task)
        if column.format is not None:
            return f"{column.format} {task}"
        if column.budget == FULL:
            return f"{task} FP16"
        return f"{task} {self.budget_kind} {100 * column.budget:.3g}%"


TASK_LABELS = {"scienceqa-img": "ScienceQA-IMG", "vizwiz": "VizWiz", "seedbench-img": "SEED-Bench-IMG"}


def load_tables(path: str | Path = PUBLISHED) -> list[PaperTable]:
    """Every table of the published-values file, checked: raises PaperTableError naming the file and key."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PaperTableError(f"published-values file {path} does not exist; the shipped one is {PUBLISHED}") from None
    except yaml.YAMLError as error:
        raise PaperTableError(f"{path}: not valid YAML ({error})") from None
    where = str(path)
    _keys(data, _TOP_KEYS, _TOP_KEYS, where)
    sources = data["sources"]
    if not isinstance(sources, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in sources.items()):
        raise PaperTableError(f"{where}: sources must map a name to what it is (a non-empty string)")
    if not isinstance(data["tables"], list) or not data["tables"]:
        raise PaperTableError(f"{where}: tables must be a non-empty list")
    tables = [_table(t, sources, f"{where}: tables[{i}]") for i, t in enumerate(data["tables"])]
    ids = [t.id for t in tables]
    if len(set(ids)) != len(ids):
        raise PaperTableError(f"{where}: table ids repeat ({ids}); give each table its own id")
    return tables


def table_by_id(table_id: str, path: str | Path = PUBLISHED) -> PaperTable:
    tables = load_tables(path)
    for table in tables:
        if table.id == table_id:
            return table
    raise PaperTableError(f"{path} has no table {table_id!r}; its tables are {[t.id for t in tables]} (a config of "
                          "config/paper/ names its table as report_name)")


def _keys(data: Any, allowed: set[str], required: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise PaperTableError(f"{where} must be a mapping, got {type(data).__name__}")
    unknown, missing = sorted(set(data) - allowed), sorted(required - set(data))
    if unknown:
        raise PaperTableError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {sorted(allowed)}")
    if missing:
        raise PaperTableError(f"{where}: missing key {missing[0]!r}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PaperTableError(f"{where} must be a number, got {value!r}")
    return float(value)


def _strings(value: Any, where: str, allowed: tuple[str, ...] | None = None) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value) or len(set(value)) != len(value):
        raise PaperTableError(f"{where} must be a non-empty list of distinct strings, got {value!r}")
    for v in value:
        if allowed is not None and v not in allowed:
            raise PaperTableError(f"{where}: {v!r} is not one of {list(allowed)}")
    return tuple(value)


def _table(data: Any, sources: dict[str, str], where: str) -> PaperTable:
    _keys(data, _TABLE_KEYS, _REQUIRED, where)
    if not isinstance(data["id"], str) or not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", data["id"]):
        raise PaperTableError(f"{where}.id must be a report_name (letters, digits, '.', '_', '-'), got {data['id']!r}")
    where = f"{where} ({data['id']})"
    for key in ("paper_table", "caption"):
        if not isinstance(data[key], str) or not data[key]:
            raise PaperTableError(f"{where}.{key} must be a non-empty string")
    if data["kind"] not in KINDS:
        raise PaperTableError(f"{where}.kind must be one of {list(KINDS)}, got {data['kind']!r}")
    if data["budget_kind"] not in BUDGET_KINDS:
        raise PaperTableError(f"{where}.budget_kind must be one of {list(BUDGET_KINDS)}, got {data['budget_kind']!r}")
    budgets = data["budgets"]
    if not isinstance(budgets, list) or not budgets:
        raise PaperTableError(f"{where}.budgets must be a non-empty list of numbers")
    budgets = tuple(_number(b, f"{where}.budgets[{i}]") for i, b in enumerate(budgets))
    kind = data["kind"]
    if kind != "budgets" and len(budgets) != 1:
        raise PaperTableError(f"{where}.budgets: a {kind} table is laid out at one budget, got {list(budgets)}")
    if (kind == "budgets") == ("formats" in data):
        raise PaperTableError(f"{where}.formats: a {kind} table " + ("is full precision; remove formats" if kind == "budgets"
                              else "has a column per precision format; list them (e.g. [W8A8, W4A4])"))
    formats = _strings(data["formats"], f"{where}.formats") if kind != "budgets" else ()
    for i, fmt in enumerate(formats):
        if not FORMAT.match(fmt):
            raise PaperTableError(f"{where}.formats[{i}] = {fmt!r} is not a precision format like W4A4")
    seeds = data["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                             for s in seeds) or len(set(seeds)) != len(seeds):
        raise PaperTableError(f"{where}.seeds must be a non-empty list of distinct non-negative integers")
    if not isinstance(data["models"], list) or not data["models"]:
        raise PaperTableError(f"{where}.models must be a non-empty list")
    models = []
    for i, model in enumerate(data["models"]):
        _keys(model, _MODEL_KEYS, _MODEL_KEYS, f"{where}.models[{i}]")
        models.append(TableModel(str(model["name"]), str(model["label"])))
    if len({m.name for m in models}) != len(models):
        raise PaperTableError(f"{where}.models: a model is listed twice")
    rows = tuple(_row(r, kind, f"{where}.rows[{i}]") for i, r in enumerate(data["rows"] if isinstance(data["rows"], list) else []))
    if not rows or len({r.label for r in rows}) != len(rows) or len(set(rows)) != len(rows):
        raise PaperTableError(f"{where}.rows must be a non-empty list of distinct rows with distinct labels")
    table = PaperTable(id=data["id"], paper_table=data["paper_table"], caption=data["caption"], kind=kind,
                       budget_kind=data["budget_kind"], budgets=budgets, tasks=_strings(data["tasks"], f"{where}.tasks", TASKS),
                       seeds=tuple(seeds), models=tuple(models), rows=rows, formats=formats)
    published = data["published"]
    if not isinstance(published, list):
        raise PaperTableError(f"{where}.published must be a list (empty where the source gives no value)")
    values = tuple(_published(table, p, sources, f"{where}.published[{i}]") for i, p in enumerate(published))
    seen: dict[tuple, int] = {}
    for i, value in enumerate(values):
        address = (value.model, value.row, value.column)
        if address in seen:
            raise PaperTableError(f"{where}.published[{i}] repeats the cell of published[{seen[address]}]; keep one")
        seen[address] = i
    return dataclasses.replace(table, published=values)


def _row(data: Any, kind: str, where: str) -> Row:
    _keys(data, _ROW_KEYS, {"method", "label"} | ({"beta"} if kind == "beta" else set()), where)
    method, label = data["method"], data["label"]
    extra = {"budgets": (UNCOMPRESSED,), "formats": (QUAROT,), "beta": ()}[kind]
    if method not in (*METHODS, *extra):
        raise PaperTableError(f"{where}.method {method!r} is not one of {[*METHODS, *extra]} (qsvd/methods.py)")
    if not isinstance(label, str) or not label:
        raise PaperTableError(f"{where}.label must be the row's name as the paper prints it")
    beta = None
    if kind == "beta":
        beta = data["beta"]
        if beta != PER_LAYER:
            beta = _number(beta, f"{where}.beta")
            if not 0 <= beta <= 1:
                raise PaperTableError(f"{where}.beta = {beta} is outside [0, 1]")
    elif "beta" in data:
        raise PaperTableError(f"{where}.beta: only a beta table has a β per row")
    return Row(label, method, beta)


def _published(table: PaperTable, data: Any, sources: dict[str, str], where: str) -> Published:
    _keys(data, _VALUE_KEYS, {"model", "row", "task", "value", "source"}, where)
    table.model(data["model"])
    row = table.row(data["row"])
    if table.kind == "budgets":
        if "format" in data or "budget" not in data:
            raise PaperTableError(f"{where}: a cell of {table.id} is named by task and budget (a budget or {FULL!r})")
        budget = data["budget"] if data["budget"] == FULL else _number(data["budget"], f"{where}.budget")
        column = Column(data["task"], budget)
    else:
        if "budget" in data or "format" not in data:
            raise PaperTableError(f"{where}: a cell of {table.id} is named by format and task (its budget is the table's)")
        column = Column(data["task"], format=data["format"])
    if column not in table.columns() or not table.has_cell(row, column):
        raise PaperTableError(f"{where}: {table.id} has no cell at row {row.label!r}, column {column}; its columns are "
                              f"{[table.column_label(c) for c in table.columns()]}")
    source = data["source"]
    if not isinstance(source, str) or not (source in sources or source.startswith("https://")):
        raise PaperTableError(f"{where}.source must name one of the file's sources {sorted(sources)} or be a URL")
    value, why = data["value"], data.get("why")
    if value is None:
        if not isinstance(why, str) or not why:
            raise PaperTableError(f"{where}: value null (a cell the source leaves out) needs `why`")
    else:
        value = _number(value, f"{where}.value")
        if not 0 <= value <= 100:
            raise PaperTableError(f"{where}.value = {value} is not an accuracy in percent")
        if why is not None:
            raise PaperTableError(f"{where}: `why` explains a null value only; remove it")
    return Published(data["model"], row.label, column, value, source, why)
