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
from qsvd.models.device import resolve_device
from qsvd.models.registry import decoder_layers, family_by_name
from qsvd.models.surgery import group_projections
from qsvd.resources import runs_within
from qsvd.stages.calibration import calibration_batches, count_records
from qsvd.stages.decompose import Decomposition, read_decomposition


def unit_passes(decomposition: Decomposition, limit_bytes: int) -> list[list[int]]:
    """Unit indices cut into runs whose float64 U and V fit in `limit_bytes` (a larger unit alone): each run is one
    pass over the calibration samples, so that only its factors are held at once."""
    sizes = []
    for unit in decomposition.units:
        rows, columns = unit.shape.out(unit.group), unit.shape.hidden_size
        sizes.append(8 * (rows + columns) * min(rows, columns))
    return runs_within(sizes, limit_bytes)


def run_importance(
    model_source: str,
    family: str,
    decomposition_dir: Path,
    data_dir: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = "cpu",
    factor_memory_gib: float = 4.0,
) -> Path:
    """Accumulate mean_n g_{n,i}² over calibration samples and store the importance per unit.

    The model stays in `dtype` on `device` with gradients only on the q/k/v weights; the projections
    g = u_iᵀ G̃ v_i are computed in float64. At most `factor_memory_gib` of U and V are held at once; more
    units than fit take further passes over the calibration samples."""
    device = resolve_device(device)
    model, processor = open_model(model_source, family, dtype, device)
    adapter = family_by_name(family)
    decomposition = read_decomposition(decomposition_dir)
    layers = decoder_layers(model, adapter)
    if len(layers) != len(decomposition.shapes):
        raise ValueError(f"{decomposition_dir} has {len(decomposition.shapes)} layers, the model {len(layers)}")
    model.requires_grad_(False)
    unit_projections = [group_projections(layers[u.layer], adapter, u.group) for u in decomposition.units]
    grad_sq_sum = [torch.zeros_like(sigma, device=device) for sigma in decomposition.sigmas]
    samples = 0
    for indices in unit_passes(decomposition, int(factor_memory_gib * 2**30)):
        svds = {i: decomposition.svd(i, device) for i in indices}
        for i in indices:
            for projection in unit_projections[i]:
                projection.weight.requires_grad_(True)
        samples = 0
        batches = calibration_batches(processor, adapter, data_dir, with_answer=True, device=device, dtype=dtype)
        for batch in tqdm(batches, total=count_records(data_dir), desc=f"gradient importance ({len(indices)} units)"):
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite calibration loss {loss.item()} on sample {samples}")
            loss.backward()
            for i in indices:
                grad = torch.cat([p.weight.grad for p in unit_projections[i]])
                grad_sq_sum[i] += scaled_gradient_projection(svds[i], grad).pow(2)
            samples += 1
        for i in indices:
            for projection in unit_projections[i]:
                projection.weight.requires_grad_(False)
                projection.weight.grad = None
        del svds
    if samples == 0:
        raise ValueError(f"no calibration samples in {data_dir}")
    tensors = {}
    for unit, sigma, total in zip(decomposition.units, decomposition.sigmas, grad_sq_sum):
        mean = (total / samples).cpu()
        tensors[f"{unit.name}.importance"] = importance(sigma, mean)
        tensors[f"{unit.name}.grad_sq_mean"] = mean.float()
    manifest = provenance(
        "importance",
        {"model_source": str(model_source), "family": family, "decomposition_dir": str(decomposition_dir),
         "data_dir": str(data_dir), "dtype": str(dtype), "device": str(device)},
    )
    manifest["samples"] = samples
    return write_artefact(out_dir, tensors, manifest)
