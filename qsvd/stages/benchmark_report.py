"""The report's inference-benchmark part: a tidy CSV and markdown tables of every benchmark row, and three plots.

Reads the benchmark stage's JSON files (one per model variant). Every row is labelled `real` or `simulated`, and
every table names the machine (CPU and ISA or GPU, threads, measured bandwidth and matmul peaks). Per model:
- the timing table: TTFT, decode ms/token, tokens/s, × the dense DynamicCache of the same dtype, the decode bound
  and how far the figure is from it, cache bytes measured and predicted, weight bytes, peak memory;
- the cells not measured and why (skipped for memory, not installed, out of memory);
- where `latent` overtakes `kv` in tokens/s, per compressed model, execution and batch size;
- the cache budget table: how many tokens (batch × context) fit `cache_budget_gib`, from the cost model's
  bytes per token (the measured bytes where it has no formula), with the measured/predicted ratio.
Plots: tokens/s against context (one panel per batch size), cache bytes per sequence against context, and the
tokens that fit the cache budget.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from pathlib import Path

from qsvd.artefacts import atomic_write, read_json
from qsvd.machine import machine_line

log = logging.getLogger(__name__)

COLUMNS = ["model", "variant", "method", "budget", "quant_format", "runner", "description", "cache", "cache_mode",
           "execution", "kernels", "dtype", "batch", "context", "status", "reason", "ttft_ms", "decode_ms",
           "tokens_per_s", "prefill_tokens_per_s", "vs_dense", "bound_ms", "bound_by", "decode_vs_bound",
           "cache_bytes", "predicted_cache_bytes", "cache_ratio", "weight_bytes", "peak_rss_bytes",
           "cuda_max_allocated_bytes", "bandwidth_gb_s", "matmul_float32_gops", "machine"]
MIB = 2**20


def _variant(labels: dict) -> str:
    parts = [str(labels.get("method", "?"))]
    if labels.get("budget") not in (None, "", "full"):
        parts.append(str(labels["budget"]))
    if labels.get("quant_format"):
        parts.append(str(labels["quant_format"]))
    return " ".join(parts)


def _roofline_line(roofline: dict) -> str:
    peaks = ", ".join(f"{precision} {ops / 1e9:.0f} G/s" for precision, ops in roofline["matmul_ops_per_s"].items())
    return f"bandwidth {roofline['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (copy), matmul peaks {peaks}"


def read_benchmarks(files: list[Path]) -> tuple[list[dict], dict[str, list[str]]]:
    """(one row per benchmark row with its variant's labels and machine, the machine lines per model)."""
    rows, machines = [], defaultdict(list)
    for path in map(Path, files):
        if not path.is_file():
            raise FileNotFoundError(f"benchmark file {path} does not exist: run the benchmark stage that writes it")
        result = read_json(path)
        if result.get("stage") != "benchmark" or "rows" not in result:
            raise ValueError(f"{path} is not a benchmark stage output: re-run the benchmark stage that wrote it")
        labels = result["labels"]
        model = str(labels.get("model", "?"))
        line = machine_line(result["machine"])
        if line not in machines[model]:
            machines[model].append(line)
        ceilings = _roofline_line(result["roofline"])
        for row in result["rows"]:
            bound = row.get("bound") or {}
            rows.append({
                **{key: row.get(key) for key in COLUMNS}, "model": model, "variant": _variant(labels),
                "method": labels.get("method"), "budget": labels.get("budget"), "quant_format": labels.get("quant_format"),
                "kernels": ", ".join(f"{k}×{n}" for k, n in (row.get("kernels") or {}).items()),
                "bound_ms": bound.get("bound_ms"), "bound_by": bound.get("bound_by"), "machine": f"{line}; {ceilings}",
                "bandwidth_gb_s": result["roofline"]["bandwidth_bytes_per_s"] / 1e9,
                "matmul_float32_gops": result["roofline"]["matmul_ops_per_s"]["float32"] / 1e9,
                "tokens": row.get("tokens"),
            })
    _set_dense_ratios(rows)
    return sorted(rows, key=_order), dict(machines)


def series(row: dict) -> str:
    """What one line of a plot or block of a table is: a peer, or a compressed model in a mode and execution."""
    if row["runner"] != "qsvd":
        return str(row["runner"])
    return f"{row['variant']} · {row['cache_mode']} · {row['execution']}"


MARKERS = "osD^vP*Xh<>p"


def series_styles(names) -> dict[str, dict]:
    """A colour and a marker per series, the same in every panel and plot: matplotlib's default cycle repeats after
    10 colours, a benchmark of one model holds 14-16 series (tab20 up to 20, then colours spread over turbo)."""
    from matplotlib import colormaps

    ordered = sorted(set(names))
    colours = colormaps["tab20"] if len(ordered) <= 20 else colormaps["turbo"].resampled(len(ordered))
    return {name: {"color": colours(i), "marker": MARKERS[i % len(MARKERS)]} for i, name in enumerate(ordered)}


def _order(row: dict) -> tuple:
    return (row["model"], row["runner"] == "qsvd", str(row["variant"]), str(row["runner"]), str(row["execution"]),
            str(row["cache_mode"]), row["context"] or 0, row["batch"] or 0)


def _dense(rows: list[dict], model: str, dtype: str) -> dict:
    """(batch, context) -> the dense DynamicCache row of `model` in `dtype` (else float32)."""
    for runner in (f"dynamic-{dtype}", "dynamic-float32"):
        found = {(r["batch"], r["context"]): r for r in rows if r["model"] == model and r["runner"] == runner
                 and r["status"] == "ok"}
        if found:
            return found
    return {}


def _set_dense_ratios(rows: list[dict]) -> None:
    for row in rows:
        reference = _dense(rows, row["model"], row["dtype"]).get((row["batch"], row["context"]))
        reference = reference if row["status"] == "ok" else None
        row["vs_dense"] = row["decode_ms"] / reference["decode_ms"] if reference else None


def tidy_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _number(value, digits: int = 2) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _latent_and_kv(rows: list[dict]) -> dict[tuple, tuple[list[int], dict[int, float], dict[int, float]]]:
    """(model, variant, execution, batch) -> (contexts where both ran, latent tokens/s, kv tokens/s)."""
    modes: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if r["status"] == "ok" and r["runner"] == "qsvd":
            modes[(r["model"], r["variant"], r["execution"], r["batch"])][r["cache_mode"]][r["context"]] = r["tokens_per_s"]
    return {key: (sorted(set(m["latent"]) & set(m["kv"])), m["latent"], m["kv"]) for key, m in modes.items()
            if set(m.get("latent", {})) & set(m.get("kv", {}))}


def crossovers(rows: list[dict]) -> list[str]:
    """Per compressed model, execution and batch: where `latent` overtakes `kv` in tokens/s, if it does."""
    lines = []
    ordered = sorted(_latent_and_kv(rows).items(), key=lambda item: (*map(str, item[0][:3]), item[0][3]))
    for (_, variant, execution, batch), (contexts, latent, kv) in ordered:  # batches in numeric order
        faster = [c for c in contexts if latent[c] > kv[c]]
        where = f"{variant} ({execution}), batch {batch}"
        if not faster:
            lines.append(f"- {where}: latent stays slower than kv up to context {contexts[-1]} "
                         f"({latent[contexts[-1]] / kv[contexts[-1]]:.2f}× kv's tokens/s there).")
        elif faster[0] == contexts[0]:
            lines.append(f"- {where}: latent is faster than kv from the smallest context measured ({contexts[0]}).")
        else:
            lines.append(f"- {where}: latent overtakes kv at context {faster[0]}.")
    return lines


def crossover_points(rows: list[dict]) -> list[tuple]:
    """(model, batch, context, latent tokens/s) where a latent series first beats its kv series after trailing it."""
    points = []
    for (model, _, _, batch), (contexts, latent, kv) in _latent_and_kv(rows).items():
        faster = [c for c in contexts if latent[c] > kv[c]]
        if faster and faster[0] != contexts[0]:
            points.append((model, batch, faster[0], latent[faster[0]]))
    return points


def budget_rows(rows: list[dict], budget_gib: float) -> list[dict]:
    """Per model and series: cache bytes per token (predicted, else measured), tokens that fit the budget,
    × the dense cache of the same dtype, the largest batch at each context, and the measured/predicted ratio."""
    budget = budget_gib * 2**30
    ok = [r for r in rows if r["status"] == "ok" and r["execution"] == "real"]
    per_series: dict[tuple, dict] = {}
    for r in ok:
        key = (r["model"], series(r))
        if key not in per_series or r["batch"] * r["tokens"] > per_series[key]["batch"] * per_series[key]["tokens"]:
            per_series[key] = r
    table, contexts = [], sorted({r["context"] for r in ok})
    for (model, name), r in sorted(per_series.items(), key=lambda kv: (kv[0][0], _order(kv[1]))):
        held = r["predicted_cache_bytes"] or r["cache_bytes"]
        per_token = held / (r["batch"] * r["tokens"])
        table.append({"model": model, "series": name, "peer": r["runner"] != "qsvd", "dtype": r["dtype"],
                      "bytes_per_token": per_token, "tokens": int(budget // per_token),
                      "source": "predicted" if r["predicted_cache_bytes"] else "measured",
                      "ratio": r["cache_ratio"], "largest_batch": {c: int(budget // (c * per_token)) for c in contexts}})
    for entry in table:
        reference = f"dynamic-{entry['dtype']}"
        dense = next((d for d in table if d["model"] == entry["model"] and d["series"] == reference), None)
        entry["vs_dense"] = entry["tokens"] / dense["tokens"] if dense else None
    return table


def _ceiling_ranges(rows: list[dict]) -> str:
    """The measured bandwidth and float32 matmul peak over the jobs of `rows` (one value, or their range)."""
    def span(key: str) -> str:
        values = sorted({r[key] for r in rows})
        return f"{values[0]:.1f}" if values[-1] - values[0] < 0.05 * values[-1] else f"{values[0]:.1f} to {values[-1]:.1f}"

    return f"bandwidth {span('bandwidth_gb_s')} GB/s (a tensor copy), float32 matmul {span('matmul_float32_gops')} GFLOP/s"


TABLE = ("variant", "runner", "cache mode", "execution", "kernels", "dtype", "batch", "context", "TTFT ms", "ms/token",
         "tokens/s", "× dense", "bound ms", "× bound", "bound by", "cache bytes", "predicted", "measured/predicted",
         "weight MiB", "peak RSS MiB")


def _table_row(r: dict) -> str:
    cells = [r["variant"] if r["runner"] == "qsvd" else "dense", r["runner"], r["cache_mode"], r["execution"],
             r["kernels"], r["dtype"], r["batch"], r["context"], _number(r["ttft_ms"], 1), _number(r["decode_ms"]),
             _number(r["tokens_per_s"], 1), _number(r["vs_dense"]), _number(r["bound_ms"], 3),
             _number(r["decode_vs_bound"], 1), r["bound_by"], r["cache_bytes"],
             "" if r["predicted_cache_bytes"] is None else r["predicted_cache_bytes"], _number(r["cache_ratio"], 3),
             _number(r["weight_bytes"] / MIB), _number(r["peak_rss_bytes"] / MIB, 0)]
    return "| " + " | ".join(map(str, cells)) + " |"


def _cell(row: dict) -> str:
    return "" if row["batch"] is None else f", batch {row['batch']} × context {row['context']}"


def markdown(rows: list[dict], machines: dict[str, list[str]], budget_gib: float) -> str:
    parts = ["# Inference benchmark\n"]
    budget = budget_rows(rows, budget_gib)
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        parts.append(f"## {model}\n")
        parts += [f"Machine: {line}.\n" for line in machines.get(model, [])]
        parts.append(f"Ceilings measured in each job (the bounds use their job's): {_ceiling_ranges(group)}.\n")
        parts.append("| " + " | ".join(TABLE) + " |")
        parts.append("|---" * len(TABLE) + "|")
        parts += [_table_row(r) for r in group if r["status"] == "ok"]
        parts.append("\n`real`: the weights compute as stored (floats, or integer codes through the kernels named); "
                     "`simulated`: quantized weights held as dequantized floats. × dense: decode time over the dense "
                     "DynamicCache's of the same dtype. Bound: max(bytes a step moves / bandwidth, its operations / the "
                     "matmul peaks); × bound: how far the figure is from it.\n")
        missing = [r for r in group if r["status"] != "ok"]
        if missing:
            parts.append("Not measured:\n")
            parts += [f"- {series(r)}{_cell(r)}: {r['status']} ({r['reason']})" for r in missing]
            parts.append("")
        lines = crossovers(group)
        if lines:
            parts.append("Where `latent` overtakes `kv` (tokens/s):\n")
            parts += lines + [""]
        chosen = [b for b in budget if b["model"] == model]
        if chosen:
            contexts = list(chosen[0]["largest_batch"])
            parts.append(f"### {model}: what fits a {budget_gib:g} GiB cache\n")
            batches = " | ".join(f"batch at {c}" for c in contexts)
            parts.append(f"| series | bytes/token | tokens in budget | × dense | {batches} | measured/predicted |")
            parts.append("|---" * (5 + len(contexts)) + "|")
            for b in chosen:
                parts.append(f"| {b['series']} | {b['bytes_per_token']:.1f} ({b['source']}) | {b['tokens']} | "
                             f"{_number(b['vs_dense'])} | " + " | ".join(str(b["largest_batch"][c]) for c in contexts)
                             + f" | {_number(b['ratio'], 3)} |")
            parts.append("\nBytes per token from the cost model (the measured bytes where it has no formula), "
                         "measured/predicted from the largest cell measured.\n")
    return "\n".join(parts)


def _models(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["model"] for r in rows))


def _save(fig, path: Path) -> None:
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _context_axes(ax, ylabel: str, title: str) -> None:
    """Log-log axes of a figure against context length (powers of two)."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)


def throughput_plot(rows: list[dict], path: Path) -> None:
    """Tokens/s against context, one row of panels per model, one panel per batch size; a star where latent
    overtakes kv."""
    from matplotlib.figure import Figure  # Figure + savefig render with Agg, without pyplot's global state

    ok = [r for r in rows if r["status"] == "ok"]
    models = _models(ok) or ["no measurements"]
    batches = sorted({r["batch"] for r in ok}) or [None]
    fig = Figure(figsize=(5 * len(batches) + 3, 4 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), len(batches), squeeze=False)
    marks = crossover_points(ok)
    styles = series_styles(series(r) for r in ok)
    for model, row_axes in zip(models, axes):
        for batch, ax in zip(batches, row_axes):
            lines = defaultdict(list)
            for r in ok:
                if r["model"] == model and r["batch"] == batch:
                    lines[series(r)].append((r["context"], r["tokens_per_s"]))
            for name, points in lines.items():
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, linestyle="--" if "simulated" in name else "-", label=name, **styles[name])
            for mark_model, mark_batch, context, value in marks:
                if (mark_model, mark_batch) == (model, batch):
                    ax.plot([context], [value], marker="*", markersize=16, color="black", linestyle="none")
                    ax.annotate("latent > kv", (context, value), textcoords="offset points", xytext=(6, 6))
            _context_axes(ax, "decode tokens/s", f"{model}: batch {batch}")
        handles, names = row_axes[-1].get_legend_handles_labels()
        if handles:
            row_axes[-1].legend(handles, names, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(fig, path)


def cache_plot(rows: list[dict], path: Path) -> None:
    """Cache bytes per sequence against context (measured; × where the cost model predicts), per model."""
    from matplotlib.figure import Figure

    ok = [r for r in rows if r["status"] == "ok" and r["execution"] == "real"]  # simulated rows hold the same cache
    models = _models(ok) or ["no measurements"]
    fig = Figure(figsize=(10, 4.5 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    colours = {name: style["color"] for name, style in series_styles(series(r) for r in ok).items()}
    for model, ax in zip(models, axes):
        lines = defaultdict(dict)
        for r in ok:
            if r["model"] == model and r["context"] not in lines[series(r)]:
                lines[series(r)][r["context"]] = r
        for name, cells in lines.items():
            contexts = sorted(cells)
            per_sequence = [cells[c]["cache_bytes"] / cells[c]["batch"] for c in contexts]
            line, = ax.plot(contexts, per_sequence, marker="o", label=name, color=colours[name])
            predicted = [(c, cells[c]["predicted_cache_bytes"] / cells[c]["batch"]) for c in contexts
                         if cells[c]["predicted_cache_bytes"]]
            if predicted:
                ax.plot(*zip(*predicted), marker="x", markersize=9, linestyle="none", color=line.get_color())
        _context_axes(ax, "cache bytes per sequence (o measured, x predicted)", f"{model}: KV-cache bytes")
        if lines:
            ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(fig, path)


def budget_plot(rows: list[dict], budget_gib: float, path: Path) -> None:
    """Tokens (batch × context) whose cache fits the budget, per model and series, with measured/predicted."""
    from matplotlib.figure import Figure

    table = budget_rows(rows, budget_gib)
    models = _models(table) or ["no measurements"]
    fig = Figure(figsize=(9, 1.5 + 0.45 * max(len(table), 1) + 1.2 * len(models)), layout="constrained")
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    for model, ax in zip(models, axes):
        chosen = [b for b in table if b["model"] == model]
        names = [b["series"] for b in chosen]
        ax.barh(names, [b["tokens"] for b in chosen], color=["tab:gray" if b["peer"] else "tab:blue" for b in chosen])
        for index, b in enumerate(chosen):
            note = f" {b['tokens']:,}" + ("" if b["ratio"] is None else f"  (measured/predicted {b['ratio']:.3f})")
            ax.text(b["tokens"], index, note, va="center", fontsize="x-small")
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel(f"tokens (batch × context) whose cache fits {budget_gib:g} GiB")
        ax.set_title(f"{model}: cache budget {budget_gib:g} GiB (cost model)")
        ax.tick_params(axis="y", labelsize="x-small")
    _save(fig, path)


def write_benchmark_report(benchmark_files: list[Path], csv_path: Path, markdown_path: Path, throughput_path: Path,
                           cache_path: Path, budget_path: Path, cache_budget_gib: float = 1.0) -> None:
    """Write the benchmark CSV, markdown tables and the three plots, each atomically."""
    rows, machines = read_benchmarks(benchmark_files)
    text = tidy_csv(rows)
    atomic_write(Path(csv_path), lambda tmp: tmp.write_text(text))
    tables = markdown(rows, machines, cache_budget_gib)
    atomic_write(Path(markdown_path), lambda tmp: tmp.write_text(tables))
    throughput_plot(rows, throughput_path)
    cache_plot(rows, cache_path)
    budget_plot(rows, cache_budget_gib, budget_path)
    log.info("benchmark report of %d rows: %s, %s", len(rows), csv_path, markdown_path)
