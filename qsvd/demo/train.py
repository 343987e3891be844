"""Train the demo VLM on the easy-vqa train split, deterministically, in a few CPU minutes.

Two phases: (1) the vision tower learns the shape and colour of each image (labels read off the
training questions' answers), since joint training from scratch plateaus at question-only guessing;
(2) the whole VLM learns to answer, with answer-only cross-entropy (labels unshifted).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from qsvd.artefacts import atomic_directory, provenance, write_json
from qsvd.data.easy_vqa import easy_vqa_records
from qsvd.data.records import Record
from qsvd.demo.build import DemoSizes, build_demo_model, build_demo_processor
from qsvd.models.prompts import IGNORE_INDEX, chat_prompt
from qsvd.models.registry import family_by_name

log = logging.getLogger(__name__)
SHAPES = ("circle", "rectangle", "triangle")
COLOURS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
HELD_OUT_QUESTIONS = 500


@dataclass(frozen=True)
class Recipe:
    vision_epochs: int = 12
    vision_lr: float = 2e-3
    vlm_epochs: float = 1.0
    vlm_lr: float = 2e-3
    vlm_vision_lr: float = 2e-4
    batch_size: int = 64
    weight_decay: float = 0.01
    max_train_questions: int | None = None
    max_train_images: int | None = None


def image_labels(records: list[Record]) -> dict[str, tuple[int, int]]:
    """(shape, colour) per image, read off the answers and wording of the questions about it."""
    shape: dict[str, int] = {}
    colour: dict[str, int] = {}
    for r in records:
        words = r.question.replace("?", " ").split()
        named_shapes = [SHAPES.index(w) for w in words if w in SHAPES]
        named_colours = [COLOURS.index(w) for w in words if w in COLOURS]
        if r.answer in SHAPES:
            shape[r.image] = SHAPES.index(r.answer)
            colour.update({r.image: c for c in named_colours})
        elif r.answer in COLOURS:
            colour[r.image] = COLOURS.index(r.answer)
        elif r.answer in ("yes", "no"):
            # "is there a red shape?" yes / "is there not a circle?" no: the named property is present
            present = (r.answer == "yes") != ("not" in words or "no" in words)
            if present:
                shape.update({r.image: s for s in named_shapes})
                colour.update({r.image: c for c in named_colours})
    return {image: (shape[image], colour[image]) for image in shape if image in colour}


def _pixel_values(processor, image_paths: dict[str, Path]) -> dict[str, torch.Tensor]:
    names = sorted(image_paths)
    images = [Image.open(image_paths[n]).convert("RGB") for n in names]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    return dict(zip(names, pixels))


def _sequences(processor, records: list[Record]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and answer-only labels of prompt + answer + eos."""
    tokenizer = processor.tokenizer
    family = family_by_name("llava")
    size = processor.image_processor.crop_size["height"]
    image_tokens = (size // processor.patch_size) ** 2 + processor.num_additional_image_tokens - 1
    # The template is the same for every question: render it once around a marker.
    marker = "\x00"
    prefix, suffix = chat_prompt(processor, family, marker).replace("<image>", "<image>" * image_tokens).split(marker)
    prompts = [prefix + r.question + suffix for r in records]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer([" " + r.answer for r in records], add_special_tokens=False)["input_ids"]
    length = max(len(p) + len(a) + 1 for p, a in zip(prompt_ids, answer_ids))
    ids = torch.full((len(records), length), tokenizer.pad_token_id)
    labels = torch.full((len(records), length), IGNORE_INDEX)
    mask = torch.zeros((len(records), length), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompt_ids, answer_ids)):
        full = p + a + [tokenizer.eos_token_id]
        ids[i, : len(full)] = torch.tensor(full)
        labels[i, len(p) : len(full)] = torch.tensor(a + [tokenizer.eos_token_id])
        mask[i, : len(full)] = 1
    return ids, mask, labels


def _optimizer(groups, total_steps: int, weight_decay: float):
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    warmup = max(1, total_steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def pretrain_vision(model, pixels: torch.Tensor, labels: torch.Tensor, recipe: Recipe, generator: torch.Generator, deadline: float) -> int:
    """Phase 1: shape and colour classification heads on mean-pooled patch features."""
    tower = model.model.vision_tower
    hidden = tower.config.hidden_size
    heads = nn.ModuleList([nn.Linear(hidden, len(SHAPES)), nn.Linear(hidden, len(COLOURS))])
    steps_per_epoch = math.ceil(len(pixels) / recipe.batch_size)
    total = steps_per_epoch * recipe.vision_epochs
    optimizer, scheduler = _optimizer([{"params": list(tower.parameters()) + list(heads.parameters()), "lr": recipe.vision_lr}], total, recipe.weight_decay)
    step = 0
    for _ in range(recipe.vision_epochs):
        for batch in torch.randperm(len(pixels), generator=generator).split(recipe.batch_size):
            if time.monotonic() > deadline:
                return step
            features = tower(pixel_values=pixels[batch]).last_hidden_state[:, 1:].mean(1)
            loss = sum(nn.functional.cross_entropy(head(features), labels[batch, i]) for i, head in enumerate(heads))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
    log.info("vision pre-training: %d steps, last loss %.4f", step, loss.item())
    return step


def train_vlm(model, pixels: dict[str, torch.Tensor], records: list[Record], sequences, recipe: Recipe, generator: torch.Generator, deadline: float) -> int:
    """Phase 2: answer-only next-token loss through the model's own forward (labels unshifted)."""
    ids, mask, labels = sequences
    total = int(math.ceil(len(records) / recipe.batch_size) * recipe.vlm_epochs)
    vision = list(model.model.vision_tower.parameters())
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    optimizer, scheduler = _optimizer([{"params": rest, "lr": recipe.vlm_lr}, {"params": vision, "lr": recipe.vlm_vision_lr}], total, recipe.weight_decay)
    step = 0
    model.train()
    while step < total:
        for batch in torch.randperm(len(records), generator=generator).split(recipe.batch_size):
            if step >= total or time.monotonic() > deadline:
                model.eval()
                return step
            width = int(mask[batch].sum(1).max())
            out = model(
                input_ids=ids[batch, :width],
                attention_mask=mask[batch, :width],
                pixel_values=torch.stack([pixels[records[i].image] for i in batch.tolist()]),
                labels=labels[batch, :width],
            )
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % 100 == 0:
                log.info("VLM step %d/%d loss %.4f", step, total, out.loss.item())
    model.eval()
    return step


@torch.no_grad()
def first_token_accuracy(model, processor, pixels: dict[str, torch.Tensor], records: list[Record]) -> float:
    """Share of questions whose greedy first answer token is the answer (answers are one token)."""
    ids, mask, labels = _sequences(processor, records)
    correct = 0
    for batch in torch.arange(len(records)).split(128):
        logits = model(input_ids=ids[batch], attention_mask=mask[batch], pixel_values=torch.stack([pixels[records[i].image] for i in batch.tolist()])).logits
        first = (labels[batch] != IGNORE_INDEX).int().argmax(1)
        rows = torch.arange(len(batch))
        correct += int((logits[rows, first - 1].argmax(-1) == labels[batch][rows, first]).sum())
    return correct / len(records)


def train_demo_model(out_dir: Path, seed: int = 0, max_minutes: float = 5.0, **recipe_overrides) -> dict:
    """Build, train and save (atomically) the demo VLM with its processor; return a training summary."""
    known = {f.name for f in fields(Recipe)}
    unknown = sorted(set(recipe_overrides) - known)
    if unknown:
        raise ValueError(f"unknown demo.recipe key {unknown[0]!r}; known keys: {sorted(known)}")
    recipe = Recipe(**recipe_overrides)
    start = time.monotonic()
    deadline = start + 60 * max_minutes
    generator = torch.Generator().manual_seed(seed)
    train, train_paths = easy_vqa_records("train")
    test, test_paths = easy_vqa_records("test")
    labels_by_image = image_labels(train)
    images = sorted(labels_by_image, key=lambda name: int(name.split(".")[0]))[: recipe.max_train_images]
    keep = set(images)
    train = [r for r in train if r.image in keep]
    if recipe.max_train_questions is not None:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: recipe.max_train_questions]
        train = [train[i] for i in sorted(order.tolist())]
    held_out = test[:HELD_OUT_QUESTIONS]

    processor = build_demo_processor(train)
    model = build_demo_model(processor, seed)
    train_pixels = _pixel_values(processor, {name: train_paths[int(name.split(".")[0])] for name in images})
    vision_labels = torch.tensor([labels_by_image[name] for name in images])
    vision_steps = pretrain_vision(model, torch.stack([train_pixels[n] for n in images]), vision_labels, recipe, generator, deadline)
    vlm_steps = train_vlm(model, train_pixels, train, _sequences(processor, train), recipe, generator, deadline)
    train_seconds = time.monotonic() - start
    test_pixels = _pixel_values(processor, {r.image: test_paths[int(r.image.split(".")[0])] for r in held_out})
    accuracy = first_token_accuracy(model, processor, test_pixels, held_out)
    summary = provenance("demo_model", {"seed": seed, "max_minutes": max_minutes, "recipe": asdict(recipe)}, seed)
    summary.update(
        train_seconds=round(train_seconds, 1),
        cut_by_time_limit=time.monotonic() > deadline,
        vision_steps=vision_steps,
        vlm_steps=vlm_steps,
        train_questions=len(train),
        train_images=len(images),
        held_out_questions=len(held_out),
        held_out_first_token_accuracy=accuracy,
        sizes=model.config.qsvd_demo_sizes,
        parameters=sum(p.numel() for p in model.parameters()),
    )
    log.info("demo model: %.1f s, held-out first-token accuracy %.3f", train_seconds, accuracy)
    _save(model, processor, summary, Path(out_dir))
    return summary


def _save(model, processor, summary: dict, out_dir: Path) -> None:
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        write_json(tmp / "training_summary.json", summary)
