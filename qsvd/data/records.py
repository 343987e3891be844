"""The materialised dataset format shared by every stage.

A dataset directory holds `samples.jsonl` (one `Record` per line), an `images/` folder of PNG
files referenced by relative path (question datasets only), and a `manifest.json` with provenance.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from qsvd.artefacts import MANIFEST, atomic_write, read_json

SAMPLES = "samples.jsonl"
OPTION_LETTERS = "ABCDEFGHIJ"  # multiple-choice options are lettered A, B, C, ...
QUESTION = "question"  # Record.kind: a question with gold answers (accuracy tasks)
TEXT = "text"  # Record.kind: a passage of a text corpus in `question`, no answer (perplexity tasks)


@dataclass(frozen=True)
class Record:
    """One question (`answer` the canonical gold answer, `answers` every reference) or one text passage.

    A record of kind TEXT holds its passage in `question` and has an empty `answer`.
    """

    id: str
    task: str
    question: str
    answer: str
    answers: list[str] = field(default_factory=list)
    choices: list[str] | None = None
    image: str | None = None
    kind: str = QUESTION

    @property
    def is_text(self) -> bool:
        return self.kind == TEXT

    def load_image(self, root: str | Path) -> Image.Image | None:
        if self.image is None:
            return None
        return Image.open(Path(root) / self.image).convert("RGB")


def write_records(directory: str | Path, records: list[Record]) -> Path:
    """Write `samples.jsonl` atomically (images must already be in place)."""
    path = Path(directory) / SAMPLES
    lines = "".join(json.dumps(asdict(r)) + "\n" for r in records)
    atomic_write(path, lambda tmp: tmp.write_text(lines))
    return path


def read_records(directory: str | Path) -> list[Record]:
    """Read a materialised dataset directory."""
    path = Path(directory) / SAMPLES
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the data stage (qsvd data) first")
    if (Path(directory) / MANIFEST).is_file():
        read_json(Path(directory) / MANIFEST)  # checks the sizes and SHA-256 of every file the data stage wrote
    return [Record(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def dataset_manifest(directory: str | Path) -> dict:
    return read_json(Path(directory) / "manifest.json")
