"""Compressed checkpoints: save a low-rank model, and reload it by skeleton + shells + tensors.

A checkpoint directory holds the base model's `config.json` and processor files, `model.safetensors`
(the whole state dict, low-rank factors included), and `manifest.json` with the layout and the rank of every unit.
Ranks are architecture, not weights: reloading builds the model from its config, swaps in
low-rank shells of the recorded ranks, then loads the tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_model, save_model
from torch import nn

from qsvd.artefacts import MANIFEST, atomic_directory, read_json, write_json
from qsvd.models.registry import family_by_name
from qsvd.models.surgery import install_lowrank_shells

WEIGHTS = "model.safetensors"
LOWRANK_STAGE = "lowrank_model"


def save_lowrank_checkpoint(model: nn.Module, processor: Any, out_dir: str | Path, manifest: dict) -> Path:
    """Write the checkpoint into a temporary sibling directory, then rename it into place."""
    with atomic_directory(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        save_model(model, str(tmp / WEIGHTS))
        write_json(tmp / MANIFEST, {**manifest, "model_class": type(model).__name__, "weights": WEIGHTS})
    return Path(out_dir)


def is_lowrank_checkpoint(path: str | Path) -> bool:
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and read_json(manifest).get("stage") == LOWRANK_STAGE


def load_lowrank_checkpoint(path: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, Any, dict]:
    """Rebuild a saved low-rank model: (model, processor, manifest)."""
    path = Path(path)
    if not is_lowrank_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a qsvd low-rank checkpoint (no {MANIFEST} of stage {LOWRANK_STAGE})")
    manifest = read_json(path / MANIFEST)
    family = family_by_name(manifest["family"])
    config = transformers.AutoConfig.from_pretrained(path)
    model_class = getattr(transformers, manifest["model_class"])
    model = model_class(config)
    install_lowrank_shells(model, family, manifest["layout"], [unit["rank"] for unit in manifest["units"]])
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


def open_model(source: str | Path, family: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model, processor) from a low-rank checkpoint, a local model directory or a hub id."""
    from qsvd.models.loading import load_model

    if is_lowrank_checkpoint(source):
        model, processor, manifest = load_lowrank_checkpoint(source, dtype)
        if manifest["family"] != family:
            raise ValueError(f"checkpoint {source} is of family {manifest['family']!r}, not {family!r}")
        return model, processor
    return load_model(str(source), dtype=dtype, family=family)
