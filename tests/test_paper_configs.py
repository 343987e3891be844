"""The paper's tables as configs and data: every config of config/paper/ loads as Snakemake would give it (over
config/config.yaml) and asks for exactly the paper's rows and columns; the published-values file
(qsvd/paper/published.yaml) records the paper's numbers of method.md §6 and no others, each with its table, row,
column and source, and refuses what does not fit."""

import copy
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from qsvd.config import load_config
from qsvd.paper.tables import PUBLISHED, PER_LAYER, PaperTableError, load_tables, table_by_id
from qsvd.preflight import check_budgets, check_family, config_shapes
from qsvd.sources.random_model import architecture_config

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIGS = REPO / "config" / "paper"
LLAVA_BUDGETS = (0.6, 8 / 15, 7 / 15, 0.4)  # R1 = 60, 53.3, 46.7, 40 % (r = 0.45, 0.4, 0.35, 0.3 E), method.md §2, §6
SMOLVLM_BUDGETS = (1.0, 0.9, 0.8, 0.7)
SQA, VIZWIZ, SEED = ("scienceqa-img", "test"), ("vizwiz", "val"), ("seedbench-img", "test")
FP16_METHODS = {"asvd", "svd-llm", "qsvd"}  # ASVD, SVD-LLM, QSVD-noQ
FIVE_SEEDS = (0, 1, 2, 3, 4)


def _fp16(table, name, source, budgets=LLAVA_BUDGETS, tasks=(SQA, VIZWIZ), methods=FP16_METHODS):
    return dict(table=table, name=name, source=source, methods=methods, budgets=budgets, tasks=tasks, formats=(),
                seeds=(0,), quarot=False, beta_ablation=())


# What each config must ask for: the paper's grid as the brief and method.md §6 give it, not read from the data file.
EXPECTED = {
    "table1-llava-1.5-7b.yaml": _fp16("paper-table1-llava", "llava-1.5-7b", "llava-hf/llava-1.5-7b-hf"),
    "table1-llava-1.5-13b.yaml": _fp16("paper-table1-llava", "llava-1.5-13b", "llava-hf/llava-1.5-13b-hf"),
    "table1-llava-next-7b.yaml": _fp16("paper-table1-llava", "llava-next-7b", "llava-hf/llava-v1.6-vicuna-7b-hf"),
    "table1-llava-next-13b.yaml": _fp16("paper-table1-llava", "llava-next-13b", "llava-hf/llava-v1.6-vicuna-13b-hf"),
    "table1-smolvlm-instruct.yaml": _fp16("paper-table1-smolvlm", "smolvlm-instruct", "HuggingFaceTB/SmolVLM-Instruct",
                                          budgets=SMOLVLM_BUDGETS, tasks=(SQA,)),
    "table2-llava-1.5-7b.yaml": dict(table="paper-table2", name="llava-1.5-7b", source="llava-hf/llava-1.5-7b-hf",
                                     methods={"qsvd", "asvd"}, budgets=(1.0,), tasks=(SQA, VIZWIZ, SEED),
                                     formats=("W8A8", "W8A4", "W4A4"), seeds=FIVE_SEEDS, quarot=True, beta_ablation=()),
    "table3-llava-1.5-13b.yaml": _fp16("paper-table3", "llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", tasks=(SQA,),
                                       methods={"joint-uniform", "joint-fib", "qsvd"}),
    "table4-llava-1.5-7b.yaml": dict(table="paper-table4", name="llava-1.5-7b", source="llava-hf/llava-1.5-7b-hf",
                                     methods={"qsvd"}, budgets=(1.0,), tasks=(SQA,), formats=("W4A4",), seeds=FIVE_SEEDS,
                                     quarot=False, beta_ablation=(0.0, 0.4, 0.8)),
}
# Architectures shipped in qsvd/sources/architectures (offline): their budgets are checked as start-up would.
ARCHITECTURES = {"llava-hf/llava-1.5-7b-hf": "llava-1.5-7b", "llava-hf/llava-v1.6-vicuna-7b-hf": "llava-next-7b",
                 "HuggingFaceTB/SmolVLM-Instruct": "smolvlm-instruct"}


def _as_snakemake_gives_it(path: Path) -> dict:
    """config/config.yaml (the Snakefile's configfile:) with the paper config over it, as `--configfile` merges."""
    merged: dict = {}
    for layer in (REPO / "config" / "config.yaml", path):
        update_config(merged, yaml.safe_load(layer.read_text()))
    return merged


def test_every_paper_config_is_checked():
    assert sorted(p.name for p in PAPER_CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_paper_config_asks_for_exactly_the_papers_rows_and_columns(name):
    want = EXPECTED[name]
    config = load_config(_as_snakemake_gives_it(PAPER_CONFIGS / name))
    assert (config.report_name, config.model.name, config.model.source) == (want["table"], want["name"], want["source"])
    assert set(config.methods) == want["methods"] and len(config.methods) == len(want["methods"])
    assert config.rank.budget_kind == "R1" and config.rank.budgets == pytest.approx(want["budgets"], abs=1e-4)
    assert [(t.dataset, t.split, t.num_samples) for t in config.evaluation.tasks] == [(*t, None) for t in want["tasks"]]
    assert config.evaluation.max_new_tokens == 16  # greedy, at most 16 new tokens (method.md §5)
    calibration = config.calibration
    assert (calibration.dataset, calibration.split, calibration.num_samples, calibration.seed) == ("scienceqa-img", "train", 256, 0)
    quant = config.quantization
    assert quant.formats == want["formats"] and (quant.quarot and bool(quant.formats)) == want["quarot"]  # QuaRot runs
    assert quant.beta_ablation == want["beta_ablation"]
    if want["formats"]:
        assert quant.seeds == want["seeds"] and quant.beta is None and quant.rotate and quant.vision  # β learned per layer
    else:
        assert (calibration.seed,) == want["seeds"]
    assert not config.benchmark.enabled  # accuracy tables: config/config.yaml's demo benchmark grid stays off


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_paper_config_runs_the_layout_its_table_declares(name):
    """The config and its table in published.yaml agree: what the run produces is what the table lays out."""
    config = load_config(_as_snakemake_gives_it(PAPER_CONFIGS / name))
    table = table_by_id(config.report_name)
    table.model(config.model.name)
    assert table.budget_kind == config.rank.budget_kind and table.budgets == config.rank.budgets
    assert table.tasks == tuple(t.dataset for t in config.evaluation.tasks) and table.formats == config.quantization.formats
    methods = {r.method for r in table.rows} - {"uncompressed", "quarot"}
    quarot = config.quantization.quarot and bool(config.quantization.formats)  # QuaRot models run
    assert methods == set(config.methods) and ("quarot" in {r.method for r in table.rows}) == quarot
    if table.kind == "beta":
        assert {r.beta for r in table.rows} == {PER_LAYER, *config.quantization.beta_ablation}
    assert table.seeds == (config.quantization.seeds if table.kind != "budgets" else (config.calibration.seed,))


def test_every_model_of_every_table_has_one_config():
    pairs = [(d["table"], d["name"]) for d in EXPECTED.values()]
    assert len(pairs) == len(set(pairs))
    assert sorted(pairs) == sorted((t.id, m.name) for t in load_tables() for m in t.models)


@pytest.mark.parametrize("name", sorted(n for n, d in EXPECTED.items() if d["source"] in ARCHITECTURES))
def test_the_budgets_are_within_reach_of_the_models_shapes(name):
    """What start-up checks of the budgets and family, on the shipped copy of the model's config (the hub ids are not
    reachable offline; the 13B models have no shipped copy)."""
    config = load_config(_as_snakemake_gives_it(PAPER_CONFIGS / name))
    shapes = config_shapes(architecture_config(ARCHITECTURES[config.model.source], None, None), config.model.source)
    check_family(config, shapes)
    check_budgets(config, shapes)


# method.md §6, the paper's numbers: (table, model, row, task, budget or format) -> value. Nothing else may be recorded
# from that source; SVD-LLM's and ASVD's rows are given by their endpoints only.
T1, T1S = "paper-table1-llava", "paper-table1-smolvlm"
L7, L13, N7, S = "llava-1.5-7b", "llava-1.5-13b", "llava-next-7b", "smolvlm-instruct"
B = (0.6, 0.5333, 0.4667, 0.4)
METHOD_NOTES = {
    (T1, L7, "FP16", "scienceqa-img", "full"): 68.01,
    **{(T1, L7, "QSVD-noQ", "scienceqa-img", b): v for b, v in zip(B, (66.12, 65.64, 64.06, 61.68))},
    (T1, L7, "SVD-LLM", "scienceqa-img", 0.6): 55.23, (T1, L7, "SVD-LLM", "scienceqa-img", 0.4): 51.17,
    (T1, L7, "ASVD", "scienceqa-img", 0.6): 22.36, (T1, L7, "ASVD", "scienceqa-img", 0.4): 10.81,
    (T1, L13, "FP16", "scienceqa-img", "full"): 71.78,
    **{(T1, L13, "QSVD-noQ", "scienceqa-img", b): v for b, v in zip(B, (71.79, 71.74, 71.74, 70.80))},
    (T1, N7, "FP16", "scienceqa-img", "full"): 69.51,
    **{(T1, N7, "QSVD-noQ", "scienceqa-img", b): v for b, v in zip(B, (69.91, 68.22, 67.03, 65.15))},
    (T1S, S, "FP16", "scienceqa-img", "full"): 84.53,
    **{(T1S, S, "QSVD-noQ", "scienceqa-img", b): v for b, v in zip((1.0, 0.9, 0.8, 0.7), (83.78, 81.70, 79.57, 77.64))},
    **{("paper-table2", L7, "QSVD", task, fmt): v
       for fmt, values in (("W8A8", (67.57, 54.06, 60.20)), ("W8A4", (65.61, 52.18, 58.49)), ("W4A4", (55.16, 52.05, 52.69)))
       for task, v in zip(("scienceqa-img", "vizwiz", "seedbench-img"), values)},
    ("paper-table2", L7, "QuaRot", "scienceqa-img", "W4A4"): 49.08,
    **{("paper-table3", L13, "Uniform rank", "scienceqa-img", b): v for b, v in zip(B, (71.84, 70.40, 70.40, 67.72))},
    **{("paper-table3", L13, "QSVD", "scienceqa-img", b): v for b, v in zip(B, (71.79, 71.74, 71.74, 70.80))},
    **{("paper-table4", L7, row, "scienceqa-img", "W4A4"): v
       for row, v in (("β = 0", 54.53), ("learned β", 55.16), ("β = 0.4", 54.83), ("β = 0.8", 6.09))},
}


def test_the_published_values_are_the_papers_numbers_each_with_its_table_row_column_and_source():
    tables = load_tables()
    assert [t.id for t in tables] == [T1, T1S, "paper-table2", "paper-table3", "paper-table4"]
    assert [t.paper_table for t in tables] == ["1/7", "1/7", "2", "3", "4"]
    recorded = {}
    for table in tables:
        for value in table.published:
            assert value.source and value.row in [r.label for r in table.rows] and value.column in table.columns()
            column = value.column.format if table.kind != "budgets" else value.column.budget
            if value.value is None:
                assert value.why  # a cell the source leaves out says so
            elif value.source == "method-notes":
                recorded[(table.id, value.model, value.row, value.column.task, column)] = value.value
            else:
                assert value.source.startswith("https://")  # a value read from the paper itself names its URL
    assert recorded == METHOD_NOTES
    nulls = [(t.id, v.model, v.row, v.column.budget) for t in tables for v in t.published if v.value is None]
    assert sorted(nulls) == sorted((T1, L7, row, b) for row in ("ASVD", "SVD-LLM") for b in (0.5333, 0.4667))


def _published_copy(tmp_path, edit) -> Path:
    data = yaml.safe_load(PUBLISHED.read_text())
    edit(data)
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def _first_value(data):
    return data["tables"][0]["published"][0]


@pytest.mark.parametrize("edit, message", [
    pytest.param(lambda d: _first_value(d).pop("source"), r"tables\[0\] \(paper-table1-llava\)\.published\[0\]: missing key 'source'", id="no source"),
    pytest.param(lambda d: _first_value(d).update(source="a blog"), r"published\[0\]\.source must name one of the file's sources", id="unknown source"),
    pytest.param(lambda d: _first_value(d).update(value=None), r"published\[0\]: value null .* needs `why`", id="null without why"),
    pytest.param(lambda d: _first_value(d).update(budget=0.6), r"published\[0\]: paper-table1-llava has no cell at row 'FP16'", id="cell not in layout"),
    pytest.param(lambda d: _first_value(d).update(row="QSVD"), r"paper-table1-llava has no row 'QSVD'; its rows are", id="unknown row"),
    pytest.param(lambda d: _first_value(d).update(model="llava-2"), r"model 'llava-2' is not a model of paper-table1-llava", id="unknown model"),
    pytest.param(lambda d: _first_value(d).update(value=680.1), r"published\[0\]\.value = 680\.1 is not an accuracy in percent", id="not a percent"),
    pytest.param(lambda d: _first_value(d).update(colum="x"), r"published\[0\]: unknown key 'colum'", id="unknown key"),
    pytest.param(lambda d: d["tables"][0]["published"].append(copy.deepcopy(_first_value(d))), r"repeats the cell of published\[0\]", id="repeated cell"),
    pytest.param(lambda d: d["tables"][2].pop("formats"), r"tables\[2\] \(paper-table2\)\.formats: a formats table has a column per", id="formats missing"),
    pytest.param(lambda d: d["tables"][4]["rows"][0].pop("beta"), r"tables\[4\] \(paper-table4\)\.rows\[0\]: missing key 'beta'", id="beta missing"),
    pytest.param(lambda d: d["tables"][0]["rows"][0].update(method="qsvd-x"), r"rows\[0\]\.method 'qsvd-x' is not one of", id="unknown method"),
])
def test_the_published_file_refuses_what_does_not_fit_by_key(tmp_path, edit, message):
    with pytest.raises(PaperTableError, match=message):
        load_tables(_published_copy(tmp_path, edit))
