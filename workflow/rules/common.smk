import json
from pathlib import Path

from qsvd.config import ConfigError, load_config, looks_like_path
from qsvd.models.hub import HubUnreachableError, check_hub_model
from qsvd.stages import STAGE_VERSIONS

try:
    CFG = load_config(config)
    if not CFG.model.is_demo and not looks_like_path(CFG.model.source):
        check_hub_model(CFG.model.source)
except (ConfigError, HubUnreachableError) as error:
    raise WorkflowError(f"invalid configuration: {error}") from None

REPO = Path(workflow.basedir).parent
# Runs the package of this checkout, with or without `pip install -e .` (conda envs, SLURM jobs).
# Deliberately not a param: the absolute checkout path would make moving the repo re-run everything.
QSVD = f"PYTHONPATH={REPO}${{PYTHONPATH:+:$PYTHONPATH}} python -m qsvd.cli"
MODEL = CFG.model.name
RESULTS = f"results/{MODEL}"
DATASETS = {d.key: d for d in (CFG.calibration, *CFG.evaluation.tasks)}
BUDGETS = {CFG.rank.key(b): b for b in CFG.rank.budgets}
CALIB = f"calib~{CFG.calibration.key}"
SVD = f"{RESULTS}/{CALIB}/svd~{CFG.svd.key}"
FACTORS = f"factors~{CFG.factors.key}"


wildcard_constraints:
    dataset="[^/~]+",
    rank="[^/~]+",


def model_input(wildcards=None):
    """The demo checkpoint is a stage output; a hub id or local path is not tracked by Snakemake."""
    return [f"{RESULTS}/model"] if CFG.model.is_demo else []


def model_source():
    return f"{RESULTS}/model" if CFG.model.is_demo else CFG.model.source


def dataset_args(wildcards):
    """Command-line arguments of `qsvd data` for the dataset named by the path."""
    if wildcards.dataset not in DATASETS:
        raise WorkflowError(f"no dataset with key {wildcards.dataset!r} in the config")
    spec = DATASETS[wildcards.dataset]
    args = f"--dataset {spec.dataset} --split {spec.split} --seed {spec.seed}"
    if spec.num_samples is not None:
        args += f" --num-samples {spec.num_samples}"
    if spec.local_dir:
        args += f" --local-dir {spec.local_dir}"
    return args


def budget_of(wildcards):
    return BUDGETS[wildcards.rank]


def eval_labels(method, rank=None):
    labels = {"model": MODEL, "method": method, "seed": CFG.calibration.seed}
    if rank is None:
        labels.update(budget="full", budget_kind="none", budget_value=1.0)
    else:
        labels.update(
            budget=f"{CFG.rank.budget_kind}={BUDGETS[rank]:g}",
            budget_kind=CFG.rank.budget_kind,
            budget_value=BUDGETS[rank],
            allocation=CFG.rank.allocation,
            beta=CFG.factors.beta,
            scaling=CFG.svd.scaling,
            alpha=CFG.svd.alpha,
        )
    return json.dumps(labels, sort_keys=True)


def evaluation_results():
    tasks = [t.key for t in CFG.evaluation.tasks]
    uncompressed = [f"{RESULTS}/uncompressed/eval/{t}.json" for t in tasks]
    compressed = [f"{SVD}/rank~{r}/{FACTORS}/eval/{t}.json" for r in BUDGETS for t in tasks]
    return uncompressed + compressed


def report_outputs():
    return [f"{RESULTS}/report/results.csv", f"{RESULTS}/report/tables.md", f"{RESULTS}/report/tradeoff.png"]
