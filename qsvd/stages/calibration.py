"""Shared by the calibration stages: the calibration samples, encoded through the model's prompt path.

Question samples give the prompt (statistics) or prompt + answer with answer-only labels
(gradients); text-corpus passages give their first tokens, with labels on every token.

Samples are grouped `batch_size` at a time, each encoded exactly as alone and padded on the right
(FORWARD_PADDING): the model's default position ids 0..T-1 are then right for every real token, and
causal attention keeps real tokens from seeing the padding after them. Consumers of per-token
values must drop the padding themselves, by `attention_mask` (or by labels -100, which it carries).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import BatchFeature

from qsvd.data.records import Record, read_records
from qsvd.models.device import resolve_device
from qsvd.models.prompts import FORWARD_PADDING, encode_prompt, encode_text, encode_with_answer, pad_batch
from qsvd.models.registry import ModelFamily


def encode_record(processor: Any, family: ModelFamily, record: Record, data_dir: str | Path, with_answer: bool) -> BatchFeature:
    """One calibration sample as a batch of one: without labels (statistics) or with labels (gradients)."""
    if record.is_text:
        return encode_text(processor, record.question, with_labels=with_answer)
    image = record.load_image(data_dir) if family.multimodal else None
    if with_answer:
        return encode_with_answer(processor, family, record.question, record.answer, image)
    return encode_prompt(processor, family, record.question, image)


def calibration_batches(
    processor: Any,
    family: ModelFamily,
    data_dir: str | Path,
    with_answer: bool,
    limit: int | None = None,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Iterator[BatchFeature]:
    """The calibration samples, `batch_size` at a time (the last batch may be smaller), right-padded, on `device`.

    `dtype` (the model's) casts the floating-point inputs (pixel values); None keeps the processor's.
    With batch_size 1 every batch is one sample exactly as the processor encodes it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    records = read_records(data_dir)
    if limit is not None:
        records = records[:limit]
    target = resolve_device(device)
    for start in range(0, len(records), batch_size):
        samples = [encode_record(processor, family, r, data_dir, with_answer) for r in records[start : start + batch_size]]
        batch = pad_batch(samples, processor, FORWARD_PADDING)
        yield batch.to(device=target, dtype=dtype) if dtype is not None else batch.to(target)


def count_records(data_dir: str | Path) -> int:
    return len(read_records(data_dir))


def count_batches(data_dir: str | Path, batch_size: int = 1, limit: int | None = None) -> int:
    """How many batches `calibration_batches` yields (for progress bars)."""
    records = count_records(data_dir) if limit is None else min(limit, count_records(data_dir))
    return -(-records // batch_size)
