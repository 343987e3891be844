"""The latent KV cache: a transformers `Cache` whose layers hold each unit's latent C instead of K and V.

`LatentLayer` holds named parts, each (batch, heads, tokens, width) with tokens on dim -2 as transformers'
layers do: "k" (post-RoPE K) and "v" where they are cached, and per latent-caching group its latent (floats, or
int8 codes, or ≤ 4-bit codes two per byte) and "<group>.scale" (the per-token scale of quantized codes).
`LatentCache` keeps the positions of the cached tokens once for all layers (int32), which the K rebuild needs
for RoPE, and follows beam reordering, cropping and batch selection on them as on every part. The attention
side is `qsvd.models.latent_attention`.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from qsvd.math.packing import pack_codes, unpack_codes


def kept_tokens(length: int, crop: int) -> int:
    """Tokens left by `crop(n)`: n < 0 removes |n| (transformers ≥ 5.24), n ≥ 0 is the length to keep (before)."""
    return max(length + crop, 0) if crop < 0 else min(crop, length)


class LatentLayer(DynamicLayer):
    """One attention layer's cache: named parts, all grown along the token dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: dict[str, torch.Tensor] = {}

    def append(self, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add the new tokens' parts and return every cached token's."""
        if not self.is_initialized:
            self.device = next(iter(new.values())).device
            self.parts = dict(new)
            self.is_initialized = True
        else:
            if new.keys() != self.parts.keys():
                raise ValueError(f"latent cache layer holds {sorted(self.parts)}, was given {sorted(new)}")
            self.parts = {name: torch.cat([self.parts[name], tensor], dim=-2) for name, tensor in new.items()}
        self.keys = next(iter(self.parts.values()))  # what the inherited length and mask-size queries read
        self.values = self.keys[..., :0]
        return self.parts

    def update(self, key_states, value_states, *args, **kwargs):
        raise TypeError("a latent cache layer is written by qsvd's latent attention (append), not with K and V: "
                        "install it with qsvd.models.latent_attention.use_latent_cache(model, mode)")

    def _apply(self, function) -> None:
        if self.is_initialized:
            self.parts = {name: function(tensor) for name, tensor in self.parts.items()}
            self.keys = next(iter(self.parts.values()))
            self.values = self.keys[..., :0]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def crop(self, tokens_to_remove: int) -> None:
        if self.is_initialized:
            keep = kept_tokens(self.get_seq_length(), tokens_to_remove)
            self._apply(lambda t: t[..., :keep, :])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._apply(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.parts = {}
        super().reset()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.parts.values())


def latent_parts(group: str, latent: torch.Tensor, codes: tuple[torch.Tensor, torch.Tensor] | None,
                 bits: int | None) -> dict[str, torch.Tensor]:
    """The cache parts of one group's latent for new tokens: (batch, 1, tokens, r) floats, or its codes
    (packed two per byte at ≤ 4 bits) and (batch, 1, tokens, 1) scales."""
    if codes is None:
        return {group: latent[:, None]}
    values, scale = codes
    return {group: pack_codes(values, bits)[:, None], f"{group}.scale": scale[:, None]}


def cached_codes(parts: dict[str, torch.Tensor], group: str, rank: int, bits: int | None
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every cached token's latent of `group` as (int8 codes (batch, tokens, r), scales (batch, tokens, 1)), or None
    where the latent is cached as floats."""
    if f"{group}.scale" not in parts:
        return None
    return unpack_codes(parts[group][:, 0], bits, rank, signed=True), parts[f"{group}.scale"][:, 0]


def cached_latent(parts: dict[str, torch.Tensor], group: str, rank: int, bits: int | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """Every cached token's latent of `group`, (batch, tokens, r) in `dtype`: exactly what the down-projection gave."""
    codes = cached_codes(parts, group, rank, bits)
    return parts[group][:, 0] if codes is None else codes[0].to(dtype) * codes[1]


class LatentCache(Cache):
    """A generation cache for a model with qsvd's latent attention: `LatentLayer`s where a layer caches a latent,
    plain `DynamicLayer`s elsewhere, and the cached tokens' positions once (int32, batch × tokens)."""

    def __init__(self, latent_layers: list[bool], mode: str) -> None:
        super().__init__(layers=[LatentLayer() if latent else DynamicLayer() for latent in latent_layers])
        self.mode = mode
        self.positions: torch.Tensor | None = None
        self._rope: tuple[int, torch.Tensor, torch.Tensor] | None = None

    def record_positions(self, position_ids: torch.Tensor, cached_tokens: int, batch: int) -> torch.Tensor:
        """Append the new tokens' positions unless another layer of this forward already did; every cached one's."""
        held = 0 if self.positions is None else self.positions.shape[-1]
        new = cached_tokens - held
        if new > 0:
            step = position_ids[..., -new:].to(torch.int32).expand(batch, -1)
            self.positions = step.contiguous() if self.positions is None else torch.cat([self.positions, step], dim=-1)
        elif new < 0:
            raise RuntimeError(f"latent cache holds {held} positions but a layer holds {cached_tokens} tokens")
        return self.positions

    def rotary(self, rotary_embedding, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of every cached position (computed once per step for all layers)."""
        length = self.positions.shape[-1]
        if self._rope is None or self._rope[0] != length:
            cos, sin = rotary_embedding(like, self.positions.long())
            self._rope = (length, cos, sin)
        return self._rope[1], self._rope[2]

    def _positions_apply(self, function) -> None:
        self._rope = None
        if self.positions is not None:
            self.positions = function(self.positions)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._positions_apply(lambda p: p.index_select(0, beam_idx.to(p.device)))

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.positions is not None:
            keep = kept_tokens(self.positions.shape[-1], tokens_to_remove)
            self._positions_apply(lambda p: p[..., :keep])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._positions_apply(lambda p: p.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._positions_apply(lambda p: p[indices, ...])

    def reset(self) -> None:
        super().reset()
        self.positions, self._rope = None, None

    @property
    def nbytes(self) -> int:
        """Bytes held: every layer's cached tensors and the positions (what `cost.cache_bytes` predicts)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, LatentLayer):
                total += layer.nbytes
            elif layer.is_initialized:
                total += layer.keys.nbytes + layer.values.nbytes
        return total + (self.positions.nbytes if self.positions is not None else 0)

