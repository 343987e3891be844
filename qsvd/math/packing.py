"""Integer weight codes as stored on disk: 8-bit codes as int8/uint8, 2-4-bit codes packed two per byte."""

from __future__ import annotations

import torch


def packs_two_per_byte(bits: int) -> bool:
    return bits <= 4


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ≤ 4 bits, two per uint8 along the last dimension (low nibble first, padded with 0); wider codes as they are."""
    if not packs_two_per_byte(bits):
        return codes
    nibbles = (codes.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.shape[-1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1))
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def unpack_codes(packed: torch.Tensor, bits: int, columns: int, signed: bool) -> torch.Tensor:
    """Inverse of `pack_codes`: (rows, columns) codes, int8 when `signed` (symmetric formats), else uint8."""
    if not packs_two_per_byte(bits):
        return packed
    low, high = packed & 0xF, packed >> 4
    nibbles = torch.stack([low, high], dim=-1).flatten(-2)[..., :columns]
    if not signed:
        return nibbles
    values = nibbles.to(torch.int16)
    return torch.where(values >= 8, values - 16, values).to(torch.int8)
