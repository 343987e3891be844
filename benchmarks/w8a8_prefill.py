"""Prefill milliseconds of the dense float32 model against a W8A8 checkpoint with integer kernels, and where the W8A8
prefill's time goes (torch.profiler, by operator).

    python benchmarks/w8a8_prefill.py --quantized results/smollm2/calib~sotu-train-n32-s0/svd~joint-abs_mean-a0.5/\\
rank~importance-R10.8-min1/factors~beta0.2/quant~W8A8-rtn-c0.9-0.85-v8-rot-s0/model

Prefill without a cache (`use_cache=False`, logits of the last position only), random token ids, the median of
`--repeats` runs after one warm-up; the profile covers three 512-token prefills at batch 1.
"""

from __future__ import annotations

import argparse

import torch

import qsvd
from int_kernels import median_ms
from qsvd.models.checkpoint import open_model


def prefill_ms(model, ids: torch.Tensor, repeats: int) -> float:
    """Median ms of a prefill without a cache (last position's logits), after one warm-up."""
    return median_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), repeats, warmup=1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", default="results/smollm2/model", help="the uncompressed model")
    p.add_argument("--family", default="llama")
    p.add_argument("--quantized", required=True, help="a W8A8 qsvd checkpoint (loaded with integer kernels)")
    p.add_argument("--cells", nargs="+", default=["1x128", "1x512", "4x512"], help="batch x tokens")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile-rows", type=int, default=12, help="operators listed; 0: no profile")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dense, _ = open_model(args.dense, args.family)
    quantized = qsvd.from_pretrained(args.quantized, cache_mode="kv", integer=True)
    generator = torch.Generator().manual_seed(0)
    for cell in args.cells:
        batch, tokens = (int(v) for v in cell.split("x"))
        ids = torch.randint(100, dense.config.vocab_size, (batch, tokens), generator=generator)
        fp32, w8a8 = prefill_ms(dense, ids, args.repeats), prefill_ms(quantized, ids, args.repeats)
        print(f"batch {batch} x {tokens} tokens: float32 {fp32:.0f} ms, W8A8 {w8a8:.0f} ms, {fp32 / w8a8:.2f}x")
    if args.profile_rows:
        from torch.profiler import ProfilerActivity, profile

        ids = torch.randint(100, dense.config.vocab_size, (1, 512), generator=generator)
        prefill_ms(quantized, ids, 1)
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                quantized(input_ids=ids, use_cache=False, logits_to_keep=1)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))


if __name__ == "__main__":
    main()
