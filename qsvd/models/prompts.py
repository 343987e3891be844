"""One prompt path for every family: the processor's own chat template, image first, then the question.

Multimodal families get a processor (tokenizer + image processor), text-only families a tokenizer.
Family quirks are data of the processor (LLaVA-NeXT's `image_sizes`, SmolVLM's image splitting
and `pixel_attention_mask`): whatever the processor returns is passed on unchanged.

Batches of several samples are samples encoded one by one, then padded together by `pad_batch`
as the processors pad a list: per-token tensors on one side (left for generation, right for
forward-only passes), image tensors with zeros.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL.Image import Image
from transformers import BatchFeature

from qsvd.models.registry import ModelFamily

IGNORE_INDEX = -100
PLAIN_TEXT_PROMPT = "Question: {question}\nAnswer:"
TEXT_TOKENS = 256  # tokens of a text-corpus passage used for calibration and perplexity
# Padding sides. generate() appends after the last column and derives position ids from the attention
# mask, so prompts to generate from are padded on the left. A plain forward takes position ids
# 0..T-1 whatever the mask (Llama-style LMs build them from cache_position), which are right for the
# real tokens only when padding comes after them: forward-only batches are padded on the right.
GENERATION_PADDING = "left"
FORWARD_PADDING = "right"


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer inside a processor (a tokenizer is its own)."""
    return getattr(processor, "tokenizer", processor)


def chat_prompt(processor: Any, family: ModelFamily, question: str) -> str:
    """The model's prompt text for one user turn, ending where the assistant's answer starts."""
    if family.multimodal:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    tokenizer = tokenizer_of(processor)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
    return PLAIN_TEXT_PROMPT.format(question=question)


def _template_adds_bos(tokenizer: Any, text: str) -> bool:
    return tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)


def encode_prompt(processor: Any, family: ModelFamily, question: str, image: Image | None) -> BatchFeature:
    """A batch of one prompt, ready for `model(**batch)` or `model.generate(**batch)`."""
    text = chat_prompt(processor, family, question)
    tokenizer = tokenizer_of(processor)
    if not family.multimodal:
        if image is not None:
            raise ValueError(f"family {family.name!r} is text-only: give no image")
        # A tokenizer's chat template writes its own special tokens; the plain prompt gets the tokenizer's.
        add_special_tokens = not tokenizer.chat_template
        return BatchFeature(dict(tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens)))
    if image is None:
        raise ValueError(f"family {family.name!r} needs an image for every prompt")
    if image.mode != "RGB":
        image = image.convert("RGB")
    # As the processor's own apply_chat_template(tokenize=True): no second BOS when the template wrote one.
    return processor(
        text=text, images=[image], return_tensors="pt", add_special_tokens=not _template_adds_bos(tokenizer, text)
    )


def answer_token_ids(tokenizer: Any, prompt_text: str, answer: str) -> list[int]:
    """Token ids of `answer` as the model would write it right after `prompt_text`.

    A space separates it from the prompt unless the prompt ends in whitespace (ChatML's
    "assistant\\n"). The ids are the tail of tokenizing prompt + answer, so SentencePiece-style
    tokenizers get "▁red", not "▁▁red"; if that tail is not a clean continuation, the answer is
    tokenized alone.
    """
    answer = answer.strip()
    if not answer:
        raise ValueError("the answer is empty; every calibration sample needs a non-empty answer")
    joined = ("" if prompt_text[-1:].isspace() else " ") + answer
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(prompt_text + joined, add_special_tokens=False)["input_ids"]
    if len(full_ids) > len(prompt_ids) and full_ids[: len(prompt_ids)] == prompt_ids:
        return full_ids[len(prompt_ids) :]
    return tokenizer(joined, add_special_tokens=False)["input_ids"]


def encode_with_answer(
    processor: Any, family: ModelFamily, question: str, answer: str, image: Image | None
) -> BatchFeature:
    """Prompt + answer + eos, with `labels`: -100 on every prompt token, the answer and eos after.

    Labels are unshifted: the model shifts them once itself. Every per-token tensor the processor
    returns (attention_mask, token_type_ids, ...) is extended over the answer; image tensors are
    passed on unchanged.
    """
    tokenizer = tokenizer_of(processor)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of family {family.name!r} has no eos token; set tokenizer.eos_token")
    batch = encode_prompt(processor, family, question, image)
    ids = answer_token_ids(tokenizer, chat_prompt(processor, family, question), answer) + [tokenizer.eos_token_id]
    prompt_ids = batch["input_ids"]
    answer_ids = torch.tensor([ids], dtype=prompt_ids.dtype)
    for key, value in list(batch.items()):
        if key != "input_ids" and isinstance(value, torch.Tensor) and value.shape == prompt_ids.shape:
            fill = 1 if key == "attention_mask" else 0
            batch[key] = torch.cat([value, torch.full(answer_ids.shape, fill, dtype=value.dtype)], dim=1)
    batch["input_ids"] = torch.cat([prompt_ids, answer_ids], dim=1)
    batch["labels"] = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids], dim=1)
    return batch


def encode_text(processor: Any, text: str, with_labels: bool, max_tokens: int = TEXT_TOKENS) -> BatchFeature:
    """A batch of one text passage, no chat template, cut to its first `max_tokens` tokens.

    With labels, `labels` equals `input_ids` (unshifted: the model shifts once), so the loss is
    next-token cross-entropy over every token of the passage.
    """
    tokenizer = tokenizer_of(processor)
    batch = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
    if batch["input_ids"].shape[1] < 2:
        raise ValueError(f"text passage {text[:40]!r} has fewer than 2 tokens: nothing to predict")
    batch = BatchFeature(dict(batch))
    if with_labels:
        batch["labels"] = batch["input_ids"].clone()
    return batch


def decode_generated(processor: Any, generated_ids: torch.Tensor, prompt_length: int) -> str:
    """The new tokens of a generated sequence (batch of one) as text, special tokens dropped."""
    if generated_ids.dim() == 2:
        if generated_ids.shape[0] != 1:
            raise ValueError(f"decode_generated takes a batch of one sequence, got {generated_ids.shape[0]}")
        generated_ids = generated_ids[0]
    return tokenizer_of(processor).decode(generated_ids[prompt_length:], skip_special_tokens=True).strip()


def _pad_token_id(processor: Any) -> int:
    tokenizer = tokenizer_of(processor)
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    raise ValueError(
        f"{type(tokenizer).__name__} has no pad token, needed to batch samples of different lengths: "
        "set tokenizer.pad_token (e.g. to its eos token) or use batch size 1"
    )


def _pad_to(value: torch.Tensor, shape: Sequence[int], fill: float | int | bool, left: bool) -> torch.Tensor:
    """`value` padded with `fill` up to `shape` (trailing dims padded at their end, the token dim on the left if `left`)."""
    pad: list[int] = []
    for dim in reversed(range(1, value.dim())):
        missing = shape[dim] - value.shape[dim]
        pad += [missing, 0] if left else [0, missing]
    return F.pad(value, pad, value=fill) if any(pad) else value


def pad_batch(samples: Sequence[BatchFeature], processor: Any, padding_side: str) -> BatchFeature:
    """Samples encoded one at a time (each a batch of one) as one batch, padded as the processors pad a list.

    Per-token tensors (those shaped like `input_ids`) are padded on `padding_side`: input_ids with
    the pad token, labels with -100, attention_mask and every other with 0. Per-sample tensors are
    stacked, zero-padded at the end of every dim: LLaVA-NeXT's image patches (the model keeps the
    first patches `image_sizes` asks for), Idefics3/SmolVLM's images and pixel_attention_mask (the
    model drops all-zero images). One sample comes back unchanged.
    """
    if padding_side not in (GENERATION_PADDING, FORWARD_PADDING):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not samples:
        raise ValueError("pad_batch takes at least one sample")
    if len(samples) == 1:
        return samples[0]
    keys = set(samples[0])
    if any(set(sample) != keys for sample in samples):
        raise ValueError(f"samples with different keys cannot share a batch: {[sorted(s) for s in samples]}")
    lengths = [sample["input_ids"].shape[1] for sample in samples]
    longest = max(lengths)
    left = padding_side == GENERATION_PADDING
    out = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        if not all(isinstance(v, torch.Tensor) for v in values) or any(v.shape[0] != 1 for v in values):
            raise ValueError(f"pad_batch takes tensors of batches of one; {key!r} is not")
        per_token = all(v.shape == (1, n) for v, n in zip(values, lengths))
        if per_token:
            fill = _pad_token_id(processor) if key == "input_ids" and len(set(lengths)) > 1 else 0
            fill = IGNORE_INDEX if key == "labels" else fill
            out[key] = torch.cat([_pad_to(v, (1, longest), fill, left) for v in values])
        else:
            shape = [max(v.shape[d] for v in values) for d in range(values[0].dim())]
            out[key] = torch.cat([_pad_to(v, shape, 0, left=False) for v in values])
    return BatchFeature(out)


def decode_generated_batch(
    processor: Any, generated_ids: torch.Tensor, prompt_length: int, stop_token_ids: Sequence[int] = ()
) -> list[str]:
    """The new tokens of every row of a batched generate() output, each as `decode_generated` gives it.

    A row that met a stop token (eos) before the others is filled with pad tokens after it: each row is
    cut after its first stop token, where the row would have ended had it been generated alone.
    """
    texts = []
    stops = set(stop_token_ids)
    for row in generated_ids:
        new = row[prompt_length:].tolist()
        end = next((i + 1 for i, token in enumerate(new) if token in stops), len(new))
        texts.append(tokenizer_of(processor).decode(new[:end], skip_special_tokens=True).strip())
    return texts
