"""ScienceQA-IMG: multiple-choice science questions that come with an image.

Rows follow the hub dataset `derek-thomas/ScienceQA`: image (None for text-only questions),
question, choices (option strings), answer (index of the correct option), hint (the context),
plus metadata columns that are not used here.
"""

from __future__ import annotations

from qsvd.data.records import OPTION_LETTERS, Record

TASK = "scienceqa-img"
HUB_ID = "derek-thomas/ScienceQA"
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def scienceqa_question(question: str, choices: list[str], hint: str | None) -> str:
    """Context (the hint), question, lettered options and the instruction, as LLaVA's ScienceQA prompt."""
    context = f"Context: {hint.strip()}\n" if hint and hint.strip() else ""
    options = "\n".join(f"{OPTION_LETTERS[i]}. {choice}" for i, choice in enumerate(choices))
    return f"{context}{question.strip()}\n{options}\n{INSTRUCTION}"


def scienceqa_record(row: dict, index: int, split: str, image: str) -> Record:
    """One hub row as a Record: answer and answers are the correct option's letter."""
    choices = [str(c) for c in row["choices"]]
    answer = row["answer"]
    if not 1 <= len(choices) <= len(OPTION_LETTERS):
        raise ValueError(f"ScienceQA {split} row {index} has {len(choices)} choices; at most {len(OPTION_LETTERS)} can be lettered")
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise ValueError(f"ScienceQA {split} row {index}: answer {answer!r} is not an index into its {len(choices)} choices")
    letter = OPTION_LETTERS[answer]
    return Record(
        id=f"{split}-{index}",
        task=TASK,
        question=scienceqa_question(row["question"], choices, row.get("hint")),
        answer=letter,
        answers=[letter],
        choices=choices,
        image=image,
    )
