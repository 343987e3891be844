"""Stage 4: thin SVD of every decomposed unit (e.g. each layer's joint QKV), reused by every budget and β."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from qsvd.artefacts import MANIFEST, clean_stale_temporaries, provenance, read_artefact, read_json, write_artefact
from qsvd.math.cost import LayerShape, Unit, layout_units
from qsvd.math.decompose import ScaledSVD, activation_scale, scaled_svd, whitening
from qsvd.methods import INPUT_TRANSFORMS, LAYOUTS
from qsvd.models.device import resolve_device
from qsvd.models.shards import layer_qkv_weights


@dataclass(frozen=True)
class Decomposition:
    """What `run_decompose` wrote: the layout, the layer shapes, σ of every unit; U, V, T read one unit at a time."""

    directory: Path
    layout: str
    shapes: list[LayerShape]
    units: list[Unit]
    sigmas: list[torch.Tensor]  # float64, descending
    manifest: dict

    def svd(self, index: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> ScaledSVD:
        """The SVD of unit `index` in `dtype` on `device`, read from disk (only this unit's tensors)."""
        unit = self.units[index]
        names = {name: f"{unit.name}.{name}" for name in ("u", "sigma", "v")} | {"scale": f"layer.{unit.layer}.transform"}
        with safe_open(str(self.directory / self.manifest["tensors"]), framework="pt") as stored:
            return ScaledSVD(**{field: stored.get_tensor(key).to(device=device, dtype=dtype) for field, key in names.items()})

    @property
    def svds(self) -> list[ScaledSVD]:
        """Every unit's SVD (float64, CPU): small models and tests only."""
        return [self.svd(index) for index in range(len(self.units))]


def input_transform(stats: dict[str, torch.Tensor], layer: int, transform: str, alpha: float, damping: float) -> torch.Tensor:
    """T of one layer: s (diagonal scaling from abs statistics), ones for "none", or S (whitening)."""
    if transform == "whiten":
        key = f"layer.{layer}.gram"
        if key not in stats:
            raise ValueError("whitening needs XᵀX: run the statistics stage with --gram (the `input_gram` rule)")
        return whitening(stats[key], damping)
    if transform == "none":
        return torch.ones(stats[f"layer.{layer}.abs_mean"].shape[0], dtype=torch.float64)
    return activation_scale(stats[f"layer.{layer}.{transform}"], alpha)


def run_decompose(
    model_source: str,
    family: str,
    stats_dir: Path,
    layout: str,
    transform: str,
    alpha: float,
    out_dir: Path,
    damping: float = 0.01,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = "cpu",
) -> Path:
    """Store T per layer and U, σ, V of W_g·T per unit g of `layout` (float32), plus the layer shapes.

    The q/k/v weights are held in `dtype` on `device`, one layer at a time when `model_source` is a local directory
    of safetensors files (else the whole model is loaded); each unit's SVD is computed there in float64."""
    if transform not in INPUT_TRANSFORMS:
        raise ValueError(f"input transform {transform!r} is not one of {INPUT_TRANSFORMS}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {sorted(LAYOUTS)}")
    device = resolve_device(device)
    clean_stale_temporaries(out_dir)  # what a killed earlier run left beside the output
    stats, _ = read_artefact(stats_dir)
    shapes, layer_weights = layer_qkv_weights(model_source, family, dtype, device)
    units = layout_units(shapes, layout)
    tensors = {}
    with tqdm(total=len(units), desc=f"{layout} SVD") as progress:
        for layer, weights in layer_weights:
            scale = input_transform(stats, layer, transform, alpha, damping)
            tensors[f"layer.{layer}.transform"] = scale  # float64: B carries its inverse
            for unit in (u for u in units if u.layer == layer):
                stacked = torch.cat([weights[p].to(torch.float64) for p in unit.group])  # e.g. [W_q; W_k; W_v]
                svd = scaled_svd(stacked, scale.to(device))
                for name in ("u", "sigma", "v"):
                    tensors[f"{unit.name}.{name}"] = getattr(svd, name).float().cpu()
                progress.update()
            del weights  # before the next layer is read: one layer's q/k/v at a time
    manifest = provenance(
        "decompose",
        {
            "model_source": str(model_source),
            "family": family,
            "stats_dir": str(stats_dir),
            "layout": layout,
            "transform": transform,
            "alpha": alpha,
            "damping": damping,
            "dtype": str(dtype),
            "device": str(device),
        },
    )
    manifest.update(layout=layout, layers=[vars(s) for s in shapes])
    return write_artefact(out_dir, tensors, manifest)


def read_decomposition(directory: Path) -> Decomposition:
    """The decomposition written by `run_decompose`: its manifest and σ now, each unit's U, V and T on demand."""
    directory = Path(directory)
    manifest = read_json(directory / MANIFEST)
    shapes = [LayerShape(**layer) for layer in manifest["layers"]]
    units = layout_units(shapes, manifest["layout"])
    with safe_open(str(directory / manifest["tensors"]), framework="pt") as stored:
        sigmas = [stored.get_tensor(f"{u.name}.sigma").to(torch.float64) for u in units]
    return Decomposition(directory, manifest["layout"], shapes, units, sigmas, manifest)
