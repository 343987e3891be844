"""Cross-layer rank allocation (method §2): global top-K of importance scores, ranks in proportion to each unit's
Fisher information (Palu's FIB, the paper's Table 3 baseline), or one rank everywhere.

Every allocator takes the same arguments, a measure of a plan's cost and the budget it must meet, `r_min` and each
unit's full rank, and returns the kept singular indices of every unit (sorted).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

RankCost = Callable[[list[int]], float]


def importance(sigma: torch.Tensor, grad_sigma_sq_mean: torch.Tensor) -> torch.Tensor:
    """Empirical-Fisher importance I_i = σ_i² · mean_n g_{n,i}², in float32."""
    return (sigma.to(torch.float64).pow(2) * grad_sigma_sq_mean.to(torch.float64)).to(torch.float32)


def top_k_indices(scores: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """Pool every layer's scores and keep the global top-k; returns kept indices per layer (sorted).

    Ties are broken by (layer, index) order, so the result is deterministic.
    """
    sizes = [len(s) for s in scores]
    if not 0 <= k <= sum(sizes):
        raise ValueError(f"k={k} is outside [0, {sum(sizes)}]")
    pooled = torch.cat([s.to(torch.float64) for s in scores])
    order = torch.sort(-pooled, stable=True).indices[:k]
    keep = torch.zeros(len(pooled), dtype=torch.bool)
    keep[order] = True
    return [torch.nonzero(mask).flatten() for mask in keep.split(sizes)]


def clamp_indices(
    kept: list[torch.Tensor], scores: list[torch.Tensor], r_min: int, r_max: list[int]
) -> list[torch.Tensor]:
    """Clamp each layer's kept set to [r_min, r_max]: add its best missing scores, or drop its worst."""
    clamped = []
    for layer_kept, layer_scores, layer_max in zip(kept, scores, r_max):
        target = min(max(len(layer_kept), r_min), layer_max)
        ranked = torch.sort(-layer_scores.to(torch.float64), stable=True).indices
        if target > len(layer_kept):
            missing = ranked[~torch.isin(ranked, layer_kept)]
            layer_kept = torch.cat([layer_kept, missing[: target - len(layer_kept)]])
        elif target < len(layer_kept):
            layer_kept = ranked[torch.isin(ranked, layer_kept)][:target]
        clamped.append(torch.sort(layer_kept).values)
    return clamped


def allocate_by_importance(
    scores: list[torch.Tensor], cost: RankCost, target: float, r_min: int, r_max: list[int]
) -> list[torch.Tensor]:
    """The largest global top-K whose clamped plan costs at most `target` (binary search over K)."""
    total = sum(len(s) for s in scores)

    def plan(k: int) -> list[torch.Tensor]:
        return clamp_indices(top_k_indices(scores, k), scores, r_min, r_max)

    if cost([len(p) for p in plan(0)]) > target:
        raise ValueError(
            f"budget {target:.4f} is below the cost of the minimum plan (r_min={r_min} per layer); "
            "raise the budget or lower rank.r_min"
        )
    lo, hi = 0, total
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cost([len(p) for p in plan(mid)]) <= target:
            lo = mid
        else:
            hi = mid - 1
    return plan(lo)


def allocate_uniform(
    scores: list[torch.Tensor], cost: RankCost, target: float, r_min: int, r_max: list[int]
) -> list[torch.Tensor]:
    """The same rank r in every layer (capped per layer), the largest r whose cost fits; top singular values."""
    best = None
    for rank in range(max(r_max), -1, -1):
        ranks = [min(max(rank, r_min), m) for m in r_max]
        if cost(ranks) <= target:
            best = ranks
            break
    if best is None:
        raise ValueError(f"budget {target:.4f} is below the cost of rank r_min={r_min} in every layer")
    return [torch.arange(r) for r in best]


def fisher_information(grad_sq_sum: torch.Tensor, samples: int) -> float:
    """Palu's Fisher information of one weight W: the mean over its entries of the root mean square gradient,
    F = mean_jk sqrt(mean_n (∂loss_n/∂W_jk)²), from Σ_n G_n² (elementwise) over `samples` samples; in float64.

    sqrt(mean_n G²) is the square root of the empirical Fisher diagonal of each weight; its mean over the entries is
    one number per weight (per unit: the stacked projections the unit decomposes), whatever its shape."""
    if samples < 1:
        raise ValueError(f"Fisher information needs at least one sample, got {samples}")
    return (grad_sq_sum.to(torch.float64) / samples).sqrt().mean().item()


def fisher_quotients(fisher: list[float], r_max: list[int]) -> list[torch.Tensor]:
    """The Sainte-Laguë quotients F_u / (k + 1/2), k = 0 .. r_max_u - 1, of every unit: their global top-T gives
    each unit the rank that T ranks apportioned in proportion to F (Webster's rounding), capped at full rank."""
    for unit, value in enumerate(fisher):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"unit {unit} has Fisher information {value}: it must be finite and non-negative")
    return [value / (torch.arange(m, dtype=torch.float64) + 0.5) for value, m in zip(fisher, r_max)]


def allocate_by_fisher(
    fisher: list[float], cost: RankCost, target: float, r_min: int, r_max: list[int]
) -> list[torch.Tensor]:
    """Ranks in proportion to each unit's Fisher information (Palu's layer-level allocation, FIB in the QSVD paper's
    Table 3), the largest total that fits the budget; each unit keeps its leading (largest) singular values, as a
    truncated SVD would.

    `fisher[u]` is F_u = mean_jk sqrt(mean_n G_{n,jk}²) of the unit's stacked weight (`fisher_information`): how
    strongly the calibration loss reacts to its weights, one number per unit. Palu computes it per K/V projection
    (or head group) on a language-modelling loss; here it is per unit (one per layer in the joint layout) on the
    importance stage's answer-only loss, from the gradients that stage already takes.

    Palu gives unit u the share T·F_u/ΣF of a total rank T (floored, at most full rank) and hands the ranks the
    flooring leaves over out one by one. Here the same shares are apportioned by Sainte-Laguë/Webster (each rank is
    the share rounded to nearest, under one common divisor that makes the ranks add up to T): a unit at full rank
    passes its excess on to the others in proportion to theirs, and T + 1 ranks are T ranks plus one more, so the
    largest T whose plan costs at most the budget, of any kind (R1, R2, rank_fraction), is found by bisection. The
    two differ only in which units get the ranks the rounding leaves over; Palu's rounding of every rank to a
    multiple of 32 is not done. r_min is enforced as for every allocation (`clamp_indices`)."""
    return allocate_by_importance(fisher_quotients(fisher, r_max), cost, target, r_min, r_max)
