"""Compressed checkpoints: save a low-rank or quantized model, and reload it by skeleton + shells + tensors.

A checkpoint directory holds the base model's `config.json` and processor files, `model.safetensors`
(the whole state dict, low-rank factors included), and `manifest.json` with the layout and the rank of
every unit; a quantized checkpoint adds its rotations, bits per layer (manifest "quantization"), the
stored random rotation matrices and the integer weight codes. Ranks, rotations and bit widths are
architecture, not weights: reloading builds the model from its config, swaps in low-rank shells of the
recorded ranks, re-installs the online rotations (and the modules a rotated vision tower gains) and activation
quantizers, then loads the tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_model, save_model
from torch import nn

from qsvd.artefacts import MANIFEST, atomic_directory, read_json, read_tensors, write_json, write_tensors
from qsvd.models.quantized import Target, input_transforms
from qsvd.models.registry import ModelFamily, family_by_name
from qsvd.models.rotation import Rotations, install_rotated_modules
from qsvd.models.surgery import install_lowrank_shells

WEIGHTS = "model.safetensors"
LOWRANK_STAGE = "lowrank_model"
QUANTIZED_STAGE = "quantize"
CHECKPOINT_STAGES = (LOWRANK_STAGE, QUANTIZED_STAGE)
ROTATIONS = "rotations.safetensors"
QUANTIZED_WEIGHTS = "quantized_weights.safetensors"  # integer codes and scales of every quantized weight


def save_checkpoint(
    model: nn.Module, processor: Any, out_dir: str | Path, manifest: dict, extra_tensors: dict[str, dict] | None = None
) -> Path:
    """Write the checkpoint (and `extra_tensors` files) into a temporary sibling directory, then rename it into place."""
    with atomic_directory(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS))
        for name, tensors in (extra_tensors or {}).items():
            write_tensors(tmp / name, tensors)
        write_json(tmp / MANIFEST, {**manifest, "model_class": type(model).__name__, "weights": WEIGHTS})
    return Path(out_dir)


def is_compressed_checkpoint(path: str | Path) -> bool:
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and read_json(manifest).get("stage") in CHECKPOINT_STAGES


def _install_quantization(model: nn.Module, family: ModelFamily, quantization: dict, path: Path) -> None:
    """Re-install what the rotations changed (online rotations, the rotated vision tower's extra parameters) and the
    activation quantizers that the manifest records."""
    matrices = read_tensors(path / ROTATIONS) if (path / ROTATIONS).is_file() else {}
    install_rotated_modules(model, family, Rotations(roles=quantization["rotations"], matrices=matrices))
    for layer in quantization["layers"]:
        for role, transform in input_transforms(model, Target(layer["name"], layer["part"], layer["kind"])):
            transform.set_quantization(layer[f"{role}_bits"], layer[f"{role}_clip"] or 1.0)


def load_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, dict]:
    """Rebuild a saved low-rank or quantized model: (model, processor, manifest)."""
    path = Path(path)
    if not is_compressed_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a qsvd checkpoint (no {MANIFEST} of stage {' or '.join(CHECKPOINT_STAGES)})")
    manifest = read_json(path / MANIFEST)
    family = family_by_name(manifest["family"])
    config = transformers.AutoConfig.from_pretrained(path)
    model_class = getattr(transformers, manifest["model_class"])
    model = model_class(config)
    if manifest.get("layout"):
        install_lowrank_shells(model, family, manifest["layout"], [unit["rank"] for unit in manifest["units"]])
    if "quantization" in manifest:
        _install_quantization(model, family, manifest["quantization"], path)
    missing, unexpected = load_model(model, str(path / manifest["weights"]), strict=False)
    if unexpected or missing:
        raise RuntimeError(f"checkpoint {path} does not match its manifest: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dtype is not None:
        model = model.to(dtype)
    generation = path / "generation_config.json"
    if generation.is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    processor_class = transformers.AutoProcessor if family.multimodal else transformers.AutoTokenizer
    processor = processor_class.from_pretrained(path)
    return model.eval(), processor, manifest


def open_checkpoint(source: str | Path, family: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any, dict]:
    """(model, processor, manifest) from a qsvd checkpoint, or a local model directory or hub id (manifest {})."""
    from qsvd.models.loading import load_model

    if is_compressed_checkpoint(source):
        model, processor, manifest = load_checkpoint(source, dtype)
        if manifest["family"] != family:
            raise ValueError(f"checkpoint {source} is of family {manifest['family']!r}, not {family!r}")
        return model, processor, manifest
    return *load_model(str(source), dtype=dtype, family=family), {}


def open_model(source: str | Path, family: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, processor) from a qsvd checkpoint, a local model directory or a hub id."""
    model, processor, _ = open_checkpoint(source, family, dtype)
    return model, processor
