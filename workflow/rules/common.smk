import json
import os
import re
import shlex
from pathlib import Path

from qsvd.config import ConfigError, load_config, number_key
from qsvd.methods import method_by_name
from qsvd.paper.slices import SLICE, SLICE_MARKDOWN
from qsvd.paper.tables import load_tables
from qsvd.preflight import preflight
from qsvd.stages import STAGE_VERSIONS
from qsvd.resources import job_resources

try:
    CFG = load_config(config)
    preflight(CFG)  # what only the model's config, the datasets and the hub cache can tell, before any job
except ConfigError as error:
    raise WorkflowError(f"invalid configuration: {error}") from None

REPO = Path(workflow.basedir).parent
# Every job runs the package of this checkout, with or without `pip install -e .` (conda envs, SLURM jobs): the
# checkout leads PYTHONPATH in the environment of every shell line. Environment, not a param: the absolute checkout
# path would make moving the repo re-run everything. shell.prefix formats its text as Snakemake formats a shell line,
# so the quoted path enters as the value of a name (braces in it stay literal); bash's strict mode is kept.
PACKAGE_ON_PYTHONPATH = f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"
shell.prefix("set -euo pipefail; {PACKAGE_ON_PYTHONPATH}; ")
MODEL = CFG.model.name
RESULTS = f"results/{MODEL}"
DATASETS = {d.key: d for d in (CFG.calibration, *CFG.evaluation.tasks)}
METHODS = [method_by_name(m) for m in CFG.methods]
CALIB = f"calib~{CFG.calibration.key}"
# One decomposition per (layout, transform); methods that differ only in allocation share it.
DECOMPOSITIONS = {CFG.svd.key(m): m for m in METHODS}
# Every compressed model: (decomposition key, rank key) -> (method, budget).
LEAVES = {(CFG.svd.key(m), CFG.rank.key(b, m)): (m, b) for m in METHODS for b in CFG.rank.budgets}
SVD = f"{RESULTS}/{CALIB}/svd~{{svd}}"  # the {svd} wildcard: a key of DECOMPOSITIONS
FACTORS = f"factors~{CFG.factors.key}"
REPORT = f"{RESULTS}/{CFG.report_name}"
NEEDS_GRAM = any(m.transform == "whiten" for m in METHODS)
QUANT = CFG.quantization
# Every quantized setting: path key -> (format, seed, rotate); applied to every leaf, and to the
# dense model for QuaRot.
QUANT_SETTINGS = {QUANT.key(*setting): setting for setting in QUANT.settings()}
QUAROT = f"{RESULTS}/quarot/quant~{{quant}}"


wildcard_constraints:
    dataset="[^/~]+",
    svd="[^/~]+",
    rank="[^/~]+",
    quant="[^/~]+",


def local_files(path):
    """Every file below a local model or dataset path (the path itself when it is a file), hidden entries left out;
    none for a path that does not exist (a hub id).

    These are inputs of the rules that read the path: Snakemake re-runs a rule when one of them is newer than its
    outputs (replaced weights, an edited text file) or when files are added or removed (its input set changed). One
    stat per file and no hashing, so a folder of large weights costs nothing when the DAG is built.
    """
    root = Path(path).expanduser()
    if root.is_file():
        return [str(root)]
    files = []
    for folder, subfolders, names in os.walk(root, followlinks=True):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files += [os.path.join(folder, name) for name in sorted(names) if not name.startswith(".")]
    return files


# The files of a local model.source (a hub id: none, its cache is outside the workflow).
SOURCE_FILES = [] if CFG.model.is_built else local_files(CFG.model.source)


def model_input(wildcards=None):
    """The base model as inputs: a built checkpoint (demo, smollm2, ...) is a stage output, a local source is its
    files (local_files); a hub id is not tracked by Snakemake."""
    return [f"{RESULTS}/model"] if CFG.model.is_built else SOURCE_FILES


def model_source():
    return f"{RESULTS}/model" if CFG.model.is_built else CFG.model.source


def dataset_spec(wildcards):
    if wildcards.dataset not in DATASETS:
        raise WorkflowError(f"no dataset with key {wildcards.dataset!r} in the config")
    return DATASETS[wildcards.dataset]


def dataset_input(wildcards):
    """The files of the dataset's local copy (local_files), as inputs; none for the hub and the packaged datasets."""
    spec = dataset_spec(wildcards)
    return local_files(spec.local_dir) if spec.local_dir else []


def dataset_args(wildcards):
    """Command-line arguments of `qsvd data` for the dataset named by the path."""
    spec = dataset_spec(wildcards)
    args = ["--dataset", spec.dataset, "--split", spec.split, "--seed", str(spec.seed)]
    if spec.num_samples is not None:
        args += ["--num-samples", str(spec.num_samples)]
    if spec.local_dir:
        args += ["--local-dir", spec.local_dir]
    return shlex.join(args)


def leaf(wildcards):
    """(method, budget) of the compressed model named by the {svd} and {rank} wildcards."""
    key = (wildcards.svd, wildcards.rank)
    if key not in LEAVES:
        raise WorkflowError(f"no method and budget of the config give svd~{key[0]}/rank~{key[1]}")
    return LEAVES[key]


def decomposition_method(wildcards):
    if wildcards.svd not in DECOMPOSITIONS:
        raise WorkflowError(f"no method of the config uses the decomposition svd~{wildcards.svd}")
    return DECOMPOSITIONS[wildcards.svd]


def decomposition_stats(wildcards):
    """Whitening reads XᵀX (the `input_gram` rule), diagonal scalings the abs statistics."""
    return f"{RESULTS}/{CALIB}/{'gram' if decomposition_method(wildcards).transform == 'whiten' else 'stats'}"


def eval_labels(method=None, budget=None):
    """The labels an evaluation result carries: model, method, seed and, when compressed, the budget."""
    labels = {"model": MODEL, "method": method.name if method else "uncompressed", "seed": CFG.calibration.seed}
    if method is None:
        labels.update(budget="full", budget_kind="none", budget_value=1.0)
    else:
        labels.update(
            budget=f"{CFG.rank.budget_kind}={number_key(budget)}",
            budget_kind=CFG.rank.budget_kind,
            budget_value=budget,
            allocation=method.allocation,
            layout=method.layout,
            transform=CFG.svd.transform(method),
            beta=CFG.factors.beta,
            alpha=CFG.svd.alpha,
        )
    return labels


def quant_setting(wildcards):
    if wildcards.quant not in QUANT_SETTINGS:
        raise WorkflowError(f"no quantization format, seed and rotation of the config give quant~{wildcards.quant}")
    return QUANT_SETTINGS[wildcards.quant]


def quant_spec(wildcards):
    """The quantize stage's QuantSpec fields (JSON) for the setting named by {quant}."""
    setting = quant_setting(wildcards)
    weight_bits, act_bits = QUANT.bits(setting.fmt)
    spec = dict(weight_bits=weight_bits, act_bits=act_bits, weight_method=QUANT.weight_method, group_size=QUANT.group_size,
                lm_clip=QUANT.lm_clip, vision_clip=QUANT.vision_clip, rotate=setting.rotate, rotate_latent=setting.rotate,
                vision=QUANT.vision, beta=setting.beta, seed=setting.seed)
    if QUANT.vocabulary_bits is not None:  # only when set: the params of every existing quantized model stay as they were
        spec["vocabulary_bits"] = QUANT.vocabulary_bits
    if QUANT.act_order:  # likewise
        spec["act_order"] = True
    return json.dumps(spec, sort_keys=True)


def quantized_labels(quant, method=None, budget=None):
    """eval_labels of a quantized model: its format, rotation, β and seed (QuaRot when `method` is None)."""
    setting = QUANT_SETTINGS[quant]
    labels = eval_labels(method, budget)
    labels.update(seed=setting.seed, quant_format=setting.fmt, rotate=setting.rotate, weight_method=QUANT.weight_method)
    if method is None:
        labels["method"] = "quarot"
    else:
        labels["quant_beta"] = "per layer" if setting.beta is None else setting.beta
        if setting in QUANT.beta_ablation_settings():
            labels["ablation"] = "beta"
    return labels


# Every compressed low-rank model, by its path below RESULTS: (method, budget).
LEAF_PATHS = {f"{CALIB}/svd~{svd}/rank~{rank}/{FACTORS}": leaf for (svd, rank), leaf in LEAVES.items()}
# The models quantization starts from (the {qbase} of the quantize rule), every leaf and the dense model for QuaRot.
QUANT_BASES = {**LEAF_PATHS, **({"quarot": None} if QUANT.quarot else {})}
# Every evaluated model (the {variant} of the evaluate rule) -> the labels its results carry. QuaRot has no latent:
# the β ablation does not apply to it.
VARIANTS = {"uncompressed": eval_labels()}
VARIANTS |= {leaf: eval_labels(*method_budget) for leaf, method_budget in LEAF_PATHS.items()}
VARIANTS |= {f"{leaf}/quant~{quant}": quantized_labels(quant, *method_budget)
             for leaf, method_budget in LEAF_PATHS.items() for quant in QUANT_SETTINGS}
if QUANT.quarot:
    VARIANTS |= {f"quarot/quant~{quant}": quantized_labels(quant) for quant, setting in QUANT_SETTINGS.items()
                 if setting.beta == QUANT.beta}


def _exactly(names):
    return "|".join(re.escape(name) for name in sorted(names, key=len, reverse=True))


wildcard_constraints:
    variant=_exactly(VARIANTS),
    qbase=_exactly(QUANT_BASES),


def variant_model_input(wildcards):
    """The model the evaluated variant reads, as inputs (the base model's: model_input)."""
    if wildcards.variant == "uncompressed":
        return {"model": model_input()}
    return {"model": f"{RESULTS}/{wildcards.variant}/model"}


def variant_model_source(wildcards):
    return model_source() if wildcards.variant == "uncompressed" else f"{RESULTS}/{wildcards.variant}/model"


def variant_labels(wildcards):
    return json.dumps(VARIANTS[wildcards.variant], sort_keys=True)


def quantize_model_input(wildcards):
    if wildcards.qbase == "quarot":
        return {"model": model_input()}
    return {"model": f"{RESULTS}/{wildcards.qbase}/model"}


def quantize_model_source(wildcards):
    return model_source() if wildcards.qbase == "quarot" else f"{RESULTS}/{wildcards.qbase}/model"


def evaluation_results():
    return [f"{RESULTS}/{variant}/eval/{task.key}.json" for variant in VARIANTS for task in CFG.evaluation.tasks]


def report_outputs():
    return [f"{REPORT}/results.csv", f"{REPORT}/tables.md", f"{REPORT}/tradeoff.png"]


# What every job of a stage asks for (qsvd.resources: sized from the model's config, no weights read); stages that
# take --device also ask for a GPU unless compute.device is cpu, so a profile requests GPUs for exactly those jobs.
RESOURCES = job_resources(CFG)
DEVICE = CFG.compute.device
DTYPE = CFG.model.dtype

# The inference benchmark: one job per variant (benchmark.smk), one report of them all (report.smk).
BENCH = CFG.benchmark
# A benchmark job holds the model, its caches and the prefill's activations: the evaluate stage's share, or the
# configured memory limit (which it skips cells to keep under) and the runtime's overhead.
BENCH_RESOURCES = RESOURCES["evaluate"] | (
    {"mem_mb": max(RESOURCES["evaluate"]["mem_mb"], 2500 + int(1024 * BENCH.memory_limit_gib))}
    if BENCH.memory_limit_gib else {}
)


def paper_table_outputs():
    """The paper_table rule's outputs where report_name names a table of the paper (the configs of config/paper/)."""
    if CFG.report_name not in {table.id for table in load_tables()}:
        return []
    return list(paper_table_files().values())


def paper_table_files():
    """The paper_table rule's slice (where `qsvd paper-table --results` looks for it) and its markdown."""
    return {"json": f"{REPORT}/{SLICE}", "markdown": f"{REPORT}/{SLICE_MARKDOWN}"}


def benchmark_results():
    return [f"{RESULTS}/{variant}/bench/inference.json" for variant in VARIANTS] if BENCH.enabled else []


def benchmark_report_outputs():
    """The benchmark report's files by name (none when benchmark.enabled is false)."""
    if not BENCH.enabled:
        return {}
    names = dict(csv="benchmark.csv", markdown="benchmark.md", throughput="bench_tokens_per_s.png",
                 cache="bench_cache_bytes.png", budget="bench_cache_budget.png")
    return {key: f"{REPORT}/{name}" for key, name in names.items()}


def benchmark_args(wildcards):
    """`qsvd benchmark`'s grid, and what applies to this variant: the peers for the uncompressed model, the cache
    modes and executions for a compressed one (so that editing one re-runs only the jobs it concerns)."""
    args = ["--batch-sizes", *map(str, BENCH.batch_sizes), "--contexts", *map(str, BENCH.contexts),
            "--decode-steps", str(BENCH.decode_steps), "--warmup", str(BENCH.warmup)]
    if wildcards.variant == "uncompressed":
        args += ["--peers", *BENCH.peers]
    else:
        args += ["--cache-modes", *BENCH.cache_modes, "--executions", *BENCH.executions]
    if BENCH.max_prompt_tokens is not None:
        args += ["--max-prompt-tokens", str(BENCH.max_prompt_tokens)]
    if BENCH.memory_limit_gib is not None:
        args += ["--memory-limit-gib", f"{BENCH.memory_limit_gib:g}"]
    return shlex.join(args)
