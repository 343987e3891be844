"""Load a supported model and its processor from a local directory or a hub id, with clear errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
import transformers
from torch import nn

from qsvd.config import looks_like_path
from qsvd.models.device import resolve_device
from qsvd.models.registry import ModelFamily, family_by_name, family_of_class

SOURCE_KEY = "model.source"  # the config key that names the model directory or hub id


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message names the source, the cause and what to do."""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _advice(source: str) -> str:
    if looks_like_path(source):
        return f"check that {source} is a model directory written by save_pretrained (config.json, weights, processor)"
    offline = "HF_HUB_OFFLINE is set, so the hub was not asked; " if huggingface_hub.constants.is_offline_mode() else ""
    return offline + (
        f"check the hub id in {SOURCE_KEY}, connect to the internet with HF_HUB_OFFLINE=0 "
        "(and `hf auth login` for gated models), or download the model once and give its local directory; "
        f"if {source!r} is meant as a local directory, it does not exist here (write it as ./{source})"
    )


def _architecture(source: str) -> tuple[str, ModelFamily]:
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:  # OSError: not found / offline; ValueError: unknown model_type
        raise ModelLoadError(
            f"{SOURCE_KEY}: cannot load the config of {source!r} ({_one_line(error)}); {_advice(source)}"
        ) from error
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise ModelLoadError(
            f"{SOURCE_KEY}: the config of {source!r} names no architecture (config.json 'architectures'); "
            "save the model with save_pretrained from its *ForConditionalGeneration / *ForCausalLM class"
        )
    return architectures[0], family_of_class(architectures[0])


def load_model(
    source: str,
    dtype: torch.dtype = torch.float32,
    family: str | None = None,
    device: str | torch.device | None = "cpu",
    config: transformers.PretrainedConfig | None = None,
) -> tuple[nn.Module, Any]:
    """(model in eval mode, processor) from a local directory or a hub id; text-only families get a tokenizer.

    The weights are loaded straight into `dtype` on `device` (`auto`: CUDA when available), never through a
    float32 copy. `family`, if given (config key model.family), must be the family the checkpoint's
    architecture belongs to; `config` replaces the checkpoint's own (a compressed model's, e.g. untied embeddings).
    """
    device = resolve_device(device)
    source = str(source)
    if looks_like_path(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"{SOURCE_KEY}: local model directory {source} does not exist; "
                "give an existing directory written by save_pretrained, or a hub id"
            )
        source = str(path)
    class_name, detected = _architecture(source)
    if family is not None and family_by_name(family).name != detected.name:
        raise ValueError(
            f"model.family is {family!r} but {source} is a {class_name} of family {detected.name!r}; "
            f"set model.family: {detected.name} or point {SOURCE_KEY} at a {family} model"
        )
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise ModelLoadError(
            f"{source}: transformers {transformers.__version__} has no class {class_name}; "
            "install a transformers version that has it"
        )
    processor_class = transformers.AutoProcessor if detected.multimodal else transformers.AutoTokenizer
    try:
        extra = {} if config is None else {"config": config}
        if device.type != "cpu":
            extra["device_map"] = {"": device}
        model = model_class.from_pretrained(source, dtype=dtype, **extra)
        processor = processor_class.from_pretrained(source)
    except OSError as error:
        raise ModelLoadError(
            f"{SOURCE_KEY}: cannot load {class_name} from {source!r} ({_one_line(error)}); {_advice(source)}"
        ) from error
    return model.eval(), processor
