"""Stage 4: thin SVD of every LM layer's scaled joint QKV matrix, reused by every budget and β."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from tqdm import tqdm

from qsvd.artefacts import provenance, read_artefact, write_artefact
from qsvd.math.cost import LayerShape
from qsvd.math.decompose import ScaledSVD, activation_scale, scaled_svd
from qsvd.models.checkpoint import open_model
from qsvd.models.registry import decoder_layers, family_by_name
from qsvd.models.surgery import joint_qkv_weight, layer_shapes

SCALINGS = ("abs_mean", "abs_max", "none")


def run_decompose(
    model_source: str, family: str, stats_dir: Path, scaling: str, alpha: float, out_dir: Path
) -> Path:
    """Store U, σ, V and the scaling s of W·diag(s) = UΣVᵀ per layer (float32), plus layer shapes."""
    if scaling not in SCALINGS:
        raise ValueError(f"svd.scaling {scaling!r} is not one of {SCALINGS}")
    model, _ = open_model(model_source, family, torch.float32)
    adapter = family_by_name(family)
    stats, _ = read_artefact(stats_dir)
    tensors = {}
    layers = decoder_layers(model, adapter)
    for index, layer in enumerate(tqdm(layers, desc="joint QKV SVD")):
        weight = joint_qkv_weight(layer, adapter)
        if scaling == "none":
            scale = torch.ones(weight.shape[1], dtype=torch.float64)
        else:
            scale = activation_scale(stats[f"layer.{index}.{scaling}"], alpha)
        svd = scaled_svd(weight, scale)
        for name, value in dataclasses.asdict(svd).items():
            tensors[f"layer.{index}.{name}"] = value.float()
    manifest = provenance(
        "decompose",
        {"model_source": str(model_source), "family": family, "stats_dir": str(stats_dir), "scaling": scaling, "alpha": alpha},
    )
    manifest["layers"] = [dataclasses.asdict(s) for s in layer_shapes(model, adapter)]
    return write_artefact(out_dir, tensors, manifest)


def read_decomposition(directory: Path) -> tuple[list[ScaledSVD], list[LayerShape], dict]:
    """The per-layer SVDs (float64) and layer shapes written by `run_decompose`."""
    tensors, manifest = read_artefact(directory)
    shapes = [LayerShape(**layer) for layer in manifest["layers"]]
    svds = [
        ScaledSVD(**{f.name: tensors[f"layer.{i}.{f.name}"].to(torch.float64) for f in dataclasses.fields(ScaledSVD)})
        for i in range(len(shapes))
    ]
    return svds, shapes, manifest
