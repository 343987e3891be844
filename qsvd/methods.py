"""The compression methods: how each decomposes q/k/v, with which input transform and rank allocation.

A layout names the groups of projections that share one SVD per layer ("qkv": one joint SVD;
"q", "k", "v": one each); projections in no group stay dense. Every method runs through the same
stages and the same cost model (method.md §1, §2, §4).
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUTS: dict[str, tuple[str, ...]] = {
    "joint": ("qkv",),  # [W_q; W_k; W_v] = one SVD, one shared latent (QSVD)
    "separate": ("q", "k", "v"),  # one SVD per projection, equal activation scaling
    "kv": ("k", "v"),  # K and V separately, Q dense (ASVD / SVD-LLM as the paper runs them)
    "q-kv": ("q", "kv"),  # Q alone, [W_k; W_v] jointly: one shared latent for K and V, the only thing cached (GQA)
}
TRANSFORMS = ("scale", "whiten")  # diag(s) from abs statistics (svd.scaling), or SVD-LLM's whitening
SCALINGS = ("abs_mean", "abs_max", "none")
INPUT_TRANSFORMS = (*SCALINGS, "whiten")  # what the decompose stage applies
ALLOCATIONS = ("importance", "fisher", "uniform")
# The allocations that read the importance stage's output: its per-singular-value scores, or its per-unit Fisher
# information (both from the same per-sample gradients of the q/k/v weights).
GRADIENT_ALLOCATIONS = ("importance", "fisher")


@dataclass(frozen=True)
class Method:
    name: str
    layout: str
    transform: str
    allocation: str
    summary: str

    @property
    def reads_importance(self) -> bool:
        """Whether the rank plan needs the importance stage's output."""
        return self.allocation in GRADIENT_ALLOCATIONS


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("qsvd", "joint", "scale", "importance", "joint QKV, activation scaling, gradient rank allocation"),
        Method("joint-uniform", "joint", "scale", "uniform", "joint QKV, the same rank in every layer"),
        Method("joint-fib", "joint", "scale", "fisher", "joint QKV, per-layer ranks in proportion to Fisher information (Palu's FIB)"),
        Method("separate", "separate", "scale", "importance", "Q, K, V decomposed separately, gradient allocation"),
        Method("asvd", "kv", "scale", "uniform", "ASVD: K and V separately at rank r, Q dense"),
        Method("svd-llm", "kv", "whiten", "uniform", "SVD-LLM whitening, K and V separately, Q dense"),
        Method("qsvd-whiten", "joint", "whiten", "importance", "joint QKV with SVD-LLM whitening, gradient allocation"),
        Method("qsvd-kv", "q-kv", "scale", "importance", "Q alone, K and V jointly (one cached latent), gradient allocation"),
        Method("qsvd-kv-whiten", "q-kv", "whiten", "importance", "Q alone, K and V jointly, whitening, gradient allocation"),
    )
}


def method_by_name(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    return METHODS[name]
