"""Stage 7: the low-rank model for one plan and β, packed as a checkpoint that reloads."""

from __future__ import annotations

from pathlib import Path

import torch

from qsvd.artefacts import clean_stale_temporaries, provenance
from qsvd.math.decompose import joint_factors
from qsvd.models.checkpoint import LOWRANK_STAGE, open_model, save_checkpoint
from qsvd.models.device import resolve_device
from qsvd.models.registry import family_by_name
from qsvd.models.surgery import apply_factors
from qsvd.stages.decompose import read_decomposition
from qsvd.stages.rank_plan import read_plan


def run_lowrank_model(
    model_source: str,
    family: str,
    decomposition_dir: Path,
    plan_path: Path,
    beta: float,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = "cpu",
) -> Path:
    """Per unit: B = diag(σ_I^β) V_Iᵀ T⁻¹ shared, A_p = U_{p,I} diag(σ_I^(1-β)); original biases kept.

    The model is held in `dtype` on `device`; each unit's factors are computed in float64, one unit at a time,
    and cast to `dtype`. The checkpoint is lean: the factors and a reference to the base model."""
    device = resolve_device(device)
    clean_stale_temporaries(out_dir)  # a killed earlier run's full-size temporary checkpoint
    model, processor = open_model(model_source, family, dtype, device)
    adapter = family_by_name(family)
    decomposition = read_decomposition(decomposition_dir)
    kept, plan = read_plan(plan_path)
    if plan["layout"] != decomposition.layout:
        raise ValueError(f"plan {plan_path} is for the {plan['layout']!r} layout, {decomposition_dir} is {decomposition.layout!r}")
    factors = (
        joint_factors(decomposition.svd(index, device), indices, beta, [unit.shape.out(p) for p in unit.group])
        for index, (indices, unit) in enumerate(zip(kept, decomposition.units))
    )
    apply_factors(model, adapter, decomposition.layout, factors, ranks=[len(indices) for indices in kept])
    manifest = provenance(
        LOWRANK_STAGE,
        {
            "model_source": str(model_source),
            "family": family,
            "decomposition_dir": str(decomposition_dir),
            "plan_path": str(plan_path),
            "beta": beta,
            "dtype": str(dtype),
            "device": str(device),
        },
    )
    manifest.update(
        family=family,
        beta=beta,
        cost=plan["cost"],
        layout=plan["layout"],
        units=[{k: u[k] for k in ("layer", "group", "rank", "caches")} for u in plan["units"]],
    )
    return save_checkpoint(model, processor, out_dir, manifest)
