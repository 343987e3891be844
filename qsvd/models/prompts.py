"""One prompt path for every family: the processor's own chat template, image first, then the question."""

from __future__ import annotations

from typing import Any

import torch
from PIL.Image import Image
from transformers import BatchFeature

from qsvd.models.registry import ModelFamily

IGNORE_INDEX = -100
PLAIN_TEXT_PROMPT = "Question: {question}\nAnswer:"


def tokenizer_of(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def chat_prompt(processor: Any, family: ModelFamily, question: str) -> str:
    """The model's prompt text for one user turn, ending where the assistant's answer starts."""
    if family.multimodal:
        content = [{"type": "image"}, {"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False)
    tokenizer = tokenizer_of(processor)
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
    return PLAIN_TEXT_PROMPT.format(question=question)


def encode_prompt(processor: Any, family: ModelFamily, question: str, image: Image | None) -> BatchFeature:
    """A batch of one prompt, ready for `model(**batch)` or `model.generate(**batch)`."""
    text = chat_prompt(processor, family, question)
    if family.multimodal:
        if image is None:
            raise ValueError(f"family {family.name!r} needs an image for every sample")
        return processor(text=text, images=[image], return_tensors="pt")
    tokenizer = tokenizer_of(processor)
    return tokenizer(text, return_tensors="pt", add_special_tokens=not tokenizer.chat_template)


def encode_with_answer(processor: Any, family: ModelFamily, question: str, answer: str, image: Image | None) -> BatchFeature:
    """Prompt + answer + eos, with `labels` = -100 on every prompt token (unshifted: the model shifts)."""
    batch = encode_prompt(processor, family, question, image)
    tokenizer = tokenizer_of(processor)
    answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; set tokenizer.eos_token")
    answer_ids = torch.tensor([answer_ids + [tokenizer.eos_token_id]])
    prompt_ids = batch["input_ids"]
    for key, value in list(batch.items()):
        if isinstance(value, torch.Tensor) and value.shape == prompt_ids.shape and key != "input_ids":
            fill = 1 if key == "attention_mask" else 0
            batch[key] = torch.cat([value, torch.full_like(answer_ids, fill, dtype=value.dtype)], dim=1)
    batch["input_ids"] = torch.cat([prompt_ids, answer_ids], dim=1)
    batch["labels"] = torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids], dim=1)
    return batch


def decode_generated(processor: Any, generated_ids: torch.Tensor, prompt_length: int) -> str:
    """The new tokens of a generated sequence as text, special tokens dropped."""
    return tokenizer_of(processor).decode(generated_ids[0, prompt_length:], skip_special_tokens=True).strip()
