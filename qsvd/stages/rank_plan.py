"""Stage 6: the kept singular indices of every unit for one budget, with the plan's cost line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from qsvd.artefacts import provenance, read_artefact, read_json, write_json
from qsvd.math.allocate import allocate_by_fisher, allocate_by_importance, allocate_uniform
from qsvd.math.cost import BUDGET_KINDS, budget_measure, plan_cost
from qsvd.methods import ALLOCATIONS, GRADIENT_ALLOCATIONS
from qsvd.stages.decompose import read_decomposition


def run_rank_plan(
    decomposition_dir: Path,
    importance_dir: Path | None,
    allocation: str,
    budget_kind: str,
    budget: float,
    r_min: int,
    out_path: Path,
) -> Path:
    """Allocate ranks to every unit so that the plan's `budget_kind` measure is at most `budget`; write plan JSON.

    `importance`: global top-K of the importance scores; `fisher`: ranks in proportion to each unit's Fisher
    information, leading singular values (both read the importance stage's output); `uniform`: one rank everywhere."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"rank allocation {allocation!r} is not one of {ALLOCATIONS}")
    if budget_kind not in BUDGET_KINDS:
        raise ValueError(f"rank.budget_kind {budget_kind!r} is not one of {BUDGET_KINDS}")
    decomposition = read_decomposition(decomposition_dir)
    units = decomposition.units
    measure = budget_measure(decomposition.shapes, budget_kind, decomposition.layout)
    r_max = [u.max_rank for u in units]
    fisher = None
    if allocation in GRADIENT_ALLOCATIONS:
        if importance_dir is None:
            raise ValueError(f"rank allocation {allocation!r} needs the importance stage's output")
        tensors, _ = read_artefact(importance_dir)
        if allocation == "fisher":
            fisher = [_fisher(tensors, u.name, importance_dir) for u in units]
    try:
        if allocation == "importance":
            kept = allocate_by_importance([tensors[f"{u.name}.importance"] for u in units], measure, budget, r_min, r_max)
        elif allocation == "fisher":
            kept = allocate_by_fisher(fisher, measure, budget, r_min, r_max)
        else:
            kept = allocate_uniform(decomposition.sigmas, measure, budget, r_min, r_max)
    except ValueError as error:
        raise ValueError(f"{decomposition.layout!r} layout, {budget_kind} budget {budget:g}: {error}") from None
    ranks = [len(k) for k in kept]
    cost = plan_cost(decomposition.shapes, ranks, decomposition.layout)
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
    plan["layout"] = decomposition.layout
    plan["cost"] = dataclasses.asdict(cost)
    plan["units"] = [
        {
            "layer": u.layer,
            "group": u.group,
            "rank": len(k),
            "max_rank": u.max_rank,
            "caches": u.caches(len(k)),
            "indices": k.tolist(),
            **({} if fisher is None else {"fisher": fisher[i]}),
        }
        for i, (u, k) in enumerate(zip(units, kept))
    ]
    write_json(out_path, plan)
    return Path(out_path)


def _fisher(tensors: dict[str, torch.Tensor], unit: str, importance_dir: Path) -> float:
    if f"{unit}.fisher" not in tensors:
        raise ValueError(f"{importance_dir} holds no Fisher information of {unit}: the importance stage computes it "
                         "only with --fisher (the workflow passes it when a method of the config allocates by "
                         "fisher, e.g. joint-fib); re-run it so")
    return tensors[f"{unit}.fisher"].item()


def read_plan(path: Path) -> tuple[list[torch.Tensor], dict]:
    """(kept singular indices per unit, the plan)."""
    plan = read_json(path)
    return [torch.tensor(unit["indices"], dtype=torch.long) for unit in plan["units"]], plan
