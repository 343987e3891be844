"""Shared by the calibration stages: the calibration samples, encoded through the model's prompt path.

Question samples give the prompt (statistics) or prompt + answer with answer-only labels
(gradients); text-corpus passages give their first tokens, with labels on every token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import BatchFeature

from qsvd.data.records import read_records
from qsvd.models.prompts import encode_prompt, encode_text, encode_with_answer
from qsvd.models.registry import ModelFamily


def calibration_batches(
    processor: Any, family: ModelFamily, data_dir: str | Path, with_answer: bool, limit: int | None = None
) -> Iterator[BatchFeature]:
    """One encoded sample at a time: without labels (statistics) or with labels (gradients)."""
    records = read_records(data_dir)
    if limit is not None:
        records = records[:limit]
    for record in records:
        if record.is_text:
            yield encode_text(processor, record.question, with_labels=with_answer)
            continue
        image = record.load_image(data_dir) if family.multimodal else None
        if with_answer:
            yield encode_with_answer(processor, family, record.question, record.answer, image)
        else:
            yield encode_prompt(processor, family, record.question, image)


def count_records(data_dir: str | Path) -> int:
    return len(read_records(data_dir))
