"""Where a stage computes and in which dtype: `compute.device` and `model.dtype` of the config."""

from __future__ import annotations

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_KEY = "compute.device"


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """`auto` (or None): CUDA when available, else CPU; `cpu`; `cuda` or `cuda:N` (must exist)."""
    if isinstance(spec, torch.device):
        return spec
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as error:
        raise ValueError(f"{DEVICE_KEY}: {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from error
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ValueError(f"{DEVICE_KEY}: device type {device.type!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ValueError(f"{DEVICE_KEY} is {spec!r} but torch {torch.__version__} sees no CUDA device here; use auto or cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"{DEVICE_KEY} is {spec!r} but only {torch.cuda.device_count()} CUDA device(s) exist here")
    return device


def dtype_by_name(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"model.dtype: {name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]
