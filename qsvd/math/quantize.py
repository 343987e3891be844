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
        rows, columns = self.codes.shape
        values = self.codes.to(torch.float32)
        if columns != self.scale.shape[1] * self.group_size:  # a shorter last group
            scale = self.scale.repeat_interleave(self.group_size, dim=1)[:, :columns]
            if self.zero is not None:
                values = values - self.zero.repeat_interleave(self.group_size, dim=1)[:, :columns]
            return (values * scale).to(dtype)
        values = values.view(rows, -1, self.group_size)
        if self.zero is not None:
            values = values - self.zero[:, :, None]
        return (values * self.scale[:, :, None]).view(rows, columns).to(dtype)


def code_range(bits: int, symmetric: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


SEARCH_CHUNK_ELEMENTS = 1 << 20  # trials × rows × columns evaluated at once by the clipping search on CPU
SEARCH_CHUNK_ELEMENTS_ACCELERATOR = 1 << 27  # the same on CUDA and other accelerators


def _range(block: torch.Tensor, symmetric: bool) -> tuple[torch.Tensor, ...]:
    """What the grid of each row is fitted to: max |w| (symmetric), or (max(w, 0), min(w, 0))."""
    if symmetric:
        return (block.abs().amax(dim=-1),)
    return block.amax(dim=-1).clamp_min(0), block.amin(dim=-1).clamp_max(0)


def _grid(spread: tuple[torch.Tensor, ...], bits: int, symmetric: bool, shrink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero) of each row after shrinking its range by `shrink` (broadcast against the rows:
    (rows,) or (trials, 1) or (trials, rows) give (rows,) or (trials, rows))."""
    low, high = code_range(bits, symmetric)
    if symmetric:
        (peak,) = spread
        scale = peak * shrink / high
        return scale.clamp_min(torch.finfo(torch.float32).tiny), None
    top, bottom = spread[0] * shrink, spread[1] * shrink
    scale = ((top - bottom) / (high - low)).clamp_min(torch.finfo(torch.float32).tiny)
    return scale, torch.round(-bottom / scale)


def _codes(block: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool) -> torch.Tensor:
    """Codes of `block` (…, columns) with one scale (and zero) per row (…)."""
    low, high = code_range(bits, symmetric)
    shifted = block / scale[..., None] + (0 if zero is None else zero[..., None])
    return torch.clamp(torch.round(shifted), low, high)


def _dequantized(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor:
    return (codes - (0 if zero is None else zero[..., None])) * scale[..., None]


def _trial_errors(block: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, symmetric: bool) -> torch.Tensor:
    """Σ_columns |Q(w) − w|^2.4 of every row of `block` (rows, columns) on every trial grid (trials, rows):
    the arithmetic of `_codes` and `_dequantized`, in place on one (trials, rows, columns) buffer."""
    low, high = code_range(bits, symmetric)
    values = block.unsqueeze(0)
    error = values / scale.unsqueeze(-1)
    if zero is not None:
        error.add_(zero.unsqueeze(-1))
    error.round_().clamp_(low, high)
    if zero is not None:
        error.sub_(zero.unsqueeze(-1))
    error.mul_(scale.unsqueeze(-1)).sub_(values).abs_().pow_(CLIP_NORM)
    return error.sum(dim=-1).nan_to_num_(nan=float("inf"))  # a NaN trial never wins, as `<` would have it


def fit_grid(
    block: torch.Tensor, bits: int, symmetric: bool, clip_search: bool, steps: int = 100, max_shrink: float = 0.8,
    coarse: int = 4,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row scale (and zero): the full range, or the shrink p = 1 − k/steps ∈ [1 − max_shrink, 1] minimising
    Σ|Q(w) − w|^2.4: every `coarse`-th k first, then each row's neighbours of its best k (a third of the
    trials of the full grid; the |·|^2.4 of every trial is most of the cost). Ties go to the earlier trial
    (the smaller k first, then the neighbours in the order −coarse+1 … coarse−1).

    All trials of a chunk of rows are evaluated at once; chunks bound the memory (SEARCH_CHUNK_ELEMENTS)."""
    block = block.to(torch.float32)
    rows, columns = block.shape
    spread = _range(block, symmetric)
    if not clip_search:
        return _grid(spread, bits, symmetric, torch.ones(rows, dtype=torch.float32, device=block.device))
    last = int(max_shrink * steps)
    coarse_steps = torch.arange(0, last + 1, coarse, dtype=torch.float32, device=block.device)[:, None]
    offsets = torch.tensor([o for o in range(1 - coarse, coarse) if o], dtype=torch.float32, device=block.device)[:, None]
    budget = SEARCH_CHUNK_ELEMENTS if block.device.type == "cpu" else SEARCH_CHUNK_ELEMENTS_ACCELERATOR
    chunk = max(1, budget // (len(coarse_steps) * max(columns, 1)))
    best_step = torch.empty(rows, dtype=torch.float32, device=block.device)
    for start in range(0, rows, chunk):
        part, part_spread = block[start : start + chunk], tuple(s[start : start + chunk] for s in spread)
        errors = _trial_errors(part, *_grid(part_spread, bits, symmetric, 1 - coarse_steps / steps), bits, symmetric)
        coarse_error, coarse_index = errors.min(dim=0)  # the first of equal errors
        centre = coarse_steps[coarse_index, 0]
        best_step[start : start + chunk] = centre
        if len(offsets):
            neighbours = (centre[None, :] + offsets).clamp(0, last)
            errors = _trial_errors(part, *_grid(part_spread, bits, symmetric, 1 - neighbours / steps), bits, symmetric)
            fine_error, fine_index = errors.min(dim=0)
            best_step[start : start + chunk] = torch.where(fine_error < coarse_error, neighbours.gather(0, fine_index[None])[0], centre)
    return _grid(spread, bits, symmetric, 1 - best_step / steps)


def _grouped(weight: torch.Tensor, group: int) -> list[tuple[slice, torch.Tensor]]:
    """(columns, view (rows, groups, group)) for the whole groups, then (columns, (rows, 1, rest)) for a shorter last one."""
    rows, columns = weight.shape
    whole = columns // group
    parts = [(slice(0, whole * group), weight[:, : whole * group].reshape(rows, whole, group))] if whole else []
    if columns % group:
        parts.append((slice(whole * group, columns), weight[:, whole * group :][:, None, :]))
    return parts


def _group_grids(weight: torch.Tensor, fmt: WeightFormat) -> tuple[int, torch.Tensor, torch.Tensor | None]:
    """(group size, scales (rows, groups), zeros or None) fitted on `weight`: all whole groups of all rows
    in one search (each (row, group) a row of it), a shorter last group in a second one."""
    rows, columns = weight.shape
    group = columns if fmt.group_size is None else min(fmt.group_size, columns)
    scales, zeros = [], []
    for _, part in _grouped(weight, group):
        scale, zero = fit_grid(part.reshape(-1, part.shape[2]), fmt.bits, fmt.symmetric, fmt.clip_search)
        scales.append(scale.view(rows, part.shape[1]))
        zeros.append(None if zero is None else zero.view(rows, part.shape[1]))
    return group, torch.cat(scales, dim=1), None if fmt.symmetric else torch.cat(zeros, dim=1)


def _code_dtype(fmt: WeightFormat) -> torch.dtype:
    return torch.int8 if fmt.symmetric else torch.uint8


def quantize_rtn(weight: torch.Tensor, fmt: WeightFormat) -> QuantizedWeight:
    """Round-to-nearest on the grid of each row (or group), after the optional clipping search."""
    weight = weight.detach().to(torch.float32)
    group, scale, zero = _group_grids(weight, fmt)
    codes = torch.empty(weight.shape, dtype=_code_dtype(fmt), device=weight.device)
    first = 0
    for columns, part in _grouped(weight, group):
        groups = slice(first, first + part.shape[1])
        part_codes = _codes(part, scale[:, groups], None if zero is None else zero[:, groups], fmt.bits, fmt.symmetric)
        codes[:, columns] = part_codes.flatten(1).to(codes.dtype)
        first += part.shape[1]
    return QuantizedWeight(codes, scale, zero, group)


def quantize_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, fmt: WeightFormat, damping: float = 0.01, block_size: int = 128, act_order: bool = False
) -> QuantizedWeight:
    """GPTQ: quantize column by column, spreading each column's error over the columns not yet quantized
    through the inverse of the damped Hessian H = XᵀX of the layer's calibration inputs.

    Grids (scales, zeros) are fitted on the original weight before any update (static groups), so
    act-order permutes only the processing order, never the group layout.
    """
    weight = weight.detach().to(torch.float64).clone()
    device = weight.device
    rows, columns = weight.shape
    if hessian.shape != (columns, columns):
        raise ValueError(f"the Hessian is {tuple(hessian.shape)}, the weight has {columns} input columns")
    hessian = hessian.detach().to(device=device, dtype=torch.float64).clone()
    dead = torch.diagonal(hessian) == 0
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    group, scale, zero = _group_grids(weight.to(torch.float32), fmt)
    scale64, zero64 = scale.to(torch.float64), None if zero is None else zero.to(torch.float64)
    order = torch.arange(columns, device=device)
    if act_order:
        order = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
        weight, hessian = weight[:, order], hessian[order][:, order]
    hessian += damping * torch.diagonal(hessian).mean() * torch.eye(columns, dtype=torch.float64, device=device)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    pending = weight.T.contiguous()  # row i is weight column i (in processing order): contiguous updates
    codes = torch.empty_like(pending)
    column_group = order // group
    for start in range(0, columns, block_size):
        stop = min(start + block_size, columns)
        block_scale = scale64.T[column_group[start:stop]]  # (block, rows): the grid of each column
        block_zero = None if zero64 is None else zero64.T[column_group[start:stop]]
        errors = torch.empty(stop - start, rows, dtype=torch.float64, device=device)
        for i in range(start, stop):
            column_zero = None if block_zero is None else block_zero[i - start]
            code = _codes(pending[i, :, None], block_scale[i - start], column_zero, fmt.bits, fmt.symmetric)[:, 0]
            codes[i] = code
            error = (pending[i] - _dequantized(code[:, None], block_scale[i - start], column_zero)[:, 0]) / upper[i, i]
            pending[i:stop] -= upper[i, i:stop][:, None] * error[None, :]
            errors[i - start] = error
        pending[stop:].addmm_(upper[start:stop, stop:].T, errors, alpha=-1)
    codes = codes.T[:, torch.argsort(order)] if act_order else codes.T
    return QuantizedWeight(codes.to(_code_dtype(fmt)), scale, zero, group)


def _per_token_scale(x: torch.Tensor, bits: int, clip_ratio: float) -> torch.Tensor:
    if not 0 < clip_ratio <= 1:
        raise ValueError(f"activation clip ratio must be in (0, 1], got {clip_ratio}")
    high = code_range(bits, symmetric=True)[1]
    return (x.abs().amax(dim=-1, keepdim=True) * clip_ratio / high).clamp_min(torch.finfo(x.dtype).tiny)


def quantize_per_token(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """Dynamic symmetric per-token fake quantization of activations along the last dimension."""
    low, high = code_range(bits, symmetric=True)
    scale = _per_token_scale(x, bits, clip_ratio)
    if torch.is_grad_enabled() and x.requires_grad:
        return torch.clamp(torch.round(x / scale), low, high) * scale
    return (x / scale).round_().clamp_(low, high).mul_(scale)  # the same numbers in one buffer


def per_token_codes(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, per-token scale in x's dtype) of `quantize_per_token`: codes · scale is exactly its result."""
    if bits > 8:
        raise ValueError(f"integer activation codes need bits <= 8, got {bits}")
    low, high = code_range(bits, symmetric=True)
    scale = _per_token_scale(x, bits, clip_ratio)
    return (x / scale).round_().clamp_(low, high).to(torch.int8), scale
