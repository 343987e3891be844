"""Seconds (min of N) of qsvd.math.svd.thin_svd against torch.linalg.svd on a joint-QKV-sized float64 matrix.

    python benchmarks/svd_speed.py                     # 12288×4096, 2 threads (about 6 minutes)
    python benchmarks/svd_speed.py --rows 3072 --columns 1024 --repeats 3 --reference-repeats 3

Cases: a Gaussian matrix, and the same with an activation-like column scaling (ASVD's s = a^0.5 of
log-normal channel magnitudes with 1% outlier channels ×20). Besides the times it prints the path
thin_svd took, σ_min/σ_max, the largest relative singular value difference to torch.linalg.svd
(over σ ≥ 1e-6·σ_max) and the reconstruction error ‖U Σ Vᵀ − A‖/‖A‖.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from qsvd.bench_stages import cpu_model, min_seconds
from qsvd.math.svd import thin_svd_with_method


def cases(rows: int, columns: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(rows, columns, dtype=torch.float64, generator=g)
    magnitude = torch.randn(columns, dtype=torch.float64, generator=g).exp()
    magnitude[torch.randperm(columns, generator=g)[: max(1, columns // 100)]] *= 20
    return {"random": gaussian, "activation-scaled": gaussian * magnitude.sqrt()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=12288)
    parser.add_argument("--columns", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of thin_svd (the minimum is kept)")
    parser.add_argument("--reference-repeats", type=int, default=1, help="runs of torch.linalg.svd")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}, CPU {cpu_model()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rows}x{args.columns} float64")
    header = f"{'matrix':<18} {'thin_svd s':>10} {'path':>5} {'linalg.svd s':>12} {'speed-up':>8} {'smin/smax':>9} {'max rel dsigma':>14} {'recon err':>9}"
    print(header)
    print("-" * len(header))
    for name, matrix in cases(args.rows, args.columns, args.seed).items():
        fast, (u, sigma, v, method) = min_seconds(lambda: thin_svd_with_method(matrix), args.repeats)
        slow, reference = min_seconds(lambda: torch.linalg.svd(matrix, full_matrices=False), args.reference_repeats)
        ref_sigma = reference[1]
        resolved = ref_sigma >= 1e-6 * ref_sigma[0]
        relative = float(((sigma - ref_sigma).abs()[resolved] / ref_sigma[resolved]).max())
        reconstruction = float(((u * sigma) @ v.T - matrix).norm() / matrix.norm())
        ratio = float(ref_sigma[-1] / ref_sigma[0])
        print(f"{name:<18} {fast:>10.1f} {method:>5} {slow:>12.1f} {slow / fast:>7.1f}x {ratio:>9.1e} {relative:>14.1e} {reconstruction:>9.1e}")


if __name__ == "__main__":
    main()
