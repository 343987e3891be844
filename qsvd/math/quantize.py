"""Integer quantization of weights (RTN with a clipping search, GPTQ) and of activations (per token).

Weights are quantized per output channel (row), or per group of `group_size` input columns,
symmetric (codes in [-2^(b-1), 2^(b-1) - 1], no zero point) or asymmetric (codes in [0, 2^b - 1]
with a zero point). A `QuantizedWeight` keeps the integer codes and their scales; `dequantize()`
gives the float weight that simulated (fake) quantization multiplies with (method §3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CLIP_NORM = 2.4  # the clipping search minimises Σ|Q(w) − w|^2.4 per row (GPTQ/QuaRot's choice)


@dataclass(frozen=True)
class WeightFormat:
    """How a weight matrix is quantized: bit width, symmetry, group size (None: one scale per row)."""

    bits: int
    symmetric: bool = True
    group_size: int | None = None
    clip_search: bool = True

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"weight bits must be in [2, 8], got {self.bits}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be a positive number of columns or None, got {self.group_size}")


@dataclass
class QuantizedWeight:
    """Integer codes (int8/uint8, the weight's shape) with per-(row, group) scales and zero points."""

    codes: torch.Tensor
    scale: torch.Tensor  # (rows, groups), float32
    zero: torch.Tensor | None  # (rows, groups) for asymmetric formats
    group_size: int  # columns per scale (the full width for per-row)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scale = self.scale.repeat_interleave(self.group_size, dim=1)[:, : self.codes.shape[1]]
        values = self.codes.to(torch.float32)
        if self.zero is not None:
            values = values - self.zero.repeat_interleave(self.group_size, dim=1)[:, : self.codes.shape[1]]
        return (values * scale).to(dtype)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


def _grid(block: torch.Tensor, bits: int, symmetric: bool, shrink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) of each row of `block` after shrinking its range by `shrink` (one per row)."""
    low, high = code_range(bits, symmetric)
    if symmetric:
        scale = block.abs().amax(dim=1) * shrink / high
        return scale.clamp_min(torch.finfo(torch.float32).tiny), None
    top = block.amax(dim=1).clamp_min(0) * shrink
    bottom = block.amin(dim=1).clamp_max(0) * shrink
    scale = ((top - bottom) / (high - low)).clamp_min(torch.finfo(torch.float32).tiny)
    return scale, torch.round(-bottom / scale)


def _codes(block: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool) -> torch.Tensor:
    low, high = code_range(bits, symmetric)
    shifted = block / scale[:, None] + (0 if zero is None else zero[:, None])
    return torch.clamp(torch.round(shifted), low, high)


def _dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (codes - (0 if zero is None else zero[:, None])) * scale[:, None]


def fit_grid(
    block: torch.Tensor, bits: int, symmetric: bool, clip_search: bool, steps: int = 100, max_shrink: float = 0.8,
    coarse: int = 4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row scale (and zero): the full range, or the shrink p = 1 − k/steps ∈ [1 − max_shrink, 1] minimising
    Σ|Q(w) − w|^2.4: every `coarse`-th k first, then each row's neighbours of its best k (a third of the
    trials of the full grid; the |·|^2.4 of every trial is most of the cost)."""
    block = block.to(torch.float32)
    ones = torch.ones(block.shape[0], dtype=torch.float32, device=block.device)
    scale, zero = _grid(block, bits, symmetric, ones)
    if not clip_search:
        return scale, zero
    last = int(max_shrink * steps)
    best = torch.full_like(ones, float("inf"))
    best_step = torch.zeros_like(ones)

    def trial(step: torch.Tensor) -> None:
        nonlocal scale, zero, best, best_step
        trial_scale, trial_zero = _grid(block, bits, symmetric, 1 - step / steps)
        error = (_dequantized(_codes(block, trial_scale, trial_zero, bits, symmetric), trial_scale, trial_zero) - block)
        error = error.abs().pow(CLIP_NORM).sum(dim=1)
        better = error < best
        best = torch.where(better, error, best)
        best_step = torch.where(better, step, best_step)
        scale = torch.where(better, trial_scale, scale)
        if zero is not None:
            zero = torch.where(better, trial_zero, zero)

    for step in range(0, last + 1, coarse):
        trial(ones * step)
    centre = best_step.clone()
    for offset in range(1 - coarse, coarse):
        if offset:
            trial((centre + offset).clamp(0, last))
    return scale, zero


def _group_grids(weight: torch.Tensor, fmt: WeightFormat) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(group size, scales (rows, groups), zeros or None) fitted on `weight`."""
    columns = weight.shape[1]
    group = columns if fmt.group_size is None else min(fmt.group_size, columns)
    grids = [fit_grid(weight[:, start : start + group], fmt.bits, fmt.symmetric, fmt.clip_search) for start in range(0, columns, group)]
    scale = torch.stack([s for s, _ in grids], dim=1)
    zero = None if fmt.symmetric else torch.stack([z for _, z in grids], dim=1)
    return group, scale, zero


def _code_dtype(fmt: WeightFormat) -> torch.dtype:
    return torch.int8 if fmt.symmetric else torch.uint8


def quantize_rtn(weight: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Round-to-nearest on the grid of each row (or group), after the optional clipping search."""
    weight = weight.detach().to(torch.float32)
    group, scale, zero = _group_grids(weight, fmt)
    codes = torch.empty_like(weight)
    for g, start in enumerate(range(0, weight.shape[1], group)):
        codes[:, start : start + group] = _codes(
            weight[:, start : start + group], scale[:, g], None if zero is None else zero[:, g], fmt.bits, fmt.symmetric
        )
    return QuantizedWeight(codes.to(_code_dtype(fmt)), scale, zero, group)


def quantize_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, damping: float = 0.01, block_size: int = 128, act_order: bool = False
) -> QuantizedWeight:
    """GPTQ: quantize column by column, spreading each column's error over the columns not yet quantized
    through the inverse of the damped Hessian H = XᵀX of the layer's calibration inputs.

    Grids (scales, zeros) are fitted on the original weight before any update (static groups), so
    act-order permutes only the processing order, never the group layout.
    """
    weight = weight.detach().to(torch.float64).clone()
    rows, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"the Hessian is {tuple(hessian.shape)}, the weight has {columns} input columns")
    hessian = hessian.detach().to(torch.float64).clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    group, scale, zero = _group_grids(weight.to(torch.float32), fmt)
    scale64, zero64 = scale.to(torch.float64), None if zero is None else zero.to(torch.float64)
    order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True) if act_order else torch.arange(columns)
    weight, hessian = weight[:, order], hessian[order][:, order]
    hessian += damping * torch.diagonal(hessian).mean() * torch.eye(columns, dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    codes = torch.zeros_like(weight)
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        errors = torch.zeros(rows, stop - start, dtype=torch.float64)
        for i in range(start, stop):
            g = int(order[i]) // group
            column_zero = None if zero64 is None else zero64[:, g]
            code = _codes(weight[:, i : i + 1], scale64[:, g], column_zero, fmt.bits, fmt.symmetric)[:, 0]
            codes[:, i] = code
            error = (weight[:, i] - _dequantized(code[:, None], scale64[:, g], column_zero)[:, 0]) / upper[i, i]
            weight[:, i:stop] -= error[:, None] * upper[i, i:stop][None, :]
            errors[:, i - start] = error
        weight[:, stop:] -= errors @ upper[start:stop, stop:]
    codes = codes[:, torch.argsort(order)]
    return QuantizedWeight(codes.to(_code_dtype(fmt)), scale, zero, group)


def quantize_per_token(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """Dynamic symmetric per-token fake quantization of activations along the last dimension."""
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"activation clip ratio must be in (0, 1], got {clip_ratio}")
    low, high = code_range(bits, symmetric=True)
    scale = (x.abs().amax(dim=-1, keepdim=True) * clip_ratio / high).clamp_min(torch.finfo(x.dtype).tiny)
    return torch.clamp(torch.round(x / scale), low, high) * scale
