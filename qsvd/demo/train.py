"""Train a small VLM on the easy-vqa train split, deterministically, in a few CPU minutes.

Joint training from scratch stalls at question-only guessing, so training has two phases:
1. the vision tower learns each image's shape and colour (read off the training questions): a linear
   head on every patch token, so each image token the language model sees carries both;
2. the tower is frozen, its patch features computed once, and the projector and language model learn
   to answer with answer-only cross-entropy (labels unshifted: the model shifts them itself).
   Questions about one image share the prompt prefix (BOS, "USER:", the image tokens): its keys and
   values are computed once per image and reused by each question, the same math as full prompts.
The architecture enters through a `VisionLanguageParts` (the demo's LLaVA here; SmolVLM's Idefics3 in
qsvd/demo/smolvlm_offline.py), which says where the tower, projector and language model are and
what the second phase trains.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn
from tqdm import tqdm
from transformers import LlavaForConditionalGeneration, LlavaProcessor

from qsvd.artefacts import MANIFEST, atomic_directory, provenance, write_json
from qsvd.data.easy_vqa import easy_vqa_records
from qsvd.data.records import Record
from qsvd.demo.build import IMAGE_SIZE, DemoSizes, build_demo_model, build_demo_processor, image_token_count
from qsvd.models.prompts import IGNORE_INDEX, chat_prompt
from qsvd.models.registry import family_by_name

log = logging.getLogger(__name__)

SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
EVAL_SEED = 0  # the held-out test subset is the same for every training seed
SUMMARY = MANIFEST  # the training summary is the directory's manifest: sealed with each file's size and SHA-256


@dataclass(frozen=True)
class DemoRecipe:
    """Training hyperparameters (defaults: the full recipe, about 3 minutes on 2 cores)."""

    vision_epochs: float = 8.0
    vision_batch_size: int = 32
    vision_lr: float = 2e-3
    vision_weight_decay: float = 0.05
    lm_epochs: float = 2.0
    lm_images_per_step: int = 7  # all questions of these images form one batch (about 67 questions)
    lm_lr: float = 2e-3
    lm_weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    max_train_images: int | None = None  # the language phase's images, the first by id; None: all 4000
    max_vision_images: int | None = None  # the vision phase's images, the first by id; None: the language phase's
    max_train_questions: int | None = None  # a seeded sample of their questions; None: all
    eval_questions: int = 500  # a fixed seeded sample of the test split


def split_overrides(overrides: dict, sizes: type = DemoSizes) -> tuple[DemoRecipe, dict]:
    """(recipe, model sizes) from one flat dict of overrides; an unknown key is an error."""
    recipe_keys = {f.name for f in fields(DemoRecipe)}
    size_keys = {f.name for f in fields(sizes)}
    unknown = sorted(set(overrides) - recipe_keys - size_keys)
    if unknown:
        raise ValueError(f"unknown demo recipe key {unknown[0]!r}; known keys: {sorted(recipe_keys | size_keys)}")
    recipe = DemoRecipe(**{k: v for k, v in overrides.items() if k in recipe_keys})
    return recipe, {k: v for k, v in overrides.items() if k in size_keys}


def image_attributes(records: list[Record]) -> dict[str, tuple[int, int]]:
    """(shape index, colour index) of each image, from its questions; IGNORE_INDEX where they do not tell."""
    present: dict[str, set[str]] = {}
    absent: dict[str, set[str]] = {}
    for r in records:
        words = r.question.replace("?", " ").split()
        named = {w for w in words if w in SHAPES or w in COLOURS}
        yes, no = present.setdefault(r.image, set()), absent.setdefault(r.image, set())
        if r.answer in SHAPES or r.answer in COLOURS:  # "what is the blue shape?" rectangle
            yes.update(named | {r.answer})
        elif (r.answer == "yes") != ("not" in words or "no" in words):  # "is there not a circle?" no
            yes.update(named)
        else:
            no.update(named)
    labels = {}
    for image, yes in present.items():
        label = []
        for names in (SHAPES, COLOURS):
            known = [n for n in names if n in yes]
            left = [n for n in names if n not in absent[image]]
            label.append(names.index(known[0]) if known else names.index(left[0]) if len(left) == 1 else IGNORE_INDEX)
        labels[image] = (label[0], label[1])
    return labels


def _cosine_with_warmup(optimizer: torch.optim.Optimizer, total: int, warmup_fraction: float):
    warmup = max(1, int(total * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _optimise(groups: list[dict], epoch_batches: Callable[[], Iterable], batch_loss: Callable[[Any], torch.Tensor],
              total: int, lr: float, weight_decay: float, recipe: DemoRecipe, deadline: float, desc: str) -> tuple[int, float]:
    """AdamW with warmup + cosine for `total` steps over `epoch_batches()` (one call per epoch), stopping
    at `deadline`; returns (steps taken, last loss). `groups` are AdamW parameter groups (a group may set
    its own weight_decay); gradients are clipped over all of them together."""
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    parameters = [p for group in groups for p in group["params"]]
    scheduler = _cosine_with_warmup(optimizer, total, recipe.warmup_fraction)
    step, loss = 0, torch.tensor(float("nan"))
    with tqdm(total=total, desc=desc, leave=False) as bar:
        while step < total and time.monotonic() < deadline:
            for batch in epoch_batches():
                if step >= total or time.monotonic() >= deadline:
                    break
                loss = batch_loss(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(parameters, recipe.grad_clip)
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update()
                if step % 200 == 0:
                    log.info("%s step %d/%d loss %.4f", desc, step, total, loss.item())
    log.info("%s: %d/%d steps, last loss %.4f", desc, step, total, loss.item())
    return step, loss.item()


def patch_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision features LLaVA feeds its projector: the configured layer, CLS dropped ("default")."""
    hidden = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    features = hidden[model.config.vision_feature_layer]
    return features[:, 1:] if model.config.vision_feature_select_strategy == "default" else features


class VisionLanguageParts(Protocol):
    """What training needs of one VLM architecture; `family` names its prompt format in the registry."""

    family: str

    def vision_tower(self, model: nn.Module) -> nn.Module: ...

    def patch_features(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """(images, patches, width) features from (images, 3, H, W) pixels: the projector's input."""

    def image_embeddings(self, model: nn.Module, features: torch.Tensor) -> torch.Tensor:
        """The language model's input embeddings of the image tokens, (images, tokens, hidden)."""

    def language_model(self, model: nn.Module) -> nn.Module: ...

    def suffix_loss(self, model: nn.Module, suffix: torch.Tensor, mask: torch.Tensor, cache: Any,
                    labels: torch.Tensor) -> torch.Tensor:
        """Mean answer-token cross-entropy of the suffix embeddings after the cached prefix (labels unshifted)."""

    def language_phase(self, model: nn.Module) -> Iterator[list[dict]]:
        """Context manager: sets what phase 2 trains, yields its AdamW parameter groups, restores on exit."""


@dataclass(frozen=True)
class LlavaParts:
    """The demo LLaVA: phase 2 trains the projector and the whole language model."""

    family: str = "llava"

    def vision_tower(self, model: LlavaForConditionalGeneration) -> nn.Module:
        return model.model.vision_tower

    def patch_features(self, model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
        return patch_features(model, pixel_values)

    def image_embeddings(self, model: LlavaForConditionalGeneration, features: torch.Tensor) -> torch.Tensor:
        return model.model.multi_modal_projector(features)

    def language_model(self, model: LlavaForConditionalGeneration) -> nn.Module:
        return model.model.language_model

    def suffix_loss(self, model: LlavaForConditionalGeneration, suffix: torch.Tensor, mask: torch.Tensor, cache: Any,
                    labels: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=suffix, attention_mask=mask, past_key_values=cache, labels=labels).loss

    @contextmanager
    def language_phase(self, model: LlavaForConditionalGeneration) -> Iterator[list[dict]]:
        model.model.vision_tower.requires_grad_(False)
        try:
            yield [{"params": [p for p in model.parameters() if p.requires_grad]}]
        finally:
            model.requires_grad_(True)


LLAVA = LlavaParts()


def pretrain_vision(model: nn.Module, pixels: torch.Tensor, labels: torch.Tensor, recipe: DemoRecipe,
                    generator: torch.Generator, deadline: float, parts: VisionLanguageParts = LLAVA) -> dict:
    """Phase 1: shape and colour heads on every patch token; returns steps and final training loss."""
    tower = parts.vision_tower(model)
    with torch.random.fork_rng(devices=[]):  # nn.Linear initialises from the global RNG
        torch.manual_seed(int(torch.randint(2**31, (), generator=generator)))
        heads = nn.Linear(tower.config.hidden_size, len(SHAPES) + len(COLOURS))
    parameters = list(tower.parameters()) + list(heads.parameters())
    total = math.ceil(len(pixels) / recipe.vision_batch_size * recipe.vision_epochs)

    def batch_loss(batch: torch.Tensor) -> torch.Tensor:
        logits = heads(parts.patch_features(model, pixels[batch]))
        target = labels[batch, None, :].expand(-1, logits.shape[1], -1)
        loss = nn.functional.cross_entropy(logits[..., : len(SHAPES)].flatten(0, 1), target[..., 0].flatten())
        return loss + nn.functional.cross_entropy(logits[..., len(SHAPES) :].flatten(0, 1), target[..., 1].flatten())

    model.train()
    step, loss = _optimise(
        [{"params": parameters}], lambda: torch.randperm(len(pixels), generator=generator).split(recipe.vision_batch_size), batch_loss,
        total, recipe.vision_lr, recipe.vision_weight_decay, recipe, deadline, "vision pre-training",
    )
    model.eval()
    return {"vision_steps": step, "vision_steps_planned": total, "vision_final_loss": loss}


@dataclass(frozen=True)
class PromptBatch:
    """Training prompts split at the end of the image tokens: one shared prefix, one suffix per question."""

    prefix_ids: torch.Tensor  # (P,) BOS, "USER:", the image tokens (as the processor expands them)
    suffix_ids: torch.Tensor  # (Q, S) question, "ASSISTANT:", answer, EOS; right-padded
    suffix_mask: torch.Tensor  # (Q, S)
    suffix_labels: torch.Tensor  # (Q, S) IGNORE_INDEX except the answer and EOS


def _processor_ids(processor: Any, text: str) -> list[int]:
    """Token ids of `text` (one image placeholder) as the processor writes them, image tokens expanded."""
    batch = processor(text=text, images=[Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE))], add_special_tokens=False)
    return list(batch["input_ids"][0])


def prompt_batch(processor: Any, records: list[Record], family: str = "llava") -> PromptBatch:
    """Tokenize every record as prompt + answer + EOS, split after the image tokens."""
    tokenizer = processor.tokenizer
    marker = "\x00"
    head, tail = chat_prompt(processor, family_by_name(family), marker).split(marker)
    prefix = _processor_ids(processor, head)
    suffixes = tokenizer([r.question + tail for r in records], add_special_tokens=False)["input_ids"]
    answers = tokenizer([" " + r.answer for r in records], add_special_tokens=False)["input_ids"]
    whole = _processor_ids(processor, head + records[0].question + tail)
    if whole != prefix + suffixes[0]:
        raise ValueError(f"the prompt {head + records[0].question + tail!r} does not tokenize as prefix + suffix")
    width = max(len(s) + len(a) + 1 for s, a in zip(suffixes, answers))
    ids = torch.full((len(records), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(records), width), dtype=torch.long)
    labels = torch.full((len(records), width), IGNORE_INDEX)
    for i, (suffix, answer) in enumerate(zip(suffixes, answers)):
        full = suffix + answer + [tokenizer.eos_token_id]
        ids[i, : len(full)] = torch.tensor(full)
        mask[i, : len(full)] = 1
        labels[i, len(suffix) : len(full)] = torch.tensor(answer + [tokenizer.eos_token_id])
    return PromptBatch(torch.tensor(prefix), ids, mask, labels)


def shared_prefix_loss(model: nn.Module, prompts: PromptBatch, features: torch.Tensor, owner: torch.Tensor,
                       questions: torch.Tensor, parts: VisionLanguageParts = LLAVA) -> torch.Tensor:
    """Answer loss of `questions`, whose images' patch features are `features[owner]`.

    The prefix runs once per image; its key/value cache is repeated for each question of that image.
    """
    embed = model.get_input_embeddings()
    prefix_ids = prompts.prefix_ids.expand(len(features), -1)
    prefix = embed(prefix_ids)
    image_slots = (prefix_ids == model.config.image_token_id)[..., None].expand_as(prefix)
    prefix = prefix.masked_scatter(image_slots, parts.image_embeddings(model, features).to(prefix.dtype))
    cache = parts.language_model(model)(inputs_embeds=prefix, use_cache=True).past_key_values
    cache.batch_select_indices(owner)
    width = int(prompts.suffix_mask[questions].sum(1).max())
    mask = torch.cat([torch.ones(len(questions), prefix.shape[1], dtype=torch.long), prompts.suffix_mask[questions, :width]], 1)
    suffix = embed(prompts.suffix_ids[questions, :width])
    return parts.suffix_loss(model, suffix, mask, cache, prompts.suffix_labels[questions, :width])


def train_language(model: nn.Module, prompts: PromptBatch, features: torch.Tensor, question_image: torch.Tensor,
                   recipe: DemoRecipe, generator: torch.Generator, deadline: float, parts: VisionLanguageParts = LLAVA) -> dict:
    """Phase 2: what `parts.language_phase` trains, on frozen patch features; batches are whole images' questions."""
    questions_of = [[] for _ in range(len(features))]
    for question, image in enumerate(question_image.tolist()):
        questions_of[image].append(question)
    images = torch.tensor([i for i, qs in enumerate(questions_of) if qs])
    total = math.ceil(len(images) / recipe.lm_images_per_step * recipe.lm_epochs)

    def batch_loss(chosen: torch.Tensor) -> torch.Tensor:
        owner = torch.tensor([j for j, i in enumerate(chosen.tolist()) for _ in questions_of[i]])
        questions = torch.tensor([q for i in chosen.tolist() for q in questions_of[i]])
        return shared_prefix_loss(model, prompts, features[chosen], owner, questions, parts)

    model.train()
    with parts.language_phase(model) as groups:
        step, loss = _optimise(
            groups, lambda: images[torch.randperm(len(images), generator=generator)].split(recipe.lm_images_per_step),
            batch_loss, total, recipe.lm_lr, recipe.lm_weight_decay, recipe, deadline, "language training",
        )
    model.eval()
    return {"lm_steps": step, "lm_steps_planned": total, "lm_final_loss": loss}


@torch.no_grad()
def generated_answers(model: nn.Module, processor: Any, records: list[Record], image_paths: dict[str, Path],
                      batch_size: int = 100, family: str = "llava") -> list[str]:
    """Greedy answers (at most 3 new tokens), batched with left padding; the prompts carry their own BOS."""
    prompt_family = family_by_name(family)
    answers: list[str] = []
    for start in tqdm(range(0, len(records), batch_size), desc="held-out answers", leave=False):
        chunk = records[start : start + batch_size]
        batch = processor(
            text=[chat_prompt(processor, prompt_family, r.question) for r in chunk],
            images=[Image.open(image_paths[r.image]).convert("RGB") for r in chunk],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            add_special_tokens=False,
        )
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
        new_tokens = generated[:, batch["input_ids"].shape[1] :]
        answers += [a.strip() for a in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return answers


def answer_accuracy(answers: list[str], records: list[Record]) -> float:
    """Share of exact matches with the gold answers."""
    return sum(a == r.answer for a, r in zip(answers, records, strict=True)) / len(records)


def _load_pixels(processor: Any, paths: list[Path]) -> torch.Tensor:
    """(images, 3, H, W) pixel values; one image per prompt (SmolVLM's (images, 1, 3, H, W) flattened)."""
    images = [Image.open(p).convert("RGB") for p in paths]
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"].flatten(0, -4)


def _by_name(paths: dict[int, Path]) -> dict[str, Path]:
    return {f"{image_id}.png": path for image_id, path in paths.items()}


def held_out_questions(count: int) -> tuple[list[Record], dict[str, Path]]:
    """A fixed seeded sample of `count` easy-vqa test questions (in split order) and their image paths."""
    test, paths = easy_vqa_records("test")
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(EVAL_SEED))[:count]
    return [test[i] for i in sorted(order.tolist())], _by_name(paths)


def _images_by_id(records: list[Record]) -> list[str]:
    return sorted({r.image for r in records}, key=lambda name: int(name.split(".")[0]))


def training_questions(records: list[Record], recipe: DemoRecipe, generator: torch.Generator) -> tuple[list[str], list[Record]]:
    """(image names in id order, their questions) after the recipe's image and question caps."""
    names = _images_by_id(records)[: recipe.max_train_images]
    kept = set(names)
    questions = [r for r in records if r.image in kept]
    if recipe.max_train_questions is not None and recipe.max_train_questions < len(questions):
        keep = torch.randperm(len(questions), generator=generator)[: recipe.max_train_questions]
        questions = [questions[i] for i in sorted(keep.tolist())]
    return names, questions


def fit_vlm(model: nn.Module, processor: Any, parts: VisionLanguageParts, plan: DemoRecipe, seed: int,
            start: float, deadline: float) -> dict:
    """Train `model` in both phases on easy-vqa train and measure its held-out accuracy: the summary's figures.

    `start` is when the caller began (building counts as training time); training stops at `deadline`.
    """
    generator = torch.Generator().manual_seed(seed)
    records, paths = easy_vqa_records("train")
    names, train = training_questions(records, plan, generator)
    attributes = image_attributes(records)
    image_paths = _by_name(paths)
    vision_names = _images_by_id(records)[: plan.max_vision_images] if plan.max_vision_images else names
    vision_pixels = _load_pixels(processor, [image_paths[name] for name in vision_names])
    summary = pretrain_vision(model, vision_pixels, torch.tensor([attributes[n] for n in vision_names]), plan, generator, deadline, parts)
    vision_seconds = time.monotonic() - start
    if names == vision_names[: len(names)]:
        pixels = vision_pixels[: len(names)]
    else:
        pixels = _load_pixels(processor, [image_paths[name] for name in names])
    with torch.no_grad():
        features = torch.cat([parts.patch_features(model, chunk) for chunk in pixels.split(256)])
    index = {name: i for i, name in enumerate(names)}
    question_image = torch.tensor([index[r.image] for r in train])
    prompts = prompt_batch(processor, train, parts.family)
    summary |= train_language(model, prompts, features, question_image, plan, generator, deadline, parts)
    train_seconds = time.monotonic() - start
    held_out, held_out_paths = held_out_questions(plan.eval_questions)
    accuracy = answer_accuracy(generated_answers(model, processor, held_out, held_out_paths, family=parts.family), held_out)
    cut = summary["vision_steps"] < summary["vision_steps_planned"] or summary["lm_steps"] < summary["lm_steps_planned"]
    if cut:
        log.warning("training hit the time limit: the model is undertrained and not reproducible")
    log.info("%s model: trained in %.1f s, held-out accuracy %.3f", parts.family, train_seconds, accuracy)
    return summary | {
        "train_seconds": round(train_seconds, 1),
        "vision_seconds": round(vision_seconds, 1),
        "eval_seconds": round(time.monotonic() - start - train_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "cut_by_time_limit": cut,
        "train_images": len(names),
        "vision_images": len(vision_names),
        "train_questions": len(train),
        "held_out_questions": len(held_out),
        "held_out_accuracy": accuracy,
        "recipe": asdict(plan),
    }


def fit_demo_model(seed: int = 0, max_minutes: float = 5.0, **recipe) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, dict]:
    """Build and train the demo VLM and measure its held-out accuracy: (model, processor, summary).

    `recipe` overrides `DemoRecipe` and `DemoSizes` fields. Training stops at `max_minutes` of wall
    time (`cut_by_time_limit` in the summary); otherwise, on one torch thread (the caller sets it: the
    CLI's --threads), it is bit-reproducible given `seed`. With 2 threads the language phase is not (three
    runs on 2026-11-29 gave three different models), so the workflow trains on one thread.
    """
    plan, sizes = split_overrides(recipe)
    start = time.monotonic()
    records, _ = easy_vqa_records("train")
    processor = build_demo_processor(records)
    model = build_demo_model(processor, seed, **sizes)
    summary = fit_vlm(model, processor, LLAVA, plan, seed, start, start + 60.0 * max_minutes)
    return model, processor, provenance("demo_model", {"max_minutes": max_minutes, "recipe": asdict(plan)}, seed) | summary | {
        "sizes": asdict(DemoSizes.from_overrides(**sizes)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_tokens": image_token_count(processor),
    }


def save_demo_model(out_dir: Path, model: LlavaForConditionalGeneration, processor: LlavaProcessor, summary: dict) -> Path:
    """Save model, processor and the training summary (`manifest.json`, with every file's digest) into `out_dir`,
    atomically (temporary sibling, rename)."""
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / SUMMARY, summary)
    return Path(out_dir)


def train_demo_model(out_dir: Path, seed: int = 0, max_minutes: float = 5.0, **recipe) -> dict:
    """Build, train, evaluate and save the demo VLM with its processor into `out_dir`; return the summary."""
    model, processor, summary = fit_demo_model(seed, max_minutes, **recipe)
    save_demo_model(out_dir, model, processor, summary)
    return summary
