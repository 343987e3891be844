"""The one cost model: parameters, FLOPs and KV-cache size of low-rank attention (method §2).

Joint QKV at rank r replaces E·(d_q+d_k+d_v) weights by r·(E+d_q+d_k+d_v). The KV cache per
token per layer holds the latent (r values) or K and V (2·d_kv values), whichever is smaller:
for GQA the latent can cost more, and then a real implementation caches K and V.
R1 = low-rank QKV params / dense QKV params; R2 = cached values / dense K+V values.
"""

from __future__ import annotations

from dataclasses import dataclass

BUDGET_KINDS = ("rank_fraction", "R1", "R2")


@dataclass(frozen=True)
class LayerShape:
    """Input size E and output sizes of q, k, v of one attention layer."""

    hidden_size: int
    q_out: int
    k_out: int
    v_out: int

    @property
    def qkv_out(self) -> int:
        return self.q_out + self.k_out + self.v_out

    @property
    def max_rank(self) -> int:
        return min(self.hidden_size, self.qkv_out)

    @property
    def dense_params(self) -> int:
        return self.hidden_size * self.qkv_out

    @property
    def dense_cache(self) -> int:
        return self.k_out + self.v_out

    def lowrank_params(self, rank: int) -> int:
        return rank * (self.hidden_size + self.qkv_out)

    def caches_latent(self, rank: int) -> bool:
        return rank <= self.dense_cache

    def cache_values(self, rank: int) -> int:
        return min(rank, self.dense_cache)


@dataclass(frozen=True)
class PlanCost:
    R1: float
    R2: float
    rank_fraction: float
    params: int
    dense_params: int
    flops_per_token: int
    kv_cache_bytes_per_token: int
    dense_kv_cache_bytes_per_token: int
    latent_cached_layers: list[int]


def plan_cost(shapes: list[LayerShape], ranks: list[int], cache_bytes_per_value: float = 2.0) -> PlanCost:
    """Cost of a per-layer rank plan (cache counted at `cache_bytes_per_value`, 2 for fp16)."""
    if len(shapes) != len(ranks):
        raise ValueError(f"{len(ranks)} ranks for {len(shapes)} layers")
    params = sum(s.lowrank_params(r) for s, r in zip(shapes, ranks))
    dense = sum(s.dense_params for s in shapes)
    cache = sum(s.cache_values(r) for s, r in zip(shapes, ranks))
    dense_cache = sum(s.dense_cache for s in shapes)
    return PlanCost(
        R1=params / dense,
        R2=cache / dense_cache,
        rank_fraction=sum(ranks) / sum(s.hidden_size for s in shapes),
        params=params,
        dense_params=dense,
        flops_per_token=2 * params,
        kv_cache_bytes_per_token=round(cache * cache_bytes_per_value),
        dense_kv_cache_bytes_per_token=round(dense_cache * cache_bytes_per_value),
        latent_cached_layers=[i for i, (s, r) in enumerate(zip(shapes, ranks)) if s.caches_latent(r)],
    )


def budget_measure(shapes: list[LayerShape], kind: str):
    """The function ranks -> the measure a budget of `kind` constrains."""
    if kind not in BUDGET_KINDS:
        raise ValueError(f"unknown budget kind {kind!r}; use one of {BUDGET_KINDS}")

    def measure(ranks: list[int]) -> float:
        return getattr(plan_cost(shapes, ranks), kind)

    return measure
