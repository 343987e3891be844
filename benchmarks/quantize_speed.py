"""Seconds (min of N) of the quantize stage's math on one decoder layer of LLaVA-7B's width, before and after.

    python benchmarks/quantize_speed.py                          # 4096 / 11008 / rank 1843, 2 threads
    python benchmarks/quantize_speed.py --before none            # the current code only
    python benchmarks/quantize_speed.py --hidden 1024 --mlp 2752 --rank 460 --tokens 1024   # a quick look

A low-rank layer (R1 0.6) quantized the way stage 9 does it: every weight by RTN with the clipping search
(4-bit, per row) or by GPTQ, and the latent's β chosen from the grid 0 … 1 on `--tokens` calibration tokens
(4-bit RTN weights, 4-bit per-token activations, a rotated latent). "Before" is the code of the git
revision `--before`, loaded from git; "after" is the working tree. The last column says whether both
give the same codes and scales (RTN, GPTQ) or the same β and grid errors (β search), bit for bit.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
import types
from pathlib import Path

import torch

from qsvd.bench_stages import cpu_model, min_seconds
from qsvd.math import beta as beta_now
from qsvd.math import quantize as quantize_now
from qsvd.math.hadamard import random_orthogonal

REPOSITORY = Path(__file__).resolve().parents[1]
BEFORE = "e3aae77"  # the revision before the quantize speed-up


def revision_module(revision: str, path: str, name: str) -> types.ModuleType:
    """The module at `path` as of git `revision` (it must import nothing from qsvd)."""
    source = subprocess.run(["git", "-C", str(REPOSITORY), "show", f"{revision}:{path}"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(name)
    module.__file__ = f"{revision}:{path}"
    sys.modules[name] = module  # dataclasses look their module up
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def layer(hidden: int, mlp: int, rank: int, tokens: int, seed: int) -> dict:
    """Random weights of one low-rank decoder layer, the latent's factors and calibration inputs."""
    g = torch.Generator().manual_seed(seed)
    channel = torch.randn(hidden, generator=g).exp()  # uneven input channels, like real activations
    sigma = torch.logspace(1, -1, rank, dtype=torch.float64)
    weights = {
        "latent down B": torch.randn(rank, hidden, generator=g) * 0.02,
        **{f"latent up {p}": torch.randn(hidden, rank, generator=g) * 0.02 for p in "qkv"},
        "o_proj": torch.randn(hidden, hidden, generator=g) * 0.02,
        "gate_proj": torch.randn(mlp, hidden, generator=g) * 0.02,
        "up_proj": torch.randn(mlp, hidden, generator=g) * 0.02,
        "down_proj": torch.randn(hidden, mlp, generator=g) * 0.02,
    }
    rotation = random_orthogonal(rank, seed)
    down = (rotation.T @ (torch.randn(rank, hidden, generator=g, dtype=torch.float64) * sigma.sqrt()[:, None])).float()
    up = ((torch.randn(3 * hidden, rank, generator=g, dtype=torch.float64) * sigma.sqrt()[None, :]) @ rotation).float()
    inputs = torch.randn(tokens, hidden, generator=g) * channel
    return {"weights": weights, "down": down, "up": up, "sigma": sigma, "rotation": rotation, "inputs": inputs}


def hessians(weights: dict, tokens: int, seed: int) -> dict[int, torch.Tensor]:
    """An XᵀX (float64) for every input width, from `tokens` random correlated inputs."""
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for columns in sorted({w.shape[1] for w in weights.values()}):
        x = torch.randn(tokens, columns, generator=g) * torch.randn(columns, generator=g).exp()
        out[columns] = (x.T @ x).double()
    return out


def same_quantized(a, b) -> bool:
    zero = (a.zero is None and b.zero is None) or (a.zero is not None and b.zero is not None and torch.equal(a.zero, b.zero))
    return torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and zero and a.group_size == b.group_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--rank", type=int, default=1843)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens of the β search")
    parser.add_argument("--hessian-tokens", type=int, default=1024)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of the current code (the minimum is kept)")
    parser.add_argument("--before-repeats", type=int, default=1)
    parser.add_argument("--before", default=BEFORE, help="git revision to compare with, or 'none'")
    parser.add_argument("--skip", nargs="*", default=[], choices=["rtn", "beta", "gptq"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    versions = {"after": (quantize_now, beta_now, args.repeats)}
    if args.before != "none":
        versions["before"] = (revision_module(args.before, "qsvd/math/quantize.py", "quantize_before"),
                              revision_module(args.before, "qsvd/math/beta.py", "beta_before"), args.before_repeats)
    data = layer(args.hidden, args.mlp, args.rank, args.tokens, args.seed)
    weights = data["weights"]
    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}, CPU {cpu_model()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; hidden {args.hidden}, MLP {args.mlp}, rank {args.rank}, {args.bits}-bit weights "
          f"and activations, β grid of {len(beta_now.BETA_GRID)} on {args.tokens} tokens; before = {args.before}")
    header = f"{'what':<30} {'before s':>9} {'after s':>9} {'speed-up':>8}  same"
    print(header)
    print("-" * len(header))
    totals: dict[str, dict[str, float]] = {"rtn": {}, "gptq": {}, "beta": {}}

    def row(label: str, kind: str, run) -> None:
        seconds, results = {}, {}
        for version, (quantize, beta, repeats) in versions.items():
            seconds[version], results[version] = min_seconds(lambda: run(quantize, beta), repeats)
            totals[kind][version] = totals[kind].get(version, 0.0) + seconds[version]
        before = seconds.get("before")
        same = "" if before is None else ("yes" if results["before"] == results["after"] else "NO")
        speed = "" if before is None else f"{before / seconds['after']:.1f}x"
        print(f"{label:<30} {'' if before is None else f'{before:.2f}':>9} {seconds['after']:>9.2f} {speed:>8}  {same}", flush=True)

    def rtn(weight):
        def run(quantize, _):
            q = quantize.quantize_rtn(weight, quantize.WeightFormat(args.bits))
            return _Comparable(q)
        return run

    if "rtn" not in args.skip:
        for name, weight in weights.items():
            row(f"RTN {name} {tuple(weight.shape)}", "rtn", rtn(weight))
    if "beta" not in args.skip:
        def search(quantize, beta):
            fmt = quantize.WeightFormat(args.bits)
            return beta.choose_beta(data["inputs"], data["down"], data["up"], data["sigma"], 0.5,
                                    lambda w: quantize.quantize_rtn(w, fmt).dequantize(),
                                    lambda x: quantize.quantize_per_token(x, args.bits, 0.9), data["rotation"])
        row(f"β search ({len(beta_now.BETA_GRID)} grid points)", "beta", search)
    if "gptq" not in args.skip:
        inverse_inputs = hessians(weights, args.hessian_tokens, args.seed)
        for name, weight in weights.items():
            def gptq(quantize, _, weight=weight):
                return _Comparable(quantize.quantize_gptq(weight, inverse_inputs[weight.shape[1]], quantize.WeightFormat(args.bits)))
            row(f"GPTQ {name} {tuple(weight.shape)}", "gptq", gptq)
    print("-" * len(header))
    for method in ("rtn", "gptq"):
        if totals[method] and totals["beta"]:
            layer_seconds = {v: totals[method][v] + totals["beta"][v] for v in totals[method]}
            before = layer_seconds.get("before")
            speed = "" if before is None else f"{before / layer_seconds['after']:.1f}x"
            print(f"{'layer: ' + method.upper() + ' + β search':<30} {'' if before is None else f'{before:.2f}':>9} "
                  f"{layer_seconds['after']:>9.2f} {speed:>8}")


class _Comparable:
    """A QuantizedWeight that compares equal to another with the same codes, scales and zeros."""

    def __init__(self, quantized) -> None:
        self.quantized = quantized

    def __eq__(self, other) -> bool:
        return same_quantized(self.quantized, other.quantized)


if __name__ == "__main__":
    main()
