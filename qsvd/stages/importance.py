"""Stage 5: gradient importance of every singular value of every decomposed unit (paper Eq. 10).

Answer-only cross-entropy per calibration sample (labels unshifted: the model shifts once);
g_{n,i} = u_iᵀ G̃_n v_i with G̃ = G T⁻ᵀ (T = diag(s), or S for whitening);
I_{u,i} = σ_i² · mean_n g_{n,i}², in float32. Scores do not depend on the budget: one file serves
every rank ratio. With gradient checkpointing the LM decoder layers' activations are recomputed in the
backward instead of stored: less memory, one more forward per layer, the same scores up to float rounding.
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
) -> Path:
    """Accumulate mean_n g_{n,i}² over calibration samples and store the importance per unit.

    The model stays in `dtype` on `device` (in eval mode) with gradients only on the q/k/v weights; the projections
    g = u_iᵀ G̃ v_i are computed in float64. At most `factor_memory_gib` of U and V are held at once; more
    units than fit take further passes over the calibration samples. `gradient_checkpointing` recomputes each LM
    decoder layer in the backward instead of storing its activations (`recomputed_in_backward`)."""
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
    samples = 0
    for indices in unit_passes(decomposition, int(factor_memory_gib * 2**30)):
        svds = {i: decomposition.svd(i, device) for i in indices}
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
         "data_dir": str(data_dir), "dtype": str(dtype), "device": str(device),
         "gradient_checkpointing": gradient_checkpointing},
    )
    manifest["samples"] = samples
    return write_artefact(out_dir, tensors, manifest)
