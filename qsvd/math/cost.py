"""The one cost model: parameters, FLOPs and KV-cache size of low-rank attention (method §2).

A unit is one decomposed weight: a group of q/k/v projections of one layer stacked and factored at
rank r, which replaces E·d weights by r·(E + d) (d: the group's output size). Projections in no
group stay dense. The KV cache per token holds, for each group that produces K or V, its latent
(r values) or those K/V outputs themselves, whichever is smaller: for GQA the latent can cost more,
and then a real implementation caches K and V. Dense K/V are cached as they are.
R1 = QKV params / dense QKV params; R2 = cached values / dense K+V values.
"""

from __future__ import annotations

from dataclasses import dataclass

from qsvd.methods import LAYOUTS

BUDGET_KINDS = ("rank_fraction", "R1", "R2")
PROJECTIONS = "qkv"


@dataclass(frozen=True)
class LayerShape:
    """Input size E and output sizes of q, k, v of one attention layer."""

    hidden_size: int
    q_out: int
    k_out: int
    v_out: int

    def out(self, projections: str) -> int:
        """Summed output size of the named projections, e.g. "qkv" or "k"."""
        return sum(getattr(self, f"{p}_out") for p in projections)

    @property
    def dense_params(self) -> int:
        return self.hidden_size * self.out(PROJECTIONS)

    @property
    def dense_cache(self) -> int:
        return self.out("kv")


@dataclass(frozen=True)
class Unit:
    """One decomposed weight: the stacked projections `group` of layer `layer`."""

    layer: int
    group: str
    shape: LayerShape

    @property
    def name(self) -> str:
        return f"layer.{self.layer}.{self.group}"

    @property
    def out_features(self) -> int:
        return self.shape.out(self.group)

    @property
    def max_rank(self) -> int:
        return min(self.shape.hidden_size, self.out_features)

    @property
    def kv_out(self) -> int:
        return self.shape.out(p for p in self.group if p in "kv")

    def params(self, rank: int) -> int:
        return rank * (self.shape.hidden_size + self.out_features)

    def caches(self, rank: int) -> str:
        """What this unit puts in the KV cache: its "latent", its "kv" outputs, or "none" (Q only). At rank = its K/V
        size the latent holds as many values and needs the K rebuild and positions besides: it caches K/V."""
        if self.kv_out == 0:
            return "none"
        return "latent" if rank < self.kv_out else "kv"

    def cache_values(self, rank: int) -> int:
        return min(rank, self.kv_out)


def layout_units(shapes: list[LayerShape], layout: str) -> list[Unit]:
    """The units of `layout` in every layer, layer by layer."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {sorted(LAYOUTS)}")
    return [Unit(i, group, shape) for i, shape in enumerate(shapes) for group in LAYOUTS[layout]]


def dense_projections(layout: str) -> str:
    """The projections a layout leaves dense, e.g. "q" for "kv"."""
    return "".join(p for p in PROJECTIONS if not any(p in group for group in LAYOUTS[layout]))


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
    latent_cached_units: list[str]


def plan_cost(
    shapes: list[LayerShape], ranks: list[int], layout: str = "joint", cache_bytes_per_value: float = 2.0
) -> PlanCost:
    """Cost of a rank plan: one rank per unit of `layout` (cache counted at 2 bytes a value: fp16)."""
    units = layout_units(shapes, layout)
    if len(units) != len(ranks):
        raise ValueError(f"{len(ranks)} ranks for {len(units)} units ({layout!r} layout, {len(shapes)} layers)")
    dense = dense_projections(layout)
    params = sum(u.params(r) for u, r in zip(units, ranks)) + sum(s.hidden_size * s.out(dense) for s in shapes)
    cache = sum(u.cache_values(r) for u, r in zip(units, ranks)) + sum(s.out(p for p in dense if p in "kv") for s in shapes)
    dense_params = sum(s.dense_params for s in shapes)
    dense_cache = sum(s.dense_cache for s in shapes)
    return PlanCost(
        R1=params / dense_params,
        R2=cache / dense_cache,
        rank_fraction=sum(ranks) / sum(u.max_rank for u in units),
        params=params,
        dense_params=dense_params,
        flops_per_token=2 * params,
        kv_cache_bytes_per_token=round(cache * cache_bytes_per_value),
        dense_kv_cache_bytes_per_token=round(dense_cache * cache_bytes_per_value),
        latent_cached_units=[u.name for u, r in zip(units, ranks) if u.caches(r) == "latent"],
    )


def budget_measure(shapes: list[LayerShape], kind: str, layout: str = "joint"):
    """The function ranks (one per unit) -> the measure a budget of `kind` constrains."""
    if kind not in BUDGET_KINDS:
        raise ValueError(f"unknown budget kind {kind!r}; use one of {BUDGET_KINDS}")

    def measure(ranks: list[int]) -> float:
        return getattr(plan_cost(shapes, ranks, layout), kind)

    return measure


CACHE_MODES = ("kv", "latent", "latent_v")  # what generation caches for a latent-caching unit (method §2)


@dataclass(frozen=True)
class LayerCache:
    """What one layer's cache holds in a cache mode: K is rebuilt from `k_latent`'s latent (else cached post-RoPE),
    V is absorbed from `v_latent`'s latent (else cached); `latents` are the groups whose latent is cached, with ranks."""

    k_latent: str | None
    v_latent: str | None
    latents: dict[str, int]
    k_out: int
    v_out: int


def layer_cache(shape: LayerShape, units: list[tuple[Unit, int]], mode: str) -> LayerCache:
    """What a cache of `mode` holds for one layer with these (unit, rank)s: `kv` caches K and V; `latent` caches only
    the latent of every unit whose plan caches it (`Unit.caches`); `latent_v` caches post-RoPE K and V's latent."""
    if mode not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {mode!r}; use one of {CACHE_MODES}")
    latent_groups = {u.group: r for u, r in units if u.caches(r) == "latent"}
    source = {p: next((g for g in latent_groups if p in g), None) for p in "kv"}
    k_latent = source["k"] if mode == "latent" else None
    v_latent = source["v"] if mode != "kv" else None
    latents = {g: latent_groups[g] for g in dict.fromkeys(g for g in (k_latent, v_latent) if g is not None)}
    return LayerCache(k_latent, v_latent, latents, shape.k_out, shape.v_out)


def layer_caches(shapes: list[LayerShape], ranks: list[int], layout: str, mode: str) -> list[LayerCache]:
    """`layer_cache` of every layer of a rank plan."""
    units = layout_units(shapes, layout)
    if len(units) != len(ranks):
        raise ValueError(f"{len(ranks)} ranks for {len(units)} units ({layout!r} layout, {len(shapes)} layers)")
    return [layer_cache(shape, [(u, r) for u, r in zip(units, ranks) if u.layer == index], mode)
            for index, shape in enumerate(shapes)]


def latent_code_bytes(rank: int, bits: int | None, value_bytes: int) -> int:
    """Bytes of one token's cached latent: floats, int8 codes, or ≤ 4-bit codes two per byte; plus its scale."""
    if bits is None:
        return rank * value_bytes
    return (rank + 1) // 2 + value_bytes if bits <= 4 else rank + value_bytes


POSITION_BYTES = 4  # int32 position of each cached token, once per cache, where some layer rebuilds K with RoPE


def cache_bytes(
    shapes: list[LayerShape], ranks: list[int], layout: str, mode: str, batch: int, tokens: int, value_bytes: int,
    latent_bits: int | None = None,
) -> int:
    """The bytes a generation cache of `mode` holds for `batch` sequences of `tokens` tokens: K/V in `value_bytes`
    per value, latents as `latent_code_bytes`, and the positions the K rebuild needs (what the latent cache measures)."""
    caches = layer_caches(shapes, ranks, layout, mode)
    per_token = sum(
        (c.k_out * value_bytes if c.k_latent is None else 0) + (c.v_out * value_bytes if c.v_latent is None else 0)
        + sum(latent_code_bytes(r, latent_bits, value_bytes) for r in c.latents.values())
        for c in caches
    )
    if any(c.k_latent is not None for c in caches):
        per_token += POSITION_BYTES
    return batch * tokens * per_token
