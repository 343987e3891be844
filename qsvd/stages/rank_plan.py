"""Stage 6: per-layer kept singular indices for one budget, with the plan's cost line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from qsvd.artefacts import provenance, read_artefact, read_json, write_json
from qsvd.math.allocate import allocate_by_importance, allocate_uniform
from qsvd.math.cost import BUDGET_KINDS, budget_measure, plan_cost
from qsvd.stages.decompose import read_decomposition

ALLOCATIONS = ("importance", "uniform")


def run_rank_plan(
    decomposition_dir: Path,
    importance_dir: Path | None,
    allocation: str,
    budget_kind: str,
    budget: float,
    r_min: int,
    out_path: Path,
) -> Path:
    """Allocate ranks so that the plan's `budget_kind` measure is at most `budget`; write plan JSON."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"rank.allocation {allocation!r} is not one of {ALLOCATIONS}")
    if budget_kind not in BUDGET_KINDS:
        raise ValueError(f"rank.budget_kind {budget_kind!r} is not one of {BUDGET_KINDS}")
    svds, shapes, _ = read_decomposition(decomposition_dir)
    r_max = [s.max_rank for s in shapes]
    if allocation == "importance":
        if importance_dir is None:
            raise ValueError("rank.allocation 'importance' needs the importance stage's output")
        tensors, _ = read_artefact(importance_dir)
        scores = [tensors[f"layer.{i}.importance"] for i in range(len(shapes))]
    else:
        scores = [svd.sigma for svd in svds]
    allocate = allocate_by_importance if allocation == "importance" else allocate_uniform
    kept = allocate(scores, budget_measure(shapes, budget_kind), budget, r_min, r_max)
    ranks = [len(k) for k in kept]
    cost = plan_cost(shapes, ranks)
    plan = provenance(
        "rank_plan",
        {
            "decomposition_dir": str(decomposition_dir),
            "importance_dir": str(importance_dir) if importance_dir else None,
            "allocation": allocation,
            "budget_kind": budget_kind,
            "budget": budget,
            "r_min": r_min,
        },
    )
    plan["cost"] = dataclasses.asdict(cost)
    plan["layers"] = [
        {
            "layer": i,
            "rank": len(k),
            "max_rank": shape.max_rank,
            "caches": "latent" if shape.caches_latent(len(k)) else "kv",
            "indices": k.tolist(),
        }
        for i, (k, shape) in enumerate(zip(kept, shapes))
    ]
    write_json(out_path, plan)
    return Path(out_path)


def read_plan(path: Path) -> tuple[list[torch.Tensor], dict]:
    plan = read_json(path)
    return [torch.tensor(layer["indices"], dtype=torch.long) for layer in plan["layers"]], plan
