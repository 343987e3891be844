"""Latent attention: generation caches each decomposed unit's latent C = B x, and K and V are rebuilt from it.

`use_latent_cache(model, mode)` binds `latent_forward` in place of every LM attention's forward and makes
`generate()` use a `LatentCache` (qsvd.models.latent_cache) by default. With a `LatentCache`, a layer whose plan
caches a latent (`qsvd.math.cost.layer_caches`, the cost model's own rule) stores C (its int8 codes and per-token
scale when the latent is quantized) and:
- `latent`: rebuilds K = RoPE(A_k C + b_k) at the cached positions every step, and absorbs V: the attention
  weights multiply the latents (P·C), then A_v maps them per head (Σ P = 1, so b_v adds as it is);
- `latent_v`: caches post-RoPE K as usual and C for the absorbed V.
V is absorbed where that is the cheaper order (`absorbs_values`: a decode step); a prefill rebuilds V = A_v C + b_v
for the cached tokens instead and runs the model's own attention kernel (SDPA), as attending with every head over
the r-wide latents costs ~heads·tokens / (kv_heads·d) times more;
- `kv`: nothing changes (transformers' own cache holds the K and V the low-rank projections give).
With any other cache (or none), the attention runs its own forward: training, perplexity and the pipeline's
stages are untouched. The rebuild is unfused PyTorch (a fused kernel is what would turn memory into speed).
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaModel, eager_attention_forward

from qsvd.math.cost import CACHE_MODES, LayerCache, LayerShape, Unit, layer_cache
from qsvd.models.latent_cache import LatentCache, cached_codes, cached_latent, latent_parts
from qsvd.models.lowrank import LatentUpProjection, SharedDownProjection
from qsvd.models.registry import ModelFamily, attention_of, decoder_layers, family_of, part, qkv_projections

PLAN = "_qsvd_latent_plan"


@dataclass(frozen=True)
class AttentionPlan:
    """One attention layer's latent plan and the modules it reads (plain attributes: nothing new is saved)."""

    cache: LayerCache
    downs: dict[str, SharedDownProjection]
    projections: dict[str, nn.Module]  # "q", "k", "v"
    rotary_embedding: nn.Module
    own_forward: types.MethodType


def installed_units(model: nn.Module, family: ModelFamily) -> list[tuple[LayerShape, dict[str, SharedDownProjection]]]:
    """Per LM layer, its shape and its low-rank units as installed: group ("qkv", "k", ...) -> shared down-projection."""
    layers = []
    for layer in decoder_layers(model, family):
        projections = qkv_projections(layer, family)
        shape = LayerShape(projections[0].in_features, *(p.out_features for p in projections))
        groups: dict[int, tuple[str, SharedDownProjection]] = {}
        for which, projection in zip("qkv", projections):
            if isinstance(projection, LatentUpProjection):
                group, down = groups.get(id(projection.down), ("", projection.down))
                groups[id(projection.down)] = (group + which, down)
        layers.append((shape, dict(groups.values())))
    return layers


def layer_cache_plans(model: nn.Module, mode: str) -> list[LayerCache]:
    """What a cache of `mode` holds in each LM layer of `model` (`cost.layer_cache` of its installed units)."""
    return [layer_cache(shape, [(Unit(index, group, shape), down.rank) for group, down in downs.items()], mode)
            for index, (shape, downs) in enumerate(installed_units(model, family_of(model)))]


def _cache_argument() -> str:
    """The keyword transformers' forwards take the cache by: `cache` since 5.24, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


CACHE_ARGUMENT = _cache_argument()


def use_latent_cache(model: nn.Module, mode: str = "latent") -> list[LayerCache]:
    """Give every LM attention of `model` the latent forward and make `generate()` cache as `mode` says by default
    (a cache passed to generate is used as given). Returns what each layer caches. Calling it again changes the mode."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache mode must be one of {CACHE_MODES}, got {mode!r}")
    family = family_of(model)
    rotary = part(model, family.rotary_embedding, family)
    plans = layer_cache_plans(model, mode)
    for layer, (_, downs), cache in zip(decoder_layers(model, family), installed_units(model, family), plans):
        attention = attention_of(layer, family)
        previous = attention.__dict__.get(PLAN)
        own = previous.own_forward if previous else attention.forward
        projections = dict(zip("qkv", qkv_projections(layer, family)))
        setattr(attention, PLAN, AttentionPlan(cache, downs, projections, rotary, own))
        attention.forward = types.MethodType(latent_forward, attention)
    model.qsvd_cache_mode = mode
    if "generate" not in model.__dict__:
        model.generate = types.MethodType(_generate, model)
    return plans


def new_cache(model: nn.Module) -> LatentCache:
    """An empty cache for `model` in the mode `use_latent_cache` set."""
    if not hasattr(model, "qsvd_cache_mode"):
        raise ValueError("this model has no latent attention: call qsvd.models.latent_attention.use_latent_cache first")
    family = family_of(model)
    layers = [getattr(attention_of(layer, family), PLAN).cache.latents for layer in decoder_layers(model, family)]
    return LatentCache([bool(latents) for latents in layers], model.qsvd_cache_mode)


def _generate(model: nn.Module, *args, **kwargs):
    """`generate`, with a new `LatentCache` unless a cache is given, caching is off, or the mode is `kv`."""
    given = any(kwargs.get(name) is not None for name in ("cache", "past_key_values"))
    if not given and kwargs.get("use_cache", True) and model.qsvd_cache_mode != "kv":
        kwargs[CACHE_ARGUMENT] = new_cache(model)
    return type(model).generate(model, *args, **kwargs)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Llama's rotary embedding of x laid out (batch, tokens, heads, head_dim), returned (batch, heads, tokens,
    head_dim): per element transformers' x·cos + rotate_half(x)·sin in the same order (rotate_half's negation is a
    subtraction, which rounds the same), written into one output on contiguous memory instead of concatenating."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    first, second = out[..., :half], out[..., half:]
    torch.mul(x1, cos[..., :half], out=first)
    first.sub_(x2 * sin[..., :half])
    torch.mul(x2, cos[..., half:], out=second)
    second.add_(x1 * sin[..., half:])
    return out.transpose(1, 2)


def absorbs_values(tokens: int, heads: int, length: int, rank: int, kv_heads: int, head_dim: int) -> bool:
    """Whether attending over the cached latents and applying A_v per head afterwards (heads·tokens·r·(length + d)
    multiply-adds) costs less than rebuilding V = A_v C for every cached token first (length·r·kv_heads·d, then
    heads·tokens·length·d): true for a decode step, false for a prefill longer than about kv_heads·d / heads tokens."""
    absorbed = heads * tokens * rank * (length + head_dim)
    rebuilt = length * rank * kv_heads * head_dim + heads * tokens * length * head_dim
    return absorbed < rebuilt


def latent_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                   past_key_values=None, **kwargs):
    """The attention forward with a `LatentCache` (see the module docstring); its own forward otherwise."""
    plan: AttentionPlan = getattr(self, PLAN)
    cache = cache if cache is not None else past_key_values
    if not isinstance(cache, LatentCache) or not plan.cache.latents:
        return plan.own_forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)
    layer = plan.cache
    batch, tokens = hidden_states.shape[:-1]
    heads_shape = (batch, tokens, -1, self.head_dim)
    cos, sin = position_embeddings
    query = apply_rope(plan.projections["q"](hidden_states).view(heads_shape), cos, sin)
    new = {}
    if layer.k_latent is None:
        new["k"] = apply_rope(plan.projections["k"](hidden_states).view(heads_shape), cos, sin)
    if layer.v_latent is None:
        new["v"] = plan.projections["v"](hidden_states).view(heads_shape).transpose(1, 2)
    for group in layer.latents:
        down = plan.downs[group]
        new |= latent_parts(group, down(hidden_states), down.last_codes, down.latent_transform.bits)
    parts = cache.layers[self.layer_idx].append(new)
    length = next(iter(parts.values())).shape[-2]

    def latent(group: str) -> torch.Tensor:
        down = plan.downs[group]
        return cached_latent(parts, group, down.rank, down.latent_transform.bits, query.dtype)

    def rebuild(group: str, up: nn.Module) -> torch.Tensor:
        """A C + b over every cached latent: from their int8 codes with one integer matmul where `up` is packed."""
        down = plan.downs[group]
        codes = cached_codes(parts, group, down.rank, down.latent_transform.bits)
        if codes is not None and hasattr(up, "project_codes"):
            return up.project_codes(*codes, query.dtype)
        return up.project(latent(group))

    if layer.k_latent is None:
        key = parts["k"]
    else:
        if kwargs.get("position_ids") is None:
            raise ValueError("the latent cache rebuilds K with RoPE and needs position_ids in the attention's kwargs")
        cache.record_positions(kwargs["position_ids"], length, batch)
        key = rebuild(layer.k_latent, plan.projections["k"])
        key = apply_rope(key.view(batch, length, -1, self.head_dim), *cache.rotary(plan.rotary_embedding, key))
    kv_heads = key.shape[1]
    absorb = layer.v_latent is not None and absorbs_values(tokens, query.shape[1], length,
                                                           plan.downs[layer.v_latent].rank, kv_heads, self.head_dim)
    if layer.v_latent is None:
        value = parts["v"]
    elif absorb:
        value_latent = latent(layer.v_latent)
        value = value_latent[:, None].expand(batch, kv_heads, length, value_latent.shape[-1])
    else:  # a prefill: V = A_v C + b_v for every cached token costs less than attending over C with every head
        value = rebuild(layer.v_latent, plan.projections["v"]).view(batch, length, -1, self.head_dim).transpose(1, 2)
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
    sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    output, weights = attention(self, query, key, value, attention_mask, dropout=0.0 if not self.training else
                                self.attention_dropout, scaling=self.scaling, sliding_window=sliding_window, **kwargs)
    if absorb:  # output holds P·C per head: apply A_v (and b_v) per KV head's group of heads
        up = plan.projections["v"]
        weight = up.dequantized_weight(output.dtype) if hasattr(up, "dequantized_weight") else up.weight
        groups = output.shape[2] // kv_heads
        per_head = output.reshape(batch, tokens, kv_heads, groups, -1)
        output = torch.einsum("btkgr,kdr->btkgd", per_head, weight.view(kv_heads, self.head_dim, -1))
        if up.bias is not None:
            output = output + up.bias.view(kv_heads, 1, self.head_dim)
    output = self.o_proj(output.reshape(batch, tokens, -1).contiguous())
    return output, weights
