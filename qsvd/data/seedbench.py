"""SEED-Bench-IMG: the image questions of SEED-Bench (v1), four options A-D, one gold letter.

Rows follow the hub dataset `lmms-lab/SEED-Bench` (one split, `test`): question_id, question, choice_a, choice_b,
choice_c, choice_d, answer (the gold letter "A".."D"), data_type ("image" or "video"), image (a list of images: one
for an image question, sampled frames for a video question), plus metadata columns that are not used here
(data_id, question_type_id, segment). SEED-Bench-IMG is the rows of data_type "image" (about 14K of the hub's 18K).
The prompt is lmms-eval's `seedbench` prompt, which is ScienceQA's without a context: the question, the lettered
options and the same instruction; answers are scored as ScienceQA's (qsvd.evaluation.answers).
"""

from __future__ import annotations

from typing import Any

from qsvd.data.records import OPTION_LETTERS, Record
from qsvd.data.scienceqa import scienceqa_question

TASK = "seedbench-img"
HUB_ID = "lmms-lab/SEED-Bench"
DATA_TYPE = "image"  # the value of data_type that SEED-Bench-IMG keeps
CHOICES = ("choice_a", "choice_b", "choice_c", "choice_d")


def seedbench_image(row: dict) -> Any:
    """The one image of an image question."""
    images = row.get("image") or []
    if not isinstance(images, list):  # a copy whose image column holds one image rather than a list
        images = [images]
    if len(images) != 1:
        raise ValueError(f"SEED-Bench question {row.get('question_id')} has {len(images)} images, not one: "
                         f"only rows of data_type {DATA_TYPE!r} belong to SEED-Bench-IMG")
    return images[0]


def seedbench_record(row: dict, index: int, split: str, image: str) -> Record:
    """One hub row as a Record: answer and answers are the gold letter, choices the four options."""
    choices = [str(row[column]) for column in CHOICES]
    answer = str(row["answer"]).strip()
    if answer not in OPTION_LETTERS[: len(choices)]:
        raise ValueError(f"SEED-Bench {split} row {index}: answer {row['answer']!r} is not one of the letters "
                         f"{', '.join(OPTION_LETTERS[: len(choices)])}")
    question_id = row.get("question_id")
    return Record(
        id=str(question_id) if question_id is not None else f"{split}-{index}",
        task=TASK,
        question=scienceqa_question(row["question"], choices, hint=None),
        answer=answer,
        answers=[answer],
        choices=choices,
        image=image,
    )
