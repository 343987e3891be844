"""Cross-layer rank allocation: global top-K of importance scores, or one rank everywhere (method §2)."""

from __future__ import annotations

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
