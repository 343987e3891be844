"""Compressed checkpoints: save what compression changed, reload by skeleton + shells + tensors.

A checkpoint directory holds the compressed model's `config.json` and processor files, `tensors.safetensors`,
and `manifest.json` with the layout and the rank of every unit. A *lean* checkpoint (what the stages write)
stores only the tensors compression changed, in the model's dtype — the low-rank factors, the tensors the
rotations changed — and names its base model (source and the SHA-256 of its weight files, checked on
reload); a *standalone* one (`export_checkpoint`) stores every tensor. A quantized checkpoint adds its
rotations, bits per layer (manifest "quantization"), the stored random rotation matrices, and the integer
weight codes (≤ 4 bits packed two per byte, 8 bits as int8) with their scales instead of the weights.

Ranks, rotations and bit widths are architecture, not weights: reloading takes the base model in the requested
dtype on the requested device (or, standalone, a skeleton with parameters on the meta device: nothing is
randomly initialised), swaps in low-rank shells of the recorded ranks on the meta device, re-installs the online
rotations and activation quantizers, then assigns the stored tensors into place.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from torch import nn

from qsvd.artefacts import MANIFEST, atomic_directory, read_json, read_tensors, write_json, write_tensors
from qsvd.math.packing import pack_codes, unpack_codes
from qsvd.math.quantize import QuantizedWeight
from qsvd.models.base import base_identity, base_record, changed_tensors, track_base, untrack_base, verify_base
from qsvd.models.device import resolve_device
from qsvd.models.quantized import Target, input_transforms
from qsvd.models.registry import ModelFamily, family_by_name
from qsvd.models.rotation import Rotations, install_rotated_modules, set_tied_embeddings, untie_lm_head
from qsvd.models.surgery import install_lowrank_shells

TENSORS = "tensors.safetensors"
LOWRANK_STAGE = "lowrank_model"
QUANTIZED_STAGE = "quantize"
CHECKPOINT_STAGES = (LOWRANK_STAGE, QUANTIZED_STAGE)
ROTATIONS = "rotations.safetensors"
QUANTIZED_WEIGHTS = "quantized_weights.safetensors"  # integer codes (packed where ≤ 4 bits) and scales


def _shared_storage_aliases(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that are views of an earlier one (tied embeddings): (unique tensors, alias -> kept name)."""
    kept, aliases, seen = {}, {}, {}
    for name, tensor in tensors.items():
        key = (tensor.device, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            kept[name] = tensor
    return kept, aliases


def save_checkpoint(
    model: nn.Module,
    processor: Any,
    out_dir: str | Path,
    manifest: dict,
    extra_tensors: dict[str, dict] | None = None,
    quantized_codes: dict[str, torch.Tensor] | None = None,
    standalone: bool = False,
) -> Path:
    """Write the checkpoint into a temporary sibling directory, then rename it into place.

    Lean (default, when the model was loaded through this module's door): only the tensors that differ from
    the base model's. `quantized_codes` (`stored_codes` of each quantized layer) replace those layers' weights."""
    record = base_record(model)
    lean = record is not None and not standalone
    tensors = changed_tensors(model) if lean else {n: t for n, t in model.state_dict(keep_vars=True).items() if t is not None}
    as_codes = {name.removesuffix(".codes") + ".weight" for name in quantized_codes or {} if name.endswith(".codes")}
    tensors = {name: t.detach() for name, t in tensors.items() if name not in as_codes}
    tensors, aliases = _shared_storage_aliases(tensors)
    if quantized_codes:
        extra_tensors = {**(extra_tensors or {}), QUANTIZED_WEIGHTS: quantized_codes}
    with atomic_directory(out_dir) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_tensors(tmp / TENSORS, tensors)
        for name, extra in (extra_tensors or {}).items():
            write_tensors(tmp / name, extra)
        entry = {"model_class": type(model).__name__, "weights": TENSORS, "aliases": aliases,
                 "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
        if lean:
            entry["base"] = record["reference"] or base_identity(record["source"])
        write_json(tmp / MANIFEST, {**manifest, **entry})
    return Path(out_dir)


def stored_codes(name: str, quantized: QuantizedWeight, bits: int) -> dict[str, torch.Tensor]:
    """How one quantized layer's weight is stored: its codes (packed two per byte at ≤ 4 bits), scales, zeros."""
    tensors = {f"{name}.codes": pack_codes(quantized.codes, bits), f"{name}.scale": quantized.scale}
    if quantized.zero is not None:
        tensors[f"{name}.zero"] = quantized.zero
    return tensors


def stored_weight(stored: dict[str, torch.Tensor], layer: dict) -> QuantizedWeight:
    name, zero = layer["name"], stored.get(f"{layer['name']}.zero")
    codes = unpack_codes(stored[f"{name}.codes"], layer["weight_bits"], layer["weight_columns"], signed=zero is None)
    return QuantizedWeight(codes, stored[f"{name}.scale"], zero, layer["weight_group_size"])


def is_compressed_checkpoint(path: str | Path) -> bool:
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and read_json(manifest).get("stage") in CHECKPOINT_STAGES


def install_quantization(model: nn.Module, family: ModelFamily, quantization: dict, matrices: dict[str, torch.Tensor]) -> None:
    """Re-install what the rotations changed (online rotations with their stored `matrices`, the rotated vision
    tower's extra parameters) and the activation quantizers that the manifest records."""
    install_rotated_modules(model, family, Rotations(roles=quantization["rotations"], matrices=matrices))
    for layer in quantization["layers"]:
        for role, transform in input_transforms(model, Target(layer["name"], layer["part"], layer["kind"])):
            transform.set_quantization(layer[f"{role}_bits"], layer[f"{role}_clip"] or 1.0)


def _dequantized_weights(path: Path, quantization: dict, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """`<name>.weight` of every quantized layer, rebuilt from its stored codes and scales."""
    layers = [layer for layer in quantization["layers"] if layer.get("weight_bits")]
    if not layers:
        return {}
    stored = load_file(str(path / QUANTIZED_WEIGHTS), device=str(device))
    return {f"{layer['name']}.weight": stored_weight(stored, layer).dequantize(dtype) for layer in layers}


def _ties(config) -> bool:
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", False))


def _tied_copy(config):
    config = copy.deepcopy(config)
    set_tied_embeddings(config, True)
    return config


def _skeleton(path: Path, manifest: dict, config, dtype: torch.dtype | None, device: torch.device) -> tuple[nn.Module, bool]:
    """(model, lean): the base model itself for a lean checkpoint, else a meta-device skeleton of its class."""
    from qsvd.models.loading import load_model

    if "base" in manifest:
        verify_base(manifest["base"], path)
        source = manifest["base"]["source"]
        untied = _ties(transformers.AutoConfig.from_pretrained(source)) and not _ties(config)
        # A base with tied embeddings has no lm_head tensor: loaded with the compressed model's untied config,
        # transformers would report lm_head missing and initialise it at random. Load it tied, then untie (the
        # checkpoint holds the compressed lm_head).
        model, _ = load_model(source, dtype=dtype, family=manifest["family"], device=device,
                              config=_tied_copy(config) if untied else config)
        if untied:
            untie_lm_head(model, family_by_name(manifest["family"]))
        return model, True
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = getattr(transformers, manifest["model_class"])(config)
    return model, False


def load_checkpoint(
    path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = "cpu", packed: bool = False,
) -> tuple[nn.Module, Any, dict]:
    """Rebuild a saved low-rank or quantized model in `dtype` (default: the stored one) on `device`:
    (model, processor, manifest). With `packed`, quantized layers hold their integer codes and compute with integer
    kernels (`qsvd.models.packed`); else they hold the dequantized weights (simulated quantization). A standalone
    export (`export_checkpoint`) always loads packed, through transformers' door."""
    path = Path(path)
    from qsvd.models.hf_door import is_export, load_pretrained

    if is_export(path):  # standalone: packed by nature
        return load_pretrained(path, dtype, device)
    if not is_compressed_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a qsvd checkpoint (no {MANIFEST} of stage {' or '.join(CHECKPOINT_STAGES)})")
    manifest = read_json(path / MANIFEST)
    device = resolve_device(device)
    dtype = dtype or getattr(torch, manifest.get("dtype", "float32"))
    family = family_by_name(manifest["family"])
    config = transformers.AutoConfig.from_pretrained(path)
    model, lean = _skeleton(path, manifest, config, dtype, device)
    if manifest.get("layout"):
        ranks = [unit["rank"] for unit in manifest["units"]]
        install_lowrank_shells(model, family, manifest["layout"], ranks, dtype=dtype, device=torch.device("meta"))
    tensors = load_file(str(path / manifest["weights"]), device=str(device))
    tensors = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
    if "quantization" in manifest:
        matrices = read_tensors(path / ROTATIONS) if (path / ROTATIONS).is_file() else {}
        install_quantization(model, family, manifest["quantization"], matrices)
        tensors |= _dequantized_weights(path, manifest["quantization"], dtype, device)
    for alias, name in manifest.get("aliases", {}).items():
        tensors[alias] = tensors[name]
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise RuntimeError(f"checkpoint {path} does not match its manifest: unexpected tensors {unexpected[:5]}")
    if not lean and _ties(config):
        model.tie_weights()
    empty = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if empty:
        raise RuntimeError(f"checkpoint {path} does not match its manifest: no tensors for {empty[:5]}")
    model = model.to(device)
    if packed and "quantization" in manifest:
        from qsvd.models.packed import pack_model  # packed reads codes through this module

        pack_model(model, family, manifest["quantization"], load_file(str(path / QUANTIZED_WEIGHTS), device=str(device)))
    if lean:
        track_base(model, manifest["base"]["source"], reference=manifest["base"])
        untrack_base(model, tensors)
    generation = path / "generation_config.json"
    if generation.is_file():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    processor_class = transformers.AutoProcessor if family.multimodal else transformers.AutoTokenizer
    processor = processor_class.from_pretrained(path)
    return model.eval(), processor, manifest


def from_pretrained(
    path: str | Path, device: str | torch.device | None = "cpu", dtype: torch.dtype | None = None,
    cache_mode: str = "latent", integer: bool = True,
) -> nn.Module:
    """A compressed model from a qsvd checkpoint (a stage's lean one or an exported standalone one), in `dtype`
    (default: the stored one) on `device`, its generate() caching as `cache_mode` says ("latent": the latents only,
    "latent_v": post-RoPE K and the latents, "kv": K and V). Every stored tensor must fit the rebuilt model and
    every tensor of it must be stored, else it raises. Its processor: transformers' AutoProcessor (AutoTokenizer
    for text-only models) from the same path."""
    from qsvd.models.latent_attention import use_latent_cache

    model, _, _ = load_checkpoint(path, dtype, device, packed=integer)
    use_latent_cache(model, cache_mode)
    return model


def export_checkpoint(path: str | Path, out_dir: str | Path) -> Path:
    """Write a standalone copy of the checkpoint at `path` in transformers' format (`qsvd.models.hf_door`): every
    tensor, packed integer codes, no reference to a base model; `AutoModel*.from_pretrained` reloads it after
    `import qsvd`."""
    from qsvd.models.hf_door import export_pretrained

    return export_pretrained(path, out_dir)


def open_checkpoint(
    source: str | Path, family: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = "cpu"
) -> tuple[nn.Module, Any, dict]:
    """(model, processor, manifest) from a qsvd checkpoint, or a local model directory or hub id (manifest {}),
    in `dtype` on `device`. A model loaded here remembers its base tensors, so what a stage saves is lean."""
    from qsvd.models.loading import load_model

    if is_compressed_checkpoint(source):
        model, processor, manifest = load_checkpoint(source, dtype, device)
        if manifest["family"] != family:
            raise ValueError(f"checkpoint {source} is of family {manifest['family']!r}, not {family!r}")
        return model, processor, manifest
    model, processor = load_model(str(source), dtype=dtype, family=family, device=device)
    track_base(model, source)
    return model, processor, {}


def open_model(
    source: str | Path, family: str, dtype: torch.dtype = torch.float32, device: str | torch.device | None = "cpu"
) -> tuple[nn.Module, Any]:
    """(model, processor) from a qsvd checkpoint, a local model directory or a hub id, in `dtype` on `device`."""
    model, processor, _ = open_checkpoint(source, family, dtype, device)
    return model, processor
