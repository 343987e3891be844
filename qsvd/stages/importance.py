"""Stage 5: gradient importance of every singular value of every decomposed unit (paper Eq. 10).

Answer-only cross-entropy per calibration sample (labels unshifted: the model shifts once);
g_{n,i} = u_iᵀ G̃_n v_i with G̃ = G T⁻ᵀ (T = diag(s), or S for whitening);
I_{u,i} = σ_i² · mean_n g_{n,i}², in float32. Scores do not depend on the budget: one file serves
every rank ratio.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from qsvd.artefacts import provenance, write_artefact
from qsvd.math.allocate import importance
from qsvd.math.decompose import scaled_gradient_projection
from qsvd.models.checkpoint import open_model
from qsvd.models.registry import decoder_layers, family_by_name, qkv_projections
from qsvd.models.surgery import group_projections
from qsvd.stages.calibration import calibration_batches, count_records
from qsvd.stages.decompose import read_decomposition


def run_importance(model_source: str, family: str, decomposition_dir: Path, data_dir: Path, out_dir: Path) -> Path:
    """Accumulate mean_n g_{n,i}² over calibration samples and store the importance per unit."""
    model, processor = open_model(model_source, family, torch.float32)
    adapter = family_by_name(family)
    decomposition = read_decomposition(decomposition_dir)
    layers = decoder_layers(model, adapter)
    if len(layers) != len(decomposition.shapes):
        raise ValueError(f"{decomposition_dir} has {len(decomposition.shapes)} layers, the model {len(layers)}")
    model.requires_grad_(False)
    for layer in layers:
        for p in qkv_projections(layer, adapter):
            p.weight.requires_grad_(True)
    unit_projections = [group_projections(layers[u.layer], adapter, u.group) for u in decomposition.units]
    grad_sq_sum = [torch.zeros_like(svd.sigma) for svd in decomposition.svds]
    samples = 0
    batches = calibration_batches(processor, adapter, data_dir, with_answer=True)
    for batch in tqdm(batches, total=count_records(data_dir), desc="gradient importance"):
        model.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite calibration loss {loss.item()} on sample {samples}")
        loss.backward()
        for index, (projections, svd) in enumerate(zip(unit_projections, decomposition.svds)):
            grad = torch.cat([p.weight.grad for p in projections])
            grad_sq_sum[index] += scaled_gradient_projection(svd, grad).pow(2)
        samples += 1
    if samples == 0:
        raise ValueError(f"no calibration samples in {data_dir}")
    tensors = {}
    for unit, svd, total in zip(decomposition.units, decomposition.svds, grad_sq_sum):
        tensors[f"{unit.name}.importance"] = importance(svd.sigma, total / samples)
        tensors[f"{unit.name}.grad_sq_mean"] = (total / samples).float()
    manifest = provenance(
        "importance",
        {"model_source": str(model_source), "family": family, "decomposition_dir": str(decomposition_dir), "data_dir": str(data_dir)},
    )
    manifest["samples"] = samples
    return write_artefact(out_dir, tensors, manifest)
