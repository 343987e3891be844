"""Stage 7: the low-rank model for one plan and β, packed as a checkpoint that reloads."""

from __future__ import annotations

from pathlib import Path

import torch

from qsvd.artefacts import provenance
from qsvd.math.decompose import joint_factors
from qsvd.models.checkpoint import LOWRANK_STAGE, open_model, save_checkpoint
from qsvd.models.registry import family_by_name
from qsvd.models.surgery import apply_factors
from qsvd.stages.decompose import read_decomposition
from qsvd.stages.rank_plan import read_plan


def run_lowrank_model(
    model_source: str, family: str, decomposition_dir: Path, plan_path: Path, beta: float, out_dir: Path
) -> Path:
    """Per unit: B = diag(σ_I^β) V_Iᵀ T⁻¹ shared, A_p = U_{p,I} diag(σ_I^(1-β)); original biases kept."""
    model, processor = open_model(model_source, family, torch.float32)
    adapter = family_by_name(family)
    decomposition = read_decomposition(decomposition_dir)
    kept, plan = read_plan(plan_path)
    if plan["layout"] != decomposition.layout:
        raise ValueError(f"plan {plan_path} is for the {plan['layout']!r} layout, {decomposition_dir} is {decomposition.layout!r}")
    factors = [
        joint_factors(svd, indices, beta, [unit.shape.out(p) for p in unit.group])
        for svd, indices, unit in zip(decomposition.svds, kept, decomposition.units)
    ]
    apply_factors(model, adapter, decomposition.layout, factors)
    manifest = provenance(
        LOWRANK_STAGE,
        {
            "model_source": str(model_source),
            "family": family,
            "decomposition_dir": str(decomposition_dir),
            "plan_path": str(plan_path),
            "beta": beta,
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
