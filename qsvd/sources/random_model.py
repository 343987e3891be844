"""Models of the paper's real widths with random weights, built offline from shipped architecture descriptions.

Each architecture is a JSON file in `architectures/`: the hub checkpoint it describes (`source`), its model and
config classes, the config (`config.json` style, loadable with the config class) and the processor settings
(processor and image processor classes and settings, the tokenizer's special tokens at their real ids, the
chat template). `build_random_model` cuts the language model (and, optionally, the vision tower) to fewer
layers, allocates the weights once, directly in the target dtype, fills them from seeded generators, and saves
the model with a working processor and a manifest. The whole pipeline can then run and be timed at real widths
without the hub; what such a model answers means nothing.

Weights: every matrix (linear, convolution, embedding) is drawn uniform with zero mean and the text config's
`initializer_range` as standard deviation, from a generator seeded by (seed, parameter name): a layer's weights
do not depend on how many layers are kept. Norms, biases and buffers get transformers' own initialisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch import nn

from qsvd.artefacts import MANIFEST, atomic_directory, provenance, write_json
from qsvd.models.device import DTYPES
from qsvd.models.registry import family_of_class

log = logging.getLogger(__name__)

STAGE = "random_model"
_ARCHITECTURE_FILES = resources.files("qsvd.sources") / "architectures"
ARCHITECTURES: tuple[str, ...] = tuple(
    sorted(f.name.removesuffix(".json") for f in _ARCHITECTURE_FILES.iterdir() if f.name.endswith(".json"))
)
NOTE = ("random weights: this model has the architecture and widths of {source}, not its weights; "
        "accuracy and perplexity measured on it mean nothing, only time and memory do")
# Words the word-level stand-in tokenizer knows (lower-cased): the chat templates' words and the questions'
# common words. Every other id up to the vocabulary size is an <unused_N> filler.
WORDS = (
    "user assistant system question answer image picture photo : ? . , ! ' \" ( ) - < > the a an of and or is are "
    "was were be in on at to from with by for this that these those there here it its what which who whom whose "
    "where when why how many much does do did can could would should will not no yes color colour shape size "
    "number count red blue green yellow black white gray grey brown orange purple pink teal circle square "
    "triangle rectangle left right top bottom middle front back above below next near man woman person people "
    "child dog cat car bus street tree sky water table room food one two three four five six seven eight nine "
    "ten zero contain contains show shows shown describe options option choose select best correct following "
    "context lecture solution hint because so than then as if all any some most other same different"
).split()


@dataclass(frozen=True)
class Architecture:
    """One shipped architecture description (a JSON file of `architectures/`)."""

    name: str
    source: str  # the hub id whose config.json this describes
    model_class: str
    config_class: str
    config: dict[str, Any]
    processor: dict[str, Any]
    notes: tuple[str, ...] = ()

    @property
    def family(self) -> str:
        return family_of_class(self.model_class).name


def load_architecture(name: str) -> Architecture:
    """The shipped description of architecture `name` (one of `ARCHITECTURES`)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown random-model architecture {name!r}; known: {list(ARCHITECTURES)} "
                         f"(files in {_ARCHITECTURE_FILES})")
    data = json.loads((_ARCHITECTURE_FILES / f"{name}.json").read_text())
    return Architecture(
        name=data["name"], source=data["source"], model_class=data["model_class"], config_class=data["config_class"],
        config=data["config"], processor=data["processor"], notes=tuple(data.get("notes", ())),
    )


def architecture_config(
    architecture: str,
    num_layers: int | None = None,
    vision_layers: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> transformers.PretrainedConfig:
    """The transformers config of `architecture`, no weights: LM cut to `num_layers` decoder layers, the vision
    tower to `vision_layers` encoder layers (None: all). `config_overrides` replaces nested config keys (e.g.
    narrower widths for tests); it may not change the image geometry, which the processor settings fix."""
    arch = load_architecture(architecture)
    config_class = getattr(transformers, arch.config_class)
    base = config_class.from_dict(arch.config)
    values = _merged(arch.config, config_overrides or {}, base.to_dict(), "config_overrides")
    for key, cut in (("text_config", num_layers), ("vision_config", vision_layers)):
        if cut is not None:
            full = arch.config[key]["num_hidden_layers"]
            if not 1 <= cut <= full:
                name = "num_layers" if key == "text_config" else "vision_layers"
                raise ValueError(f"{name} must be between 1 and {full} for {architecture}, got {cut}")
            values[key] = {**values[key], "num_hidden_layers": cut}
    config = config_class.from_dict(values)
    config.architectures = [arch.model_class]
    vision = config.vision_config
    geometry = (vision.image_size, vision.patch_size)
    if geometry != (base.vision_config.image_size, base.vision_config.patch_size):
        raise ValueError(f"config_overrides may not change vision_config.image_size or patch_size of {architecture}: "
                         "the processor settings of its JSON file are sized for them")
    return config


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any], known: Mapping[str, Any], where: str) -> dict:
    """`base` with `overrides` applied key by key; a key the config class does not know is an error."""
    merged = dict(base)
    for key, value in overrides.items():
        if key not in known:
            raise ValueError(f"{where}: unknown config key {key!r}; known keys: {sorted(known)}")
        if isinstance(value, Mapping) and isinstance(known[key], Mapping):
            merged[key] = _merged(base.get(key, {}), value, known[key], f"{where}.{key}")
        else:
            merged[key] = value
    return merged


def _skeleton(config: transformers.PretrainedConfig, model_class: str, dtype: torch.dtype) -> nn.Module:
    """The model on the meta device in `dtype`: structure and shapes, no memory."""
    with torch.device("meta"):
        return getattr(transformers, model_class)._from_config(config, dtype=dtype)


def parameter_count(
    architecture: str,
    num_layers: int | None = None,
    vision_layers: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> int:
    """Number of parameters of the (cut) architecture, from a meta-device skeleton: no weights allocated."""
    config = architecture_config(architecture, num_layers, vision_layers, config_overrides)
    return _numel(_skeleton(config, load_architecture(architecture).model_class, torch.bfloat16))


def _numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied parameter once


def _parameter_generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


_CHUNK = 1 << 22  # random int64 words per step: 32 MiB of scratch, 4 values per word


@torch.no_grad()
def _fill_uniform_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    """Fill `tensor` in place with values uniform on [-sqrt(3) std, sqrt(3) std] (16-bit grid), in its own dtype.

    Each random 64-bit word gives four values: about 4x faster than `normal_`, and no float32 copy is made.
    """
    flat = tensor.view(-1)
    scale = std * 3**0.5 / 32768
    for start in range(0, flat.numel(), 4 * _CHUNK):
        part = flat[start : start + 4 * _CHUNK]
        words = torch.empty((part.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None, generator=generator)
        part.copy_(words.view(torch.int16)[: part.numel()])
        part.mul_(scale)


def random_weights_model(
    config: transformers.PretrainedConfig, model_class: str, dtype: torch.dtype, seed: int
) -> nn.Module:
    """`model_class` built from `config` with seeded random weights, allocated once in `dtype` (eval mode)."""
    model = _skeleton(config, model_class, dtype)
    model.to_empty(device="cpu")
    std = config.get_text_config().initializer_range
    matrices = [(name, p) for name, p in model.named_parameters() if p.dim() >= 2]  # linear, conv, embedding

    def fill(item: tuple[str, nn.Parameter]) -> None:
        name, param = item
        _fill_uniform_(param, std, _parameter_generator(seed, name))
        param._is_hf_initialized = True  # transformers' initialisation below leaves it as it is

    # One generator per parameter: the threads (the random draws release the GIL) cannot change the values.
    with ThreadPoolExecutor(max_workers=torch.get_num_threads()) as pool:
        list(pool.map(fill, matrices))
    for module in model.modules():
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()  # as torch and transformers initialise embeddings
    with torch.random.fork_rng(devices=[]):  # norms, biases, buffers, small vectors: transformers' own init
        torch.manual_seed(seed)
        model.initialize_weights()
    model.tie_weights()
    return model.eval()


def build_tokenizer(
    spec: Mapping[str, Any], vocab_size: int, chat_template: str
) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly `vocab_size` tokens: the special tokens at their ids, then `WORDS`, then
    <unused_N> fillers. Lower-cased words, punctuation split off; unknown words map to the unk token."""
    specials: dict[str, int] = dict(spec["special_tokens"])
    if any(not 0 <= i < vocab_size for i in specials.values()) or len(set(specials.values())) != len(specials):
        raise ValueError(f"tokenizer special_tokens must have distinct ids below vocab_size {vocab_size}: {specials}")
    by_id = {i: token for token, i in specials.items()}
    words = iter(w for w in dict.fromkeys(WORDS) if w not in specials)
    vocab = {by_id[i] if i in by_id else next(words, f"<unused_{i}>"): i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=spec["unk_token"]))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces, " ?" -> "?"
    core.add_special_tokens(list(specials))  # kept whole, never lower-cased; their ids stay the vocabulary's
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=spec["bos_token"],
        eos_token=spec["eos_token"],
        unk_token=spec["unk_token"],
        pad_token=spec["pad_token"],
        add_bos_token=spec["add_bos_token"],
        add_eos_token=False,
        extra_special_tokens=dict(spec.get("named_tokens", {})),
        chat_template=chat_template,
    )


def expected_processor_settings(config: transformers.PretrainedConfig) -> dict[str, int]:
    """The processor settings the model config fixes: LLaVA's patch size, Idefics3's image tokens per image."""
    vision = config.vision_config
    if hasattr(config, "scale_factor"):
        return {"image_seq_len": (vision.image_size // vision.patch_size) ** 2 // config.scale_factor**2}
    return {"patch_size": vision.patch_size}


def build_processor(arch: Architecture, config: transformers.PretrainedConfig) -> Any:
    """The processor of `arch` (tokenizer, image processor, chat template), checked against `config`."""
    spec = arch.processor
    settings = dict(spec["settings"])
    for key, value in expected_processor_settings(config).items():
        if settings.get(key) != value:
            raise ValueError(f"{arch.name}: processor setting {key} is {settings.get(key)} but the model config "
                             f"needs {value}; fix the architecture's JSON file")
    text = config.get_text_config()
    tokenizer = build_tokenizer(spec["tokenizer"], text.vocab_size, spec["chat_template"])
    image_token = tokenizer.convert_tokens_to_ids(spec["tokenizer"]["named_tokens"]["image_token"])
    if image_token != config.image_token_id:
        raise ValueError(f"{arch.name}: the tokenizer's image token has id {image_token}, the config says "
                         f"image_token_id {config.image_token_id}; fix the architecture's JSON file")
    image_spec = spec["image_processor"]
    image_processor = getattr(transformers, image_spec["class"])(**image_spec["settings"])
    processor_class = getattr(transformers, spec["class"])
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=spec["chat_template"], **settings
    )


def build_random_model(
    architecture: str,
    out_dir: Path,
    num_layers: int | None = None,
    dtype: str = "bfloat16",
    seed: int = 0,
    vision_layers: int | None = None,
    config_overrides: Mapping[str, Any] | None = None,
) -> Path:
    """Write a random-weight model of `architecture` with its processor and a manifest into `out_dir`, atomically.

    `num_layers` / `vision_layers` keep the first LM decoder / vision encoder layers (None: all); the same seed
    gives the same weights. The directory loads with `qsvd.models.loading.load_model`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    arch = load_architecture(architecture)
    config = architecture_config(architecture, num_layers, vision_layers, config_overrides)
    processor = build_processor(arch, config)
    model = random_weights_model(config, arch.model_class, DTYPES[dtype], seed)
    tokenizer = processor.tokenizer
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    parameters = _numel(model)
    settings = {"architecture": architecture, "num_layers": num_layers, "vision_layers": vision_layers,
                "dtype": dtype, "config_overrides": dict(config_overrides or {})}
    manifest = provenance(STAGE, settings, seed) | {
        "architecture": architecture,
        "source": arch.source,
        "family": arch.family,
        "model_class": arch.model_class,
        "num_layers": config.get_text_config().num_hidden_layers,
        "vision_layers": config.vision_config.num_hidden_layers,
        "dtype": dtype,
        "parameters": parameters,
        "weights": "random",
        "note": NOTE.format(source=arch.source),
    }
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / MANIFEST, manifest)
    log.info("built %s (%s, %d parameters, %s, seed %d, random weights) in %s", architecture, arch.model_class,
             parameters, dtype, seed, out_dir)
    return Path(out_dir)
