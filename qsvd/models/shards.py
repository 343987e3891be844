"""Each LM layer's q/k/v weights in turn, read straight from a model directory's safetensors files.

A stage that needs only the q/k/v weights (the decomposition) reads them here layer by layer, so that it holds one
layer's q/k/v at a time, never the model. The layer count, the shapes and the in-memory names come from the model's
skeleton, built on the meta device from its config (nothing is allocated); the registry gives the in-memory names
(`model.language_model.layers.3.self_attn.q_proj.weight`). A checkpoint file may store a tensor under another name
(LLaVA: `language_model.model.layers.3...`): transformers renames stored keys on load, and the same renaming, asked
of transformers itself, maps every stored key to its in-memory name here. Without that renaming (older
transformers) a stored key is matched by its longest dotted suffix, which must be unique.

Sources that are not a local directory of safetensors files (a hub id, a qsvd checkpoint) are loaded whole by
`open_model`, in the requested dtype, and their q/k/v weights read from the model.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from torch import nn

from qsvd.artefacts import read_json
from qsvd.config import looks_like_path
from qsvd.math.cost import LayerShape
from qsvd.models.checkpoint import is_compressed_checkpoint, open_model
from qsvd.models.registry import (
    PROJECTIONS,
    ModelFamily,
    decoder_layers,
    family_by_name,
    family_of_class,
    qkv_projections,
)
from qsvd.models.surgery import layer_shapes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

QKVWeights = dict[str, torch.Tensor]  # "q", "k", "v" -> that projection's weight (out, in)


def stored_weight_files(source: str | Path) -> dict[str, Path] | None:
    """Stored key -> safetensors file of a local model directory written by `save_pretrained` (one file, or shards
    listed by its index); None for anything else: a hub id, a qsvd checkpoint, a directory without safetensors."""
    if not looks_like_path(str(source)):
        return None
    directory = Path(source).expanduser()
    if not directory.is_dir() or is_compressed_checkpoint(directory):
        return None
    if (directory / INDEX_FILE).is_file():
        weight_map = read_json(directory / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{directory / INDEX_FILE} has no weight_map: rewrite the model with save_pretrained")
        return {key: directory / name for key, name in weight_map.items()}
    if (directory / SINGLE_FILE).is_file():
        with safe_open(str(directory / SINGLE_FILE), framework="pt") as stored:
            return dict.fromkeys(stored.keys(), directory / SINGLE_FILE)
    return None


def skeleton(directory: Path, family: ModelFamily) -> nn.Module:
    """The model of `directory`'s config with every parameter on the meta device (no memory, no initialisation)."""
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(directory)
    class_name = (getattr(config, "architectures", None) or [None])[0]
    if class_name is None:
        raise ValueError(f"{directory}/config.json names no architecture: save the model with save_pretrained")
    if class_name not in family.model_classes:
        detected = family_of_class(class_name).name  # an unsupported class raises its own error
        raise ValueError(f"model.family is {family.name!r} but {directory} is a {class_name} of family {detected!r}; "
                         f"set model.family: {detected} or point model.source at a {family.name} model")
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise ValueError(f"{directory}: transformers {transformers.__version__} has no class {class_name}")
    with init_empty_weights(include_buffers=False):
        return model_class(config)


def _renamed_by_transformers(model: nn.Module, stored_keys: list[str]) -> dict[str, tuple[str, bool]] | None:
    """Stored key -> (its in-memory name, whether transformers converts the tensor beyond renaming it), by the
    conversion mapping transformers applies in `from_pretrained`; None where this transformers has none."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    meta = model.state_dict()
    renamed = {}
    for key in stored_keys:
        try:
            name, converter = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
        except TypeError:  # another signature than transformers 5.17-5.24's: fall back to the suffix match
            return None
        if name not in meta and key in meta:  # as from_pretrained: a key that needed no renaming
            name, converter = key, None
        renamed[key] = (name, converter is not None)
    return renamed


def _renamed_by_legacy_mapping(model: nn.Module, stored_keys: list[str]) -> dict[str, tuple[str, bool]]:
    """Stored key -> (in-memory name, False) by a model's `_checkpoint_conversion_mapping` (transformers 4.x)."""
    mapping = getattr(model, "_checkpoint_conversion_mapping", None) or {}
    renamed = {}
    for key in stored_keys:
        name = key
        for pattern, replacement in mapping.items():
            name, count = re.subn(pattern, replacement, key)
            if count:
                break
        renamed[key] = (name, False)
    return renamed


def _common_suffix(a: list[str], b: list[str]) -> int:
    count = 0
    while count < min(len(a), len(b)) and a[-1 - count] == b[-1 - count]:
        count += 1
    return count


def _stored_key(name: str, renamed: dict[str, tuple[str, bool]], directory: Path, minimum: int) -> str:
    """The stored key holding the in-memory parameter `name`: the one that loads into it, else the one key sharing
    the longest dotted suffix with it, at least its last `minimum` parts (from the layer index on)."""
    matches = [key for key, (target, _) in renamed.items() if target == name]
    if len(matches) > 1:
        raise ValueError(f"{directory}: the stored keys {matches} all load into {name}; "
                         "rewrite the model with save_pretrained")
    if matches:
        key = matches[0]
        if renamed[key][1]:
            raise ValueError(
                f"{directory}: transformers converts the stored tensor {key} on load (not a plain rename) into {name}, "
                "so it cannot be read as stored; decompose a copy written by save_pretrained from a loaded model"
            )
        return key
    parts = name.split(".")
    overlap = {key: _common_suffix(parts, key.split(".")) for key in renamed}
    best = max(overlap.values(), default=0)
    candidates = [key for key, count in overlap.items() if count == best]
    if best < minimum or len(candidates) != 1:
        raise KeyError(
            f"{directory}: no stored tensor found for {name}: no stored key loads into it, and "
            + (f"the stored keys {candidates[:4]} end alike, so a suffix match is ambiguous"
               if best >= minimum else f"no stored key ends like it (its last {minimum} parts)")
            + "; check that the directory holds this model's weights (config.json and *.safetensors written by "
            "save_pretrained)"
        )
    return candidates[0]


@dataclass(frozen=True)
class StoredQKV:
    """Where a local model directory stores every LM layer's q/k/v weights."""

    directory: Path
    shapes: list[LayerShape]
    keys: list[dict[str, str]]  # per layer: "q", "k", "v" -> stored key
    files: dict[str, Path]  # stored key -> safetensors file

    def weights(self, dtype: torch.dtype, device: torch.device | str) -> Iterator[tuple[int, QKVWeights]]:
        """(layer index, its q/k/v weights in `dtype` on `device`) in turn, read from disk (only these tensors)."""
        with ExitStack() as stack:
            opened = {}
            for index, layer_keys in enumerate(self.keys):
                weights = {}
                for projection, key in layer_keys.items():
                    file = self.files[key]
                    if file not in opened:
                        opened[file] = stack.enter_context(safe_open(str(file), framework="pt"))
                    weights[projection] = opened[file].get_tensor(key).to(device=device, dtype=dtype)
                yield index, weights


def stored_qkv(directory: str | Path, family: str, files: dict[str, Path] | None = None) -> StoredQKV:
    """The stored keys of every LM layer's q/k/v weights in the local model directory `directory`, checked against
    the shapes of its skeleton. `files`: its `stored_weight_files`, if already read."""
    directory = Path(directory).expanduser()
    files = files if files is not None else stored_weight_files(directory)
    if files is None:
        raise FileNotFoundError(f"{directory} is not a local model directory with {SINGLE_FILE} or {INDEX_FILE}")
    adapter = family_by_name(family)
    model = skeleton(directory, adapter)
    stored_keys = sorted(files)
    renamed = _renamed_by_transformers(model, stored_keys) or _renamed_by_legacy_mapping(model, stored_keys)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    prefix = len(adapter.decoder_layers.split("."))
    keys, handles = [], {}
    with ExitStack() as stack:
        for layer in decoder_layers(model, adapter):
            layer_keys = {}
            for projection, module in zip(PROJECTIONS, qkv_projections(layer, adapter)):
                name = names[id(module.weight)]
                key = _stored_key(name, renamed, directory, minimum=len(name.split(".")) - prefix)
                if files[key] not in handles:
                    handles[files[key]] = stack.enter_context(safe_open(str(files[key]), framework="pt"))
                stored_shape = tuple(handles[files[key]].get_slice(key).get_shape())
                if stored_shape != tuple(module.weight.shape):
                    raise ValueError(f"{directory}: the stored tensor {key} has shape {stored_shape}, but {name} of "
                                     f"its config has {tuple(module.weight.shape)}; the weights do not fit config.json")
                layer_keys[projection] = key
            keys.append(layer_keys)
    return StoredQKV(directory, layer_shapes(model, adapter), keys, files)


def _loaded_weights(model: nn.Module, family: ModelFamily) -> Iterator[tuple[int, QKVWeights]]:
    for index, layer in enumerate(decoder_layers(model, family)):
        yield index, {p: module.weight.detach() for p, module in zip(PROJECTIONS, qkv_projections(layer, family))}


def layer_qkv_weights(
    source: str | Path, family: str, dtype: torch.dtype, device: torch.device | str
) -> tuple[list[LayerShape], Iterator[tuple[int, QKVWeights]]]:
    """(shapes of every LM attention layer, an iterator of (layer index, its q/k/v weights in `dtype` on `device`)).

    Straight from the safetensors files, one layer at a time, when `source` is a local model directory of them;
    otherwise (a hub id, a qsvd checkpoint) from the whole model, loaded by `open_model` in `dtype` on `device`.
    A caller that drops each layer's weights before asking for the next holds one layer's q/k/v at a time."""
    files = stored_weight_files(source)
    if files is not None:
        stored = stored_qkv(source, family, files)
        return stored.shapes, stored.weights(dtype, device)
    model, _ = open_model(source, family, dtype, device)
    adapter = family_by_name(family)
    return layer_shapes(model, adapter), _loaded_weights(model, adapter)
