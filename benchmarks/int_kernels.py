"""Median milliseconds of one linear layer by every path `qsvd.models.packed` can take, against float F.linear.

    python benchmarks/int_kernels.py                      # 2048x2048 and SmolLM2's 576->1536, M = 1, 32, 512, 2 threads
    python benchmarks/int_kernels.py --threads 1 --repeats 50

Rows: float32 and bf16 F.linear (the references); PackedLinear W8A8 and W4A8 (dynamic per-token int8 activation codes,
`torch._int_mm`, rescale; W4 unpacks its nibbles on every call) from float32 inputs; the weight-only paths W8A16
(`_weight_int8pack_mm`) and W4A16 (`_weight_int4pack_mm_for_cpu`, groups of 128) from bf16 inputs, and the
dequantize-then-F.linear fallback (float32 W4A16). Each time is the median of `--repeats` runs after `--warmup`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from qsvd.bench_stages import cpu_model
from qsvd.math.quantize import WeightFormat, quantize_rtn
from qsvd.models.input_transform import InputTransform
from qsvd.models.packed import PackedLinear

SHAPES = {"2048x2048": (2048, 2048), "SmolLM2 576->1536": (576, 1536)}  # (in, out)
TOKENS = (1, 32, 512)


def median_ms(function, repeats: int, warmup: int) -> float:
    with torch.no_grad():
        for _ in range(warmup):
            function()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def packed_layer(linear: nn.Linear, bits: int, group_size: int | None, act_bits: int | None, dtype: torch.dtype) -> PackedLinear:
    quantized = quantize_rtn(linear.weight, WeightFormat(bits, True, group_size, clip_search=False))
    source = nn.Linear(linear.in_features, linear.out_features, bias=False).to(dtype)
    source.input_transform = InputTransform(linear.in_features)
    source.input_transform.set_quantization(act_bits)
    return PackedLinear.from_quantized(source, quantized, bits)


def variants(linear: nn.Linear) -> list[tuple[str, torch.dtype, nn.Module]]:
    """(label, activation dtype, module) of every path."""
    half = nn.Linear(linear.in_features, linear.out_features, bias=False).to(torch.bfloat16)
    half.weight.data.copy_(linear.weight.data)
    rows = [("F.linear fp32", torch.float32, linear), ("F.linear bf16", torch.bfloat16, half)]
    for label, bits, group, act_bits, dtype in [
        ("W8A8 int_mm (fp32 in/out)", 8, None, 8, torch.float32),
        ("W4A8 int_mm, unpack per call (fp32)", 4, None, 8, torch.float32),
        ("W8A16 weight-only (bf16)", 8, None, None, torch.bfloat16),
        ("W4A16 weight-only g128 (bf16)", 4, 128, None, torch.bfloat16),
        ("W4A16 dequant + F.linear (fp32)", 4, 128, None, torch.float32),
    ]:
        module = packed_layer(linear, bits, group, act_bits, dtype)
        rows.append((f"{label} [{module.kernel}]", dtype, module))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {cpu_model()}; median ms of {args.repeats} runs after {args.warmup}")
    generator = torch.Generator().manual_seed(args.seed)
    for shape_label, (features_in, features_out) in SHAPES.items():
        linear = nn.Linear(features_in, features_out, bias=False).requires_grad_(False)
        linear.weight.data = torch.randn(features_out, features_in, generator=generator) * 0.02
        rows = variants(linear)
        print(f"\n{shape_label}" + "".join(f"{f'M={m}':>12}" for m in TOKENS))
        inputs = {m: torch.randn(m, features_in, generator=generator) for m in TOKENS}
        for label, dtype, module in rows:
            times = [median_ms(lambda x=inputs[m].to(dtype): module(x), args.repeats, args.warmup) for m in TOKENS]
            print(f"  {label:<48}" + "".join(f"{t:12.3f}" for t in times))


if __name__ == "__main__":
    main()
