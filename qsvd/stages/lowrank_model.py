"""Stage 7: the low-rank model for one plan and β, packed as a checkpoint that reloads."""

from __future__ import annotations

from pathlib import Path

import torch

from qsvd.artefacts import provenance
from qsvd.math.decompose import joint_factors
from qsvd.models.checkpoint import LOWRANK_STAGE, open_model, save_lowrank_checkpoint
from qsvd.models.registry import family_by_name
from qsvd.models.surgery import apply_joint_factors
from qsvd.stages.decompose import read_decomposition
from qsvd.stages.rank_plan import read_plan


def run_lowrank_model(
    model_source: str, family: str, decomposition_dir: Path, plan_path: Path, beta: float, out_dir: Path
) -> Path:
    """B = diag(σ_I^β) V_Iᵀ diag(s)^-1 shared, A_p = U_{p,I} diag(σ_I^(1-β)); original biases kept."""
    model, processor = open_model(model_source, family, torch.float32)
    adapter = family_by_name(family)
    svds, shapes, _ = read_decomposition(decomposition_dir)
    kept, plan = read_plan(plan_path)
    factors = [
        joint_factors(svd, indices, beta, [shape.q_out, shape.k_out, shape.v_out])
        for svd, indices, shape in zip(svds, kept, shapes)
    ]
    apply_joint_factors(model, adapter, factors)
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
        layers=[{"layer": l["layer"], "rank": l["rank"], "caches": l["caches"]} for l in plan["layers"]],
    )
    return save_lowrank_checkpoint(model, processor, out_dir, manifest)
