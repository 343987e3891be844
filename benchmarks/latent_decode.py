"""Decode time per token and cache bytes of the latent cache modes against the dense model, on SmolLM2-135M.

    python benchmarks/latent_decode.py [--contexts 128 512 2048] [--batch 1] [--fraction 0.5] [--threads 2]

The low-rank model is SmolLM2's plain truncated SVD of joint QKV at `--fraction` of full rank (its accuracy is not
the point: its shapes are), built in memory; the pipeline's own models are measured by the benchmark stage
(`qsvd benchmark`, rule `benchmark`). The measuring is that stage's (`qsvd.stages.benchmark.measure_subjects`): per
context a random prompt is prefilled, then `--steps` single-token decode steps are timed after `--warmup` (median);
cache bytes are summed from the cache's tensors beside the cost model's prediction (`qsvd.math.cost.cache_bytes`);
each figure stands beside its bound. Real execution, float32, unfused PyTorch. Writes the stage's JSON to `--out`
and prints the report's table (with the machine: CPU, ISA, threads).
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from transformers import DynamicCache

from qsvd.math.cost import CACHE_MODES, cache_bytes
from qsvd.measure import dense_cache_bytes
from qsvd.models.latent_attention import new_cache, use_latent_cache
from qsvd.models.registry import family_by_name
from qsvd.models.surgery import apply_truncated_svd, layer_shapes
from qsvd.stages.benchmark import Grid, Subject, measure_subjects
from qsvd.stages.benchmark_report import markdown, read_benchmarks
from qsvd.stages.export_smollm2 import load_gguf_smollm2


def subjects(dense, lowrank, family, shapes, ranks):
    """The dense model with DynamicCache, then the low-rank one in each cache mode (switched when its turn comes)."""
    yield Subject("dynamic-float32", "dense float32, DynamicCache", "kv", "real", dense, DynamicCache,
                  lambda batch, tokens: dense_cache_bytes(dense, family, batch, tokens, 4), {})
    for mode in CACHE_MODES:
        use_latent_cache(lowrank, mode)
        yield Subject("qsvd", "truncated SVD", mode, "real", lowrank, lambda: new_cache(lowrank),
                      lambda batch, tokens, mode=mode: cache_bytes(shapes, ranks, "joint", mode, batch, tokens, 4), {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("results/benchmarks/latent_decode.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, _ = load_gguf_smollm2()
    family = family_by_name("llama")
    lowrank = copy.deepcopy(dense)
    ranks = apply_truncated_svd(lowrank, family, "joint", args.fraction)
    shapes = layer_shapes(lowrank, family)
    grid = Grid((args.batch,), tuple(args.contexts), args.steps, args.warmup)
    labels = {"model": "SmolLM2-135M", "method": "truncated-svd", "budget": f"rank {ranks[0]} ({args.fraction:g} of full)"}
    config = {"script": "benchmarks/latent_decode.py", **vars(args), "out": str(args.out)}
    measure_subjects(subjects(dense, lowrank, family, shapes, ranks), args.out, labels, config, grid, torch.device("cpu"))
    rows, machines = read_benchmarks([args.out])
    print(markdown(rows, machines, budget_gib=1.0))


if __name__ == "__main__":
    main()
