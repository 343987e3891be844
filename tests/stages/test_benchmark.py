"""The benchmark stage on a tiny model's real checkpoints (no timing asserts): every row labelled, the latent
cache's measured bytes equal to the cost model's, the peers measured or marked not installed, the report rendered."""

import csv

import pytest
import torch
import yaml

from qsvd.artefacts import read_json
from qsvd.config import SCHEMA_PATH
from qsvd.math.cost import CACHE_MODES
from qsvd.machine import Roofline
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.benchmark import EXECUTIONS, PEERS, Grid, run_benchmark
from qsvd.stages.benchmark_report import crossovers, write_benchmark_report
from qsvd.stages.decompose import run_decompose
from qsvd.stages.lowrank_model import run_lowrank_model
from qsvd.stages.quantize import QuantSpec, run_quantize
from qsvd.stages.rank_plan import run_rank_plan
from tests.stages.test_pipeline_tiny import _saved, dataset  # noqa: F401  (fixture)

pytestmark = pytest.mark.unit

GRID = Grid(batch_sizes=(1, 2), contexts=(8, 24), decode_steps=2, warmup=1)


@pytest.fixture
def benchmarks(tiny_model, dataset, tmp_path):  # noqa: F811
    """Benchmark JSONs of a tiny Llama: uncompressed (the peers), low-rank at R1 0.6 (a latent is cached), W8A8."""
    model, processor = tiny_model("llama", kv_heads=2)
    source = _saved(model, processor, tmp_path / "model")
    stats = run_activation_stats(str(source), "llama", dataset, tmp_path / "stats")
    decomposition = run_decompose(str(source), "llama", stats, "joint", "abs_mean", 0.5, tmp_path / "decomposition")
    plan = run_rank_plan(decomposition, None, "uniform", "R1", 0.6, 1, tmp_path / "plan.json")
    lowrank = run_lowrank_model(str(source), "llama", decomposition, plan, 0.2, tmp_path / "lowrank")
    quantized = run_quantize(str(lowrank), "llama", dataset, QuantSpec(weight_bits=8, act_bits=8), tmp_path / "w8a8")
    roofline = Roofline(torch.device("cpu"), copy_bytes=2**22, matmul_size=128, repeats=2)
    outputs = {}
    for name, path, method in (("uncompressed", source, "uncompressed"), ("lowrank", lowrank, "qsvd"),
                               ("w8a8", quantized, "qsvd")):
        labels = {"model": "tiny", "method": method, "budget": "full" if name == "uncompressed" else "R1=0.6",
                  **({"quant_format": "W8A8"} if name == "w8a8" else {})}
        outputs[name] = run_benchmark(str(path), "llama", tmp_path / name / "inference.json", labels, GRID,
                                      roofline=roofline)
    return outputs


def test_the_schema_offers_exactly_the_peers_and_modes_the_stage_knows():
    schema = yaml.safe_load(SCHEMA_PATH.read_text())["properties"]["benchmark"]["properties"]
    assert schema["peers"]["items"]["enum"] == list(PEERS) == schema["peers"]["default"]
    assert schema["cache_modes"]["items"]["enum"] == list(CACHE_MODES)
    assert schema["executions"]["items"]["enum"] == list(EXECUTIONS)


def test_rows_are_labelled_measured_match_the_cost_model_and_render(benchmarks, tmp_path):
    results = {name: read_json(path) for name, path in benchmarks.items()}
    for result in results.values():
        assert result["stage"] == "benchmark" and result["machine"]["cpu_capability"]
        assert result["roofline"]["bandwidth_bytes_per_s"] > 0 and result["roofline"]["matmul_ops_per_s"]["float32"] > 0
        for row in result["rows"]:
            assert row["execution"] in ("real", "simulated") and row["status"] in ("ok", "skipped", "not installed")
            if row["status"] == "ok":
                assert row["ttft_ms"] > 0 and row["decode_ms"] > 0 and row["tokens_per_s"] > 0
                assert row["weight_bytes"] > 0 and row["peak_rss_bytes"] > 0 and row["cache_bytes"] > 0
                assert row["bound"]["bound_ms"] > 0 and row["decode_vs_bound"] > 0
    peers = {row["runner"]: row for row in results["uncompressed"]["rows"]}
    assert set(peers) == set(PEERS)
    assert peers["quantized-fp8"]["status"] == "ok"  # transformers' own fp8 QuantizedCache, no extra package
    for name in ("quanto-int4", "hqq-int4", "torchao-int8"):
        if peers[name]["status"] != "ok":
            assert peers[name]["status"] == "not installed" and PEERS[name].package in peers[name]["reason"]
    fp8 = [r for r in results["uncompressed"]["rows"] if r["runner"] == "quantized-fp8"]
    dense = [r for r in results["uncompressed"]["rows"] if r["runner"] == "dynamic-float32"]
    assert all(r["cache_ratio"] == 1.0 for r in fp8 + dense)
    lowrank = [r for r in results["lowrank"]["rows"] if r["status"] == "ok"]
    assert {r["cache_mode"] for r in lowrank} == {"kv", "latent", "latent_v"} and len(lowrank) == 3 * 4
    quantized = [r for r in results["w8a8"]["rows"] if r["status"] == "ok"]
    assert {(r["execution"], r["cache_mode"]) for r in quantized} == {(e, m) for e in ("real", "simulated")
                                                                       for m in ("kv", "latent", "latent_v")}
    assert all(r["kernels"] == {"int_mm": r["kernels"]["int_mm"]} for r in quantized if r["execution"] == "real")
    for row in lowrank + quantized:
        assert row["cache_ratio"] == 1.0, row  # measured from the cache object == the cost model's prediction
    latent = {r["context"]: r["cache_bytes"] for r in lowrank if r["cache_mode"] == "latent" and r["batch"] == 1}
    kv = {r["context"]: r["cache_bytes"] for r in lowrank if r["cache_mode"] == "kv" and r["batch"] == 1}
    assert all(latent[c] < kv[c] for c in kv)

    out = tmp_path / "report"
    files = {name: out / name for name in ("bench.csv", "bench.md", "tokens.png", "cache.png", "budget.png")}
    write_benchmark_report(list(benchmarks.values()), *files.values(), cache_budget_gib=1.0)
    rows = list(csv.DictReader(files["bench.csv"].open()))
    assert len(rows) == sum(len(result["rows"]) for result in results.values())
    assert {r["execution"] for r in rows} == {"real", "simulated"}
    table = files["bench.md"].read_text()
    assert "Machine: " in table and results["lowrank"]["machine"]["cpu_capability"] in table
    assert "| qsvd R1=0.6 W8A8 | qsvd | latent | real | int_mm×" in table and "| simulated |" in table
    assert "not installed" in table or all(r["status"] == "ok" for r in peers.values())
    assert "Where `latent` overtakes `kv`" in table and "what fits a 1 GiB cache" in table
    assert all(files[name].stat().st_size > 1000 for name in ("tokens.png", "cache.png", "budget.png"))



def test_every_series_of_a_plot_has_its_own_colour_and_keeps_it():
    from qsvd.stages.benchmark_report import series_styles

    names = [f"variant {i} · latent · real" for i in range(16)]  # a benchmark of one model holds 14-16 series
    styles = series_styles(names + names[:3])
    assert len({style["color"] for style in styles.values()}) == 16
    assert series_styles(reversed(names)) == styles  # the same series, the same style, in any plot
    assert len({style["color"] for style in series_styles([f"s{i}" for i in range(30)]).values()}) == 30


def test_cells_over_the_prompt_token_cap_are_listed_as_skipped(tiny_model, tmp_path):
    model, processor = tiny_model("llama", kv_heads=2)
    source = _saved(model, processor, tmp_path / "model")
    grid = Grid(batch_sizes=(1, 2), contexts=(8, 24), decode_steps=1, warmup=0, max_prompt_tokens=24)
    roofline = Roofline(torch.device("cpu"), copy_bytes=2**20, matmul_size=64, repeats=1)
    path = run_benchmark(str(source), "llama", tmp_path / "inference.json", {"model": "tiny"}, grid,
                         peers=("dynamic-float32",), roofline=roofline)
    cells = {(r["batch"], r["context"]): r for r in read_json(path)["rows"]}
    assert {cell for cell, row in cells.items() if row["status"] == "ok"} == {(1, 8), (2, 8), (1, 24)}
    assert cells[2, 24]["status"] == "skipped" and "48 prompt tokens > benchmark.max_prompt_tokens (24)" in (
        cells[2, 24]["reason"])
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        Grid(max_prompt_tokens=0)


def test_crossovers_are_listed_in_numeric_batch_order():
    rows = [{"status": "ok", "runner": "qsvd", "model": "m", "variant": "v", "execution": "real", "batch": batch,
             "cache_mode": mode, "context": context, "tokens_per_s": speed}
            for batch in (16, 4, 1) for context in (128, 512)
            for mode, speed in (("kv", 10.0), ("latent", 5.0 if context == 128 else 20.0))]
    lines = crossovers(rows)
    assert [line.split("batch ")[1].split(":")[0] for line in lines] == ["1", "4", "16"]
    assert all("latent overtakes kv at context 512" in line for line in lines)
