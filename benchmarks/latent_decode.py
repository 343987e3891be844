"""Decode time per token and cache bytes of the latent cache modes against the dense model, on SmolLM2-135M.

    python benchmarks/latent_decode.py [--contexts 128 512 2048] [--batch 1] [--fraction 0.5] [--threads 2]

The low-rank model is SmolLM2's plain truncated SVD of joint QKV at `--fraction` of full rank (its accuracy is not
the point: its shapes are). Per context length: a random prompt is prefilled, then `--steps` single-token decode
steps are timed after `--warmup` (median). Cache bytes are summed from the cache's tensors and set beside the cost
model's prediction (`qsvd.math.cost.cache_bytes`). Real execution, float32, unfused PyTorch; prints the CPU's ISA.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import DynamicCache

from qsvd.math.cost import cache_bytes
from qsvd.models.latent_attention import CACHE_ARGUMENT, new_cache, use_latent_cache
from qsvd.models.registry import family_by_name
from qsvd.models.surgery import apply_truncated_svd, layer_shapes
from qsvd.stages.export_smollm2 import load_gguf_smollm2


def decode_ms(model, cache, prompt: torch.Tensor, steps: int, warmup: int) -> float:
    with torch.no_grad():
        logits = model(input_ids=prompt, use_cache=True, **{CACHE_ARGUMENT: cache}).logits
        token = logits[:, -1:].argmax(-1)
        times = []
        for step in range(warmup + steps):
            start = time.perf_counter()
            logits = model(input_ids=token, use_cache=True, **{CACHE_ARGUMENT: cache}).logits
            token = logits[:, -1:].argmax(-1)
            if step >= warmup:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def cache_nbytes(cache) -> int:
    if hasattr(cache, "nbytes"):
        return cache.nbytes
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if layer.is_initialized)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dense, _ = load_gguf_smollm2()
    family = family_by_name("llama")
    lowrank = copy.deepcopy(dense)
    ranks = apply_truncated_svd(lowrank, family, "joint", args.fraction)
    shapes = layer_shapes(lowrank, family)
    print(f"# SmolLM2-135M, float32, batch {args.batch}, joint rank {ranks[0]} ({args.fraction:g} of full), "
          f"{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}, torch "
          f"{torch.__version__}; median of {args.steps} decode steps after {args.warmup}")
    print("| context | model | cache mode | ms/token | × dense | cache bytes | predicted | measured/predicted |")
    print("|---|---|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for context in args.contexts:
        prompt = torch.randint(0, dense.config.vocab_size, (args.batch, context), generator=generator)
        tokens = context + args.warmup + args.steps
        cache = DynamicCache()
        reference = decode_ms(dense, cache, prompt, args.steps, args.warmup)
        print(f"| {context} | dense | kv (DynamicCache) | {reference:.1f} | 1.00 | {cache_nbytes(cache)} | – | – |")
        for mode in ("kv", "latent_v", "latent"):
            use_latent_cache(lowrank, mode)
            cache = new_cache(lowrank)
            ms = decode_ms(lowrank, cache, prompt, args.steps, args.warmup)
            predicted = cache_bytes(shapes, ranks, "joint", mode, args.batch, tokens, value_bytes=4)
            measured = cache_nbytes(cache)
            print(f"| {context} | low-rank | {mode} | {ms:.1f} | {ms / reference:.2f} | {measured} | {predicted} | "
                  f"{measured / predicted:.3f} |")


if __name__ == "__main__":
    main()
