"""Load a supported model and its processor from a local directory or a hub id, with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

from qsvd.config import looks_like_path
from qsvd.models.registry import family_by_name, family_of_class


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the source and what to do."""


def load_model(source: str, dtype: torch.dtype = torch.float32, family: str | None = None) -> tuple[nn.Module, Any]:
    """(model in eval mode, processor or tokenizer) for a local directory or hub id."""
    if looks_like_path(source) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"model.source: local path {source} does not exist; give an existing model directory or a hub id")
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except OSError as error:
        raise ModelLoadError(
            f"model.source: cannot load {source!r} ({error}); check the hub id or path, "
            "set HF_HUB_OFFLINE=0 and log in if the hub is needed, or give a local directory"
        ) from error
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ModelLoadError(f"{source}: config.json names no architecture; cannot tell the model family")
    detected = family_of_class(architectures[0])
    if family is not None and family_by_name(family).name != detected.name:
        raise ValueError(f"model.family is {family!r} but {source} is a {architectures[0]} of family {detected.name!r}")
    model_class = getattr(transformers, architectures[0])
    model = model_class.from_pretrained(source, dtype=dtype)
    processor_class = transformers.AutoProcessor if detected.multimodal else transformers.AutoTokenizer
    return model.eval(), processor_class.from_pretrained(source)
