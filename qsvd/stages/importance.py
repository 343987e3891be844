"""Stage 5: gradient importance of every singular value of every decomposed unit (paper Eq. 10).

Answer-only cross-entropy per calibration sample (labels unshifted: the model shifts once);
g_{n,i} = u_iᵀ G̃_n v_i with G̃ = G T⁻ᵀ (T = diag(s), or S for whitening);
I_{u,i} = σ_i² · mean_n g_{n,i}², in float32. Scores do not depend on the budget: one file serves
every rank ratio. The same per-sample gradients G_n of each unit's stacked weight give its Fisher
information, Palu's layer-level F_u = mean_jk sqrt(mean_n G_{n,jk}²) (`qsvd.math.allocate.fisher_information`),
one number per unit that the "fisher" allocation apportions ranks by. With gradient checkpointing the LM
decoder layers' activations are recomputed in the backward instead of stored: less memory, one more forward
per layer, the same scores up to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from qsvd.artefacts import clean_stale_temporaries, provenance, write_artefact
from qsvd.math.allocate import fisher_information, importance
from qsvd.math.decompose import scaled_gradient_projection
from qsvd.models.checkpoint import open_model
from qsvd.models.device import resolve_device
from qsvd.models.registry import decoder_layers, family_by_name
from qsvd.models.surgery import group_projections
from qsvd.resources import runs_within
from qsvd.stages.calibration import calibration_batches, count_records
from qsvd.stages.decompose import Decomposition, read_decomposition


def unit_passes(decomposition: Decomposition, limit_bytes: int, fisher: bool = False) -> list[list[int]]:
    """Unit indices cut into runs whose float64 U and V (with `fisher`, and float32 sum of squared gradients, rows ×
    columns) fit in `limit_bytes` (a larger unit alone): each run is one pass over the calibration samples, so that
    only its factors and sums are held at once."""
    sizes = []
    for unit in decomposition.units:
        rows, columns = unit.out_features, unit.shape.hidden_size
        sizes.append(8 * (rows + columns) * min(rows, columns) + (4 * rows * columns if fisher else 0))
    return runs_within(sizes, limit_bytes)


@contextmanager
def recomputed_in_backward(layers: nn.ModuleList) -> Iterator[None]:
    """Activation checkpointing of every layer of `layers` while the context is open; always undone.

    Each layer's forward runs under `torch.utils.checkpoint.checkpoint(use_reentrant=False)`: only its inputs are
    kept, and the backward reruns it to rebuild what it needs. We wrap the layers ourselves rather than call
    transformers' `gradient_checkpointing_enable`, which checkpoints only modules with `training` set and so would
    need train mode (dropout) flags flipped on an eval model; here nothing about the model's mode changes, and the
    recompute sees exactly the eval forward. Non-reentrant, because the layers' inputs need no gradient (only the
    q/k/v weights do), which the reentrant variant would silently drop. Hooks on the layers themselves run once;
    hooks on their submodules run again in the recompute. The forward must not write a KV cache (use_cache=False):
    the recompute would write it a second time."""

    def checkpointed(forward: Callable) -> Callable:
        return lambda *args, **kwargs: checkpoint(partial(forward, **kwargs), *args, use_reentrant=False)

    wrapped = []
    try:
        for layer in layers:
            layer.forward = checkpointed(layer.forward)  # an instance attribute: shadows the class's forward
            wrapped.append(layer)
        yield
    finally:
        for layer in wrapped:
            del layer.forward


def run_importance(
    model_source: str,
    family: str,
    decomposition_dir: Path,
    data_dir: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = "cpu",
    factor_memory_gib: float = 4.0,
    gradient_checkpointing: bool = False,
    fisher: bool = False,
) -> Path:
    """Accumulate mean_n g_{n,i}² (and with `fisher` Σ_n G_n²) over calibration samples; store the importance (and
    the Fisher information) per unit. The Fisher sums hold a float32 copy of every unit's weight: only the fisher
    allocation reads them, so they are computed only when asked for.

    The model stays in `dtype` on `device` (in eval mode) with gradients only on the q/k/v weights; the projections
    g = u_iᵀ G̃ v_i are computed in float64, the squared gradients summed in float32. At most `factor_memory_gib` of
    U, V and those sums are held at once; more units than fit take further passes over the calibration samples.
    `gradient_checkpointing` recomputes each LM decoder layer in the backward instead of storing its activations
    (`recomputed_in_backward`)."""
    device = resolve_device(device)
    clean_stale_temporaries(out_dir)  # what a killed earlier run left beside the output
    model, processor = open_model(model_source, family, dtype, device)
    adapter = family_by_name(family)
    decomposition = read_decomposition(decomposition_dir)
    layers = decoder_layers(model, adapter)
    if len(layers) != len(decomposition.shapes):
        raise ValueError(f"{decomposition_dir} has {len(decomposition.shapes)} layers, the model {len(layers)}")
    model.requires_grad_(False)
    unit_projections = [group_projections(layers[u.layer], adapter, u.group) for u in decomposition.units]
    grad_sq_sum = [torch.zeros_like(sigma, device=device) for sigma in decomposition.sigmas]
    information = [None] * len(decomposition.units)
    samples = 0
    for indices in unit_passes(decomposition, int(factor_memory_gib * 2**30), fisher):
        svds = {i: decomposition.svd(i, device) for i in indices}
        weight_grad_sq_sum = {i: torch.zeros(decomposition.units[i].out_features, decomposition.units[i].shape.hidden_size,
                                             device=device) for i in indices} if fisher else {}
        for i in indices:
            for projection in unit_projections[i]:
                projection.weight.requires_grad_(True)
        samples = 0
        batches = calibration_batches(processor, adapter, data_dir, with_answer=True, device=device, dtype=dtype)
        with recomputed_in_backward(layers) if gradient_checkpointing else nullcontext():
            progress = tqdm(batches, total=count_records(data_dir), desc=f"gradient importance ({len(indices)} units)")
            for batch in progress:
                model.zero_grad(set_to_none=True)
                loss = model(**batch, use_cache=False).loss  # no KV cache: a recomputed layer would write it twice
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite calibration loss {loss.item()} on sample {samples}")
                loss.backward()
                for i in indices:
                    grad = torch.cat([p.weight.grad for p in unit_projections[i]])
                    grad_sq_sum[i] += scaled_gradient_projection(svds[i], grad).pow(2)
                    if fisher:
                        weight_grad_sq_sum[i] += grad.float().pow(2)
                samples += 1
        for i in indices:
            if fisher and samples:
                information[i] = fisher_information(weight_grad_sq_sum[i], samples)
            for projection in unit_projections[i]:
                projection.weight.requires_grad_(False)
                projection.weight.grad = None
        del svds, weight_grad_sq_sum
    if samples == 0:
        raise ValueError(f"no calibration samples in {data_dir}")
    tensors = {}
    for unit, sigma, total, unit_fisher in zip(decomposition.units, decomposition.sigmas, grad_sq_sum, information):
        mean = (total / samples).cpu()
        tensors[f"{unit.name}.importance"] = importance(sigma, mean)
        tensors[f"{unit.name}.grad_sq_mean"] = mean.float()
        if unit_fisher is not None:
            tensors[f"{unit.name}.fisher"] = torch.tensor(unit_fisher, dtype=torch.float64)
    manifest = provenance(
        "importance",
        {"model_source": str(model_source), "family": family, "decomposition_dir": str(decomposition_dir),
         "data_dir": str(data_dir), "dtype": str(dtype), "device": str(device),
         "gradient_checkpointing": gradient_checkpointing, "fisher": fisher},
    )
    manifest["samples"] = samples
    return write_artefact(out_dir, tensors, manifest)
