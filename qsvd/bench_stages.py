"""`qsvd bench-stages`: every stage on a random-weight model of a paper architecture, cut to several depths.

Each stage runs as its own `qsvd` process (as a workflow job would), timed by wall clock, its peak resident
memory read from the kernel (`wait4`), on CUDA also its peak allocated device memory. From the depths measured,
a least-squares line per stage gives the cost of one more decoder layer and the extrapolation to the full depth.
A benchmark prints figures; nothing here asserts on them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path

import torch

from qsvd.artefacts import write_json

PEAK_FILE_ENV = "QSVD_CUDA_PEAK_FILE"  # the CLI writes torch.cuda.max_memory_allocated() there at exit


@dataclass(frozen=True)
class StageRun:
    layers: int
    stage: str
    seconds: float
    peak_rss_mb: float
    peak_cuda_mb: float | None
    artefact_mb: float | None


def _tree_mb(path: Path) -> float | None:
    if not path.exists():
        return None
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def _run(stage: str, args: list[str], threads: int, layers: int, artefact: Path | None, log) -> StageRun:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as peak:
        peak_path = Path(peak.name)
    command = [sys.executable, "-m", "qsvd.cli", "--threads", str(threads), *args]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=log, env=os.environ | {PEAK_FILE_ENV: str(peak_path)})
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"stage {stage} failed ({process.returncode}): {' '.join(command)}; see the log")
    cuda = json.loads(peak_path.read_text()).get("max_allocated_mb") if peak_path.stat().st_size else None
    peak_path.unlink(missing_ok=True)
    return StageRun(layers, stage, seconds, usage.ru_maxrss / 1024, cuda, None if artefact is None else _tree_mb(artefact))


def _stages(work: Path, model: Path, family: str, data: Path, evaluation: Path, dtype: str, device: str, budget: float,
            quant_format: str) -> list[tuple[str, list[str], Path | None]]:
    common = ["--family", family, "--dtype", dtype, "--device", device]
    weight_bits, act_bits = (int(b) for b in quant_format[1:].split("A"))
    spec = json.dumps({"weight_bits": weight_bits, "act_bits": act_bits})
    return [
        ("activation_stats", ["stats", "--model", str(model), *common, "--data", str(data), "--out", str(work / "stats")],
         work / "stats"),
        ("decompose", ["decompose", "--model", str(model), *common, "--stats", str(work / "stats"),
                       "--out", str(work / "decomposition")], work / "decomposition"),
        ("importance", ["importance", "--model", str(model), *common, "--decomposition", str(work / "decomposition"),
                        "--data", str(data), "--out", str(work / "importance")], work / "importance"),
        ("rank_plan", ["rank-plan", "--decomposition", str(work / "decomposition"), "--importance", str(work / "importance"),
                       "--budget", str(budget), "--out", str(work / "plan.json")], work / "plan.json"),
        ("lowrank_model", ["lowrank-model", "--model", str(model), *common, "--decomposition", str(work / "decomposition"),
                           "--plan", str(work / "plan.json"), "--out", str(work / "lowrank")], work / "lowrank"),
        ("quantize", ["quantize", "--model", str(work / "lowrank"), *common, "--spec", spec, "--data", str(data),
                      "--out", str(work / "quantized")], work / "quantized"),
        ("evaluate_lowrank", ["evaluate", "--model", str(work / "lowrank"), *common, "--data", str(evaluation),
                              "--out", str(work / "eval-lowrank.json")], None),
        ("evaluate_quantized", ["evaluate", "--model", str(work / "quantized"), *common, "--data", str(evaluation),
                                "--out", str(work / "eval-quantized.json")], None),
    ]


def fit_line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (layers, value) points; slope 0 for one point."""
    if len({x for x, _ in points}) < 2:
        return points[0][1], 0.0
    n = len(points)
    mean_x, mean_y = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum((x - mean_x) ** 2 for x, _ in points)
    return mean_y - slope * mean_x, slope


def bench_stages(architecture: str, depths: list[int], out_dir: Path, threads: int, dtype: str = "bfloat16",
                 device: str = "auto", calibration: int = 16, evaluation: int = 8, budget: float = 0.6,
                 quant_format: str = "W4A4", full_depth: int | None = None) -> dict:
    """Run every stage at each depth; write `bench.json` and `bench.md` into `out_dir`; return the summary."""
    from qsvd.models.registry import family_of_class
    from qsvd.sources.random_model import architecture_config, load_architecture

    out_dir.mkdir(parents=True, exist_ok=True)
    family = family_of_class(load_architecture(architecture).model_class).name
    full_depth = full_depth or architecture_config(architecture).get_text_config().num_hidden_layers
    runs: list[StageRun] = []
    with (out_dir / "bench.log").open("a") as log:
        data, questions = out_dir / "calibration", out_dir / "evaluation"
        for split, count, where in (("train", calibration, data), ("test", evaluation, questions)):
            if not where.exists():
                _run("data", ["data", "--dataset", "easy-vqa", "--split", split, "--num-samples", str(count),
                              "--out", str(where)], 1, 0, None, log)
        for layers in depths:
            work = out_dir / f"layers-{layers}"
            model = work / "model"
            runs.append(_run("random_model", ["random-model", "--architecture", architecture, "--layers", str(layers),
                                              "--dtype", dtype, "--out", str(model)], threads, layers, model, log))
            for stage, args, artefact in _stages(work, model, family, data, questions, dtype, device, budget, quant_format):
                runs.append(_run(stage, args, threads, layers, artefact, log))
                print(f"{layers} layers  {stage:20s} {runs[-1].seconds:8.1f} s  {runs[-1].peak_rss_mb:8.0f} MB", flush=True)
    summary = {
        "date": date.today().isoformat(), "architecture": architecture, "depths": depths, "full_depth": full_depth,
        "dtype": dtype, "device": device, "threads": threads, "calibration_samples": calibration,
        "evaluation_questions": evaluation, "budget_R1": budget, "quant_format": quant_format,
        "machine": machine(), "runs": [asdict(r) for r in runs],
    }
    write_json(out_dir / "bench.json", summary)
    (out_dir / "bench.md").write_text(markdown_table(summary))
    return summary


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def min_seconds(function, repeats: int):
    """(the fastest of `repeats` calls of `function`, in seconds; its last result): timing on a noisy machine."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu_model()}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}"


def markdown_table(summary: dict) -> str:
    """Per stage: time and peak memory at every depth, the per-layer slope and the extrapolation to full depth."""
    depths, full = summary["depths"], summary["full_depth"]
    stages = list(dict.fromkeys(r["stage"] for r in summary["runs"]))
    header = ["stage", *[f"{d} layers: s / MB RSS" for d in depths], "per layer: s / MB", f"{full} layers (extrapolated): s / MB",
              "artefact MB per layer", f"artefact MB at {full}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    totals = {"seconds": 0.0}
    for stage in stages:
        runs = {r["layers"]: r for r in summary["runs"] if r["stage"] == stage}
        cells = [f"{runs[d]['seconds']:.1f} / {runs[d]['peak_rss_mb']:.0f}" + (
            f" ({runs[d]['peak_cuda_mb']:.0f} GPU)" if runs[d].get("peak_cuda_mb") else "") for d in depths if d in runs]
        t0, t1 = fit_line([(d, runs[d]["seconds"]) for d in runs])
        m0, m1 = fit_line([(d, runs[d]["peak_rss_mb"]) for d in runs])
        sized = [(d, runs[d]["artefact_mb"]) for d in runs if runs[d]["artefact_mb"] is not None]
        a0, a1 = fit_line(sized) if sized else (None, None)
        totals["seconds"] += t0 + t1 * full
        lines.append("| " + " | ".join([stage, *cells, f"{t1:.1f} / {m1:.0f}", f"{t0 + t1 * full:.0f} / {m0 + m1 * full:.0f}",
                                        "" if a1 is None else f"{a1:.1f}", "" if a0 is None else f"{a0 + a1 * full:.0f}"]) + " |")
    lines.append(f"\nExtrapolated total at {full} layers: {totals['seconds'] / 60:.1f} min. Measured {summary['date']} on "
                 f"{summary['machine']}, {summary['threads']} threads, {summary['dtype']}, device {summary['device']}; "
                 f"{summary['calibration_samples']} calibration samples, {summary['evaluation_questions']} evaluation "
                 f"questions, R1 = {summary['budget_R1']}, {summary['quant_format']} (simulated). Random weights: only "
                 "costs mean anything.\n")
    return "\n".join(lines) + "\n"
