"""The transformers door: a compressed model in transformers' own format, reloaded by `AutoModel*.from_pretrained`.

`export_pretrained` writes a standalone directory that `from_pretrained` understands: `config.json` whose
`quantization_config` ({"quant_method": "qsvd", ...}) holds the architecture compression changed (layout and ranks of
the low-rank units, rotations, bits per layer: the checkpoint manifest's records), `model.safetensors` with the
packed model's tensors (low-rank factors; integer codes and scales, ≤ 4-bit codes two per byte, instead of weights;
random online rotation matrices), the processor, and qsvd's `manifest.json` beside them.

Importing qsvd registers the "qsvd" method with transformers. Its quantizer installs, on the meta-device skeleton
before any weight is read, the low-rank shells, the rotations and activation quantizers, and packed modules with
empty codes; after loading it picks each weight's fastest kernel layout and turns the latent cache on. Without
`import qsvd`, transformers only warns ("unknown quantization type") and loads the plain architecture with random
q/k/v: `load_pretrained` (and `qsvd.from_pretrained`) refuse any missing or unexpected tensor instead.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from qsvd.artefacts import MANIFEST, atomic_directory, read_json, write_json
from qsvd.math.cost import CACHE_MODES
from qsvd.models.input_transform import InputTransform
from qsvd.models.registry import family_by_name

QUANT_METHOD = "qsvd"
FORMAT_VERSION = 1
EXPORT_FORMAT = "transformers"  # manifest["format"] of an export


@register_quantization_config(QUANT_METHOD)
class QSVDConfig(QuantizationConfigMixin):
    """config.json's quantization_config of a qsvd model: what its shells need (not its weights)."""

    def __init__(self, family: str, layout: str | None = None, ranks: list[int] | None = None,
                 quantization: dict | None = None, cache_mode: str = "latent", format_version: int = FORMAT_VERSION,
                 **kwargs) -> None:
        if format_version != FORMAT_VERSION:
            raise ValueError(f"qsvd format version {format_version} is not {FORMAT_VERSION}, the one this qsvd reads: "
                             "re-export the checkpoint with this qsvd (qsvd export), or install the qsvd that wrote it")
        if cache_mode not in CACHE_MODES:
            raise ValueError(f"cache_mode must be one of {CACHE_MODES}, got {cache_mode!r}")
        family_by_name(family)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.family, self.layout, self.ranks = family, layout, ranks
        self.quantization, self.cache_mode = quantization, cache_mode


@register_quantizer(QUANT_METHOD)
class QSVDQuantizer(HfQuantizer):
    """Rebuilds the compressed architecture on the skeleton; the weights are the checkpoint's (pre-quantized only)."""

    requires_calibration = True  # nothing is quantized on load: the checkpoint holds the codes

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> None:
        install_compressed_shells(model, self.quantization_config)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> None:
        from qsvd.models.latent_attention import use_latent_cache
        from qsvd.models.packed import use_fastest_layouts

        use_fastest_layouts(model)
        use_latent_cache(model, self.quantization_config.cache_mode)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def install_compressed_shells(model: nn.Module, config: QSVDConfig) -> None:
    """Low-rank shells, rotations and activation quantizers, and empty packed modules, on the meta device."""
    from qsvd.models.checkpoint import install_quantization
    from qsvd.models.packed import install_packed_shells
    from qsvd.models.surgery import install_lowrank_shells

    family = family_by_name(config.family)
    if config.layout:
        install_lowrank_shells(model, family, config.layout, config.ranks, device=torch.device("meta"))
    if config.quantization:
        roles = config.quantization["rotations"]
        matrices = {role: torch.empty(r["size"], r["size"], device="meta") for role, r in roles.items()
                    if r["kind"] == "random"}
        install_quantization(model, family, config.quantization, matrices)
        persist_online_rotations(model)
        install_packed_shells(model, family, config.quantization)


def persist_online_rotations(model: nn.Module) -> None:
    """Save the matrices of random online rotations with the model's tensors (transformers' format has no side file)."""
    for module in model.modules():
        if isinstance(module, InputTransform) and module.rotation_kind == "random":
            module._non_persistent_buffers_set.discard("rotation")


def is_export(path: str | Path) -> bool:
    """Whether `path` is a directory `export_pretrained` wrote (transformers' format, quant_method qsvd)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    return (read_json(config).get("quantization_config") or {}).get("quant_method") == QUANT_METHOD


def export_pretrained(path: str | Path, out_dir: str | Path) -> Path:
    """Write the qsvd checkpoint at `path` (lean or not) as a standalone transformers directory (see the module)."""
    from qsvd.models.checkpoint import QUANTIZED_WEIGHTS, load_checkpoint
    from qsvd.models.packed import pack_model

    path = Path(path)
    model, processor, manifest = load_checkpoint(path)
    quantization = manifest.get("quantization")
    if quantization and any(layer.get("weight_bits") for layer in quantization["layers"]):
        stored = load_file(str(path / QUANTIZED_WEIGHTS))
        pack_model(model, family_by_name(manifest["family"]), quantization, stored, layout="codes")
    persist_online_rotations(model)
    config = QSVDConfig(family=manifest["family"], layout=manifest.get("layout"),
                        ranks=[unit["rank"] for unit in manifest.get("units", [])] or None, quantization=quantization)
    model.config.quantization_config = config.to_dict()
    kept = {key: value for key, value in manifest.items() if key not in ("base", "weights", "aliases")}
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / MANIFEST, {**kept, "format": EXPORT_FORMAT, "exported_from": str(path)})
    return Path(out_dir)


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = "cpu"):
    """(model, processor, manifest) of an export, through `AutoModel*.from_pretrained`; any missing, unexpected or
    mis-shaped tensor raises."""
    from qsvd.models.device import resolve_device

    path = Path(path)
    manifest = read_json(path / MANIFEST)
    family = family_by_name(manifest["family"])
    auto = transformers.AutoModelForImageTextToText if family.multimodal else transformers.AutoModelForCausalLM
    device = resolve_device(device)
    model, info = auto.from_pretrained(path, dtype=dtype or "auto", device_map=str(device), output_loading_info=True)
    problems = {kind: info.get(kind) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: sorted(map(str, names))[:5] for kind, names in problems.items() if names}
    if problems:
        raise RuntimeError(f"{path} does not match the qsvd architecture its config.json describes: {problems}; "
                           "re-export it with qsvd export")
    processor_class = transformers.AutoProcessor if family.multimodal else transformers.AutoTokenizer
    return model.eval(), processor_class.from_pretrained(path), manifest
