"""`snakemake --report` is the results browser (issue 12 item 4): every table and plot of a finished run, each with
its caption (workflow/report/), grouped by model and task, under the workflow's description; and the workflow
catalog's standardized usage around it (config/README.md, .snakemake-workflow-catalog.yml)."""

import json
import re

import pytest
import yaml

from tests.workflow.conftest import REPO, snakemake

pytestmark = pytest.mark.workflow

MODEL = "demo-test"  # config/test.yaml
TASK = "Task easy-vqa-test-n40-s0"
# File name -> (subcategory, a phrase of its caption, rendered from the config where it names the run).
CAPTIONS = {
    "results.csv": ("Accuracy (every task)", f"Every evaluation result of {MODEL}, one row each"),
    "tables.md": ("Accuracy (every task)", f"Markdown tables of {MODEL}: methods × budgets"),
    "tradeoff.png": ("Accuracy (every task)", f"Trade-off plot of {MODEL}"),
    "benchmark.csv": ("Inference benchmark", f"Every inference-benchmark row of {MODEL}"),
    "benchmark.md": ("Inference benchmark", f"Inference-benchmark tables of {MODEL}"),
    "bench_tokens_per_s.png": ("Inference benchmark", f"Decode throughput of {MODEL}"),
    "bench_cache_bytes.png": ("Inference benchmark", f"KV-cache bytes per sequence of {MODEL}"),
    "bench_cache_budget.png": ("Inference benchmark", f"What fits a 1.0 GiB cache on {MODEL}"),
}


def _script_value(html: str, script: str, name: str):
    """The JSON value that the report page's `<script id="<script>">` assigns to `var <name>`."""
    opening = html.index(f'<script id="{script}">')
    start = html.index(f"var {name} = ", opening) + len(f"var {name} = ")
    value, _ = json.JSONDecoder().raw_decode(html, start)
    return value


@pytest.mark.slow
def test_the_report_holds_every_table_and_plot_with_its_caption(finished_workdir, tmp_path):
    target = tmp_path / "report.html"
    # no --cores: making the report runs no job, and no rule's threads depend on workflow.cores
    out = snakemake(finished_workdir, "--configfile", str(REPO / "config" / "test.yaml"), "--report", str(target))
    assert out.returncode == 0, out.stderr[-5000:]
    html = target.read_text()
    assert len(html) > 200_000  # the embedded plots alone are larger
    results, categories = _script_value(html, "results", "results"), _script_value(html, "categories", "categories")
    description = _script_value(html, "workflow-desc", "workflow_desc")

    # grouped by model, then by what the files hold: the accuracy report, each task's evaluations, the benchmark
    assert list(categories) == [MODEL]
    assert set(categories[MODEL]) == {"Accuracy (every task)", "Inference benchmark", TASK}
    report_dir = finished_workdir / "results" / MODEL / "report"
    evaluations = sorted((finished_workdir / "results" / MODEL).rglob("eval/*.json"))
    assert {p.name for p in report_dir.iterdir() if not p.name.startswith(".")} == set(CAPTIONS)
    expected = {str(report_dir.relative_to(finished_workdir) / name) for name in CAPTIONS}
    expected |= {str(path.relative_to(finished_workdir)) for path in evaluations}
    assert set(results) == expected and len(evaluations) == 10  # every variant of the run

    for path, result in results.items():
        caption = result["caption"]
        assert "System Message" not in caption and "{{" not in caption, (path, caption)  # RST and Jinja rendered
        assert result["data_uri"].startswith("data:"), path  # embedded: the HTML file is the whole browser
        if result["name"] in CAPTIONS:
            subcategory, phrase = CAPTIONS[result["name"]]
            assert path in categories[MODEL][subcategory] and phrase in caption, (path, caption)
        else:
            assert path in categories[MODEL][TASK], path
            assert f"Evaluation of {MODEL}: one model variant on one task" in caption, (path, caption)
            variant = path.split(f"results/{MODEL}/", 1)[1].split("/eval/", 1)[0]
            assert variant in caption  # the caption names its own variant
            assert result["labels"]["model variant"] == variant
    # the captions say how the run was configured, from the config itself
    assert "qsvd, svd-llm" in results[str(report_dir.relative_to(finished_workdir) / "results.csv")]["caption"]
    assert "0.9, 0.6" in results[str(report_dir.relative_to(finished_workdir) / "tables.md")]["caption"]
    task_labels = [results[path]["labels"] for path in categories[MODEL][TASK]]
    assert {labels["method"] for labels in task_labels} == {"uncompressed", "qsvd", "svd-llm", "quarot"}
    assert len({tuple(labels.values()) for labels in task_labels}) == len(task_labels)  # one row each in the browser

    for phrase in ("joint QKV low-rank compression and quantization", "How it was made", "What is in it",
                   MODEL, "qsvd, svd-llm", "R1 = 0.9, 0.6",
                   "easy-vqa test (40 samples, seed 0)", "W8A8", "Accuracy (every task)", "Inference benchmark"):
        assert phrase in description, phrase


def test_the_report_directive_names_a_description_that_exists():
    snakefile = (REPO / "workflow" / "Snakefile").read_text()
    directive = re.search(r'^report: "([^"]+)"$', snakefile, re.M)
    assert directive and (REPO / "workflow" / directive.group(1)).is_file()
    for rules in (REPO / "workflow" / "rules").glob("*.smk"):
        for caption in re.findall(r'caption=f?"\.\./report/([^"]+)"', rules.read_text()):
            names = [caption.replace("{name}", key) for key in ("csv", "markdown", "throughput", "cache", "budget")] \
                if "{name}" in caption else [caption]
            assert all((REPO / "workflow" / "report" / name).is_file() for name in names), (rules.name, caption)


def _schema_keys(schema: dict, defs: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, leaf name) of every property of the config schema, through its $refs."""
    keys = []
    for name, spec in schema.get("properties", {}).items():
        keys.append((prefix + name, name))
        if "$ref" in spec:
            spec = defs[spec["$ref"].rsplit("/", 1)[1]]
        if spec.get("type") == "array" and "$ref" in spec.get("items", {}):
            spec = defs[spec["items"]["$ref"].rsplit("/", 1)[1]]
        keys += _schema_keys(spec, defs, f"{prefix}{name}.")
    return keys


def test_config_readme_describes_every_key_and_every_config():
    readme = (REPO / "config" / "README.md").read_text()
    schema = yaml.safe_load((REPO / "workflow" / "schemas" / "config.schema.yaml").read_text())
    missing = [key for key, leaf in _schema_keys(schema, schema["$defs"])
               if not re.search(rf"[`.]{re.escape(leaf)}`", readme)]
    assert not missing, f"config/README.md does not describe {missing}"
    configs = [path.name for path in (REPO / "config").glob("*.yaml") if f"`{path.name}`" not in readme]
    assert not configs, f"config/README.md does not list {configs}"


def test_catalog_settings_have_the_fields_the_catalog_reads():
    usage = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())["usage"]
    assert isinstance(usage["mandatory-flags"]["desc"], str) and isinstance(usage["mandatory-flags"]["flags"], str)
    deployment = usage["software-stack-deployment"]
    assert all(isinstance(deployment[key], bool) for key in ("conda", "apptainer", "apptainer+conda"))
    assert deployment["conda"] and (REPO / "envs" / "qsvd.yaml").is_file()
    assert usage["report"] is True
