"""Pipeline stages: each reads artefacts, calls the math and model code, and writes artefacts.

`STAGE_VERSIONS` reaches each Snakemake rule as a param: bump a stage's version when a change
to its code alters its numbers, so that Snakemake re-runs it and everything downstream.
"""

STAGE_VERSIONS = {
    "data": 1,
    "demo_model": 1,
    "export_smollm2": 1,
    "smolvlm_offline_model": 4,
    "random_model": 1,
    "activation_stats": 1,
    "decompose": 3,
    "importance": 2,
    "rank_plan": 2,
    "lowrank_model": 3,
    "quantize": 4,
    "evaluate": 1,
    "report": 2,
    "benchmark": 1,
    "benchmark_report": 1,
    "paper_table": 1,
}
