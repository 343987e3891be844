"""easy-vqa (PyPI `easy-vqa`): 64x64 shape images, yes/no, colour and shape questions."""

from __future__ import annotations

from pathlib import Path

from qsvd.data.records import Record

TASK = "easy-vqa"
SPLITS = ("train", "test")


def easy_vqa_records(split: str) -> tuple[list[Record], dict[int, Path]]:
    """All questions of a split, with absolute image paths by image id.

    The `image` field of each record is the file name `<id>.png`, relative to wherever the
    caller copies the images.
    """
    import easy_vqa

    if split not in SPLITS:
        raise ValueError(f"easy-vqa split {split!r} does not exist; use one of {SPLITS}")
    if split == "train":
        questions, answers, image_ids = easy_vqa.get_train_questions()
        image_paths = easy_vqa.get_train_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_test_questions()
        image_paths = easy_vqa.get_test_image_paths()
    records = [
        Record(
            id=f"{split}-{i}",
            task=TASK,
            question=q,
            answer=a,
            answers=[a],
            image=f"{image_id}.png",
        )
        for i, (q, a, image_id) in enumerate(zip(questions, answers, image_ids))
    ]
    return records, {int(k): Path(v) for k, v in image_paths.items()}


def easy_vqa_answers() -> list[str]:
    import easy_vqa

    return list(easy_vqa.get_answers())
