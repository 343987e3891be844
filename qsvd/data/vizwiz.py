"""VizWiz-VQA: photos taken by blind people, ten human answers per question (val split).

Rows follow the hub dataset `lmms-lab/VizWiz-VQA`: question_id, image, question, answers (ten
strings; the original VizWiz JSON's {"answer", "answer_confidence"} dicts are accepted too),
category. Its test split has no answers (scored by the VizWiz server): score locally on val.
"""

from __future__ import annotations

import collections

from qsvd.data.records import Record

TASK = "vizwiz"
HUB_ID = "lmms-lab/VizWiz-VQA"
INSTRUCTION = "When the provided information is insufficient, respond with 'Unanswerable'.\nAnswer the question using a single word or phrase."


def vizwiz_record(row: dict, index: int, split: str, image: str) -> Record:
    """One hub row as a Record: `answers` the human answers, `answer` the most common one (first on ties)."""
    answers = [a["answer"] if isinstance(a, dict) else str(a) for a in row.get("answers") or []]
    if not answers:
        raise ValueError(f"VizWiz {split} row {index} has no reference answers; only the val split can be scored locally (split: val)")
    most_common = collections.Counter(answers).most_common(1)[0][0]
    question_id = row.get("question_id")
    return Record(
        id=str(question_id) if question_id is not None else f"{split}-{index}",
        task=TASK,
        question=f"{row['question'].strip()}\n{INSTRUCTION}",
        answer=most_common,
        answers=answers,
        image=image,
    )
