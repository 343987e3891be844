import json

import datasets
import pytest
from PIL import Image

from qsvd.data.materialise import materialise_dataset, seeded_subset
from qsvd.data.records import read_records

pytestmark = pytest.mark.unit

SCIENCEQA_FEATURES = datasets.Features(
    {
        "image": datasets.Image(),
        "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("int64"),
        "hint": datasets.Value("string"),
        "subject": datasets.Value("string"),
        "lecture": datasets.Value("string"),
    }
)


def scienceqa_rows() -> datasets.Dataset:
    """Four rows in derek-thomas/ScienceQA's schema; row 1 has no image (not in the IMG subset)."""
    red, blue = Image.new("RGB", (8, 6), "red"), Image.new("RGBA", (5, 5), (0, 0, 255, 128))
    rows = {
        "image": [red, None, blue, red],
        "question": ["Which is red?", "Text only?", "Which is a fish?", "Which is hot?"],
        "choices": [["apple", "sky"], ["x", "y"], ["cat", "trout", "owl"], ["ice", "fire"]],
        "answer": [0, 1, 1, 1],
        "hint": ["", "", "Fish live in water.", ""],
        "subject": ["natural science"] * 4,
        "lecture": [""] * 4,
    }
    return datasets.Dataset.from_dict(rows, features=SCIENCEQA_FEATURES)


def _vizwiz_rows() -> datasets.Dataset:
    """Two rows in lmms-lab/VizWiz-VQA's schema (val: ten answers each)."""
    rows = {
        "question_id": ["VizWiz_val_00000000.jpg", "VizWiz_val_00000001.jpg"],
        "image": [Image.new("RGB", (9, 7), "green"), Image.new("L", (4, 4), 200)],
        "question": ["What is this?", "What colour is the shirt?"],
        "answers": [["unanswerable"] * 6 + ["soup"] * 4, ["blue"] * 3 + ["navy"] * 3 + ["dark blue"] * 4],
        "category": ["unanswerable", "other"],
    }
    return datasets.Dataset.from_dict(rows)


SEEDBENCH_FEATURES = datasets.Features(
    {
        "answer": datasets.Value("string"),
        "choice_a": datasets.Value("string"),
        "choice_b": datasets.Value("string"),
        "choice_c": datasets.Value("string"),
        "choice_d": datasets.Value("string"),
        "data_id": datasets.Value("string"),
        "data_type": datasets.Value("string"),
        "question": datasets.Value("string"),
        "question_id": datasets.Value("string"),
        "question_type_id": datasets.Value("int16"),
        "image": datasets.Sequence(datasets.Image()),
        "segment": datasets.Sequence(datasets.Value("int64")),
    }
)


def seedbench_rows() -> datasets.Dataset:
    """Four rows in lmms-lab/SEED-Bench's schema: three image questions and one video question (three frames)."""
    frame = Image.new("RGB", (6, 4), "white")
    rows = {
        "answer": ["B", "A", "D", "D"],
        "choice_a": ["a cat", "red", "one", "opens a door"],
        "choice_b": ["a dog", "blue", "two", "closes a door"],
        "choice_c": ["a fish", "green", "three", "sits down"],
        "choice_d": ["a bird", "black", "four", "waves"],
        "data_id": ["1.jpg", "2.jpg", "3.jpg", "v1.mp4"],
        "data_type": ["image", "image", "image", "video"],
        "question": ["Which animal is shown?", "What colour is the car?", "How many cups are there?", "What does the man do?"],
        "question_id": ["101", "102", "103", "9001"],
        "question_type_id": [1, 2, 3, 10],
        "image": [[Image.new("RGB", (8, 6), "brown")], [Image.new("RGB", (5, 5), "blue")], [Image.new("L", (7, 3), 90)], [frame] * 3],
        "segment": [[], [], [], [0, 40]],
    }
    return datasets.Dataset.from_dict(rows, features=SEEDBENCH_FEATURES)


def test_seeded_subset_is_deterministic_sorted_and_seed_dependent():
    a, b = seeded_subset(100, 10, 3, "x"), seeded_subset(100, 10, 3, "x")
    assert a == b == sorted(a) and len(set(a)) == 10
    assert seeded_subset(100, 10, 4, "x") != a
    assert seeded_subset(5, None, 0, "x") == [0, 1, 2, 3, 4]


def test_easy_vqa_subset_is_deterministic_and_complete(tmp_path):
    manifest = materialise_dataset("easy-vqa", "test", 12, 3, tmp_path / "a")
    materialise_dataset("easy-vqa", "test", 12, 3, tmp_path / "b")
    records = read_records(tmp_path / "a")
    assert len(records) == 12 and {r.task for r in records} == {"easy-vqa"}
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()
    for record in records:
        assert record.image.startswith("images/") and record.load_image(tmp_path / "a").size == (64, 64)
        assert record.answers == [record.answer]
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    integrity = ("files", "content_sha256")  # what the artefact door adds: file records, the JSON's own digest
    assert {k: v for k, v in on_disk.items() if k not in integrity} == json.loads(json.dumps(manifest))
    assert on_disk["stage"] == "data" and on_disk["seed"] == 3 and on_disk["task"] == "easy-vqa"
    assert on_disk["config"] == {"dataset": "easy-vqa", "split": "test", "num_samples": 12, "seed": 3, "local_dir": None}
    assert on_disk["samples"] == 12 and on_disk["available"] == 9673 and on_disk["images"] == len(list((tmp_path / "a" / "images").iterdir()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary directory left behind
    other_seed = materialise_dataset("easy-vqa", "test", 12, 4, tmp_path / "c")
    assert [r.id for r in read_records(tmp_path / "c")] != [r.id for r in records] and other_seed["seed"] == 4


def test_rerun_replaces_the_output_and_removes_a_stale_temporary(tmp_path):
    stale = tmp_path / ".out.abcd_123"
    stale.mkdir()
    (stale / "samples.jsonl").write_text("half written")
    materialise_dataset("easy-vqa", "test", 3, 0, tmp_path / "out")
    materialise_dataset("easy-vqa", "test", 2, 0, tmp_path / "out")
    assert len(read_records(tmp_path / "out")) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def _local_copy(local, layout: str, splits: dict, snapshot_only: dict | None = None) -> None:
    """A local copy of a hub dataset: datasets' save_to_disk of `splits`, or the hub repository's own layout (one
    parquet file per split, with the extra `snapshot_only` splits)."""
    if layout == "save_to_disk":
        datasets.DatasetDict(splits).save_to_disk(str(local))
        return
    (local / "data").mkdir(parents=True)
    for split, rows in {**splits, **(snapshot_only or {})}.items():
        rows.to_parquet(str(local / "data" / f"{split}-00000-of-00001.parquet"))


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet_snapshot"])
def test_scienceqa_from_local_directory_keeps_only_image_questions(tmp_path, layout):
    local = tmp_path / "sqa"
    _local_copy(local, layout, {"test": scienceqa_rows()}, {"train": scienceqa_rows().select([0])})
    manifest = materialise_dataset("scienceqa-img", "test", None, 0, tmp_path / "out", local)
    records = read_records(tmp_path / "out")
    assert manifest["available"] == 3 and manifest["samples"] == 3 and manifest["source"] == str(local)
    assert [r.id for r in records] == ["test-0", "test-2", "test-3"]
    assert [r.answer for r in records] == ["A", "B", "B"] and [r.answers for r in records] == [["A"], ["B"], ["B"]]
    assert records[1].choices == ["cat", "trout", "owl"]
    assert records[1].question == (
        "Context: Fish live in water.\nWhich is a fish?\nA. cat\nB. trout\nC. owl\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert records[0].question.startswith("Which is red?\nA. apple\nB. sky\n")
    assert records[0].load_image(tmp_path / "out").size == (8, 6)
    assert Image.open(tmp_path / "out" / records[1].image).mode == "RGBA"  # stored losslessly
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sqa"]  # no cache or temporary left behind


def test_scienceqa_subset_is_drawn_among_image_questions(tmp_path):
    datasets.DatasetDict({"train": scienceqa_rows()}).save_to_disk(str(tmp_path / "sqa"))
    materialise_dataset("scienceqa-img", "train", 2, 5, tmp_path / "a", tmp_path / "sqa")
    materialise_dataset("scienceqa-img", "train", 2, 5, tmp_path / "b", tmp_path / "sqa")
    ids = [r.id for r in read_records(tmp_path / "a")]
    assert ids == [r.id for r in read_records(tmp_path / "b")]
    assert len(ids) == 2 and "train-1" not in ids
    with pytest.raises(ValueError, match="num_samples=4 but only 3"):
        materialise_dataset("scienceqa-img", "train", 4, 5, tmp_path / "c", tmp_path / "sqa")
    with pytest.raises(ValueError, match=r"splits \['train'\], not 'test' \(key: split\)"):
        materialise_dataset("scienceqa-img", "test", 1, 5, tmp_path / "c", tmp_path / "sqa")


@pytest.mark.parametrize("layout", ["save_to_disk", "parquet_snapshot"])
def test_seedbench_from_local_directory_keeps_only_image_questions(tmp_path, layout):
    local = tmp_path / "seed"
    _local_copy(local, layout, {"test": seedbench_rows()})
    manifest = materialise_dataset("seedbench-img", "test", None, 0, tmp_path / "out", local)
    records = read_records(tmp_path / "out")
    assert manifest["available"] == 3 and manifest["samples"] == 3 and manifest["task"] == "seedbench-img"
    assert [r.id for r in records] == ["101", "102", "103"] and {r.task for r in records} == {"seedbench-img"}
    assert [r.answer for r in records] == ["B", "A", "D"] and [r.answers for r in records] == [["B"], ["A"], ["D"]]
    assert records[0].choices == ["a cat", "a dog", "a fish", "a bird"]
    assert records[0].question == (  # lmms-eval's seedbench prompt
        "Which animal is shown?\nA. a cat\nB. a dog\nC. a fish\nD. a bird\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert [r.load_image(tmp_path / "out").size for r in records] == [(8, 6), (5, 5), (7, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "seed"]
    materialise_dataset("seedbench-img", "test", 2, 1, tmp_path / "two", local)
    assert len(read_records(tmp_path / "two")) == 2
    with pytest.raises(ValueError, match="num_samples=4 but only 3"):  # the video question is not one of them
        materialise_dataset("seedbench-img", "test", 4, 0, tmp_path / "four", local)


def test_seedbench_refuses_a_bad_answer_or_an_image_question_without_one_image(tmp_path):
    bad = seedbench_rows().select([0]).map(lambda row: {"answer": "E"})
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="answer 'E' is not one of the letters A, B, C, D"):
        materialise_dataset("seedbench-img", "test", None, 0, tmp_path / "x", tmp_path / "bad")
    frames = seedbench_rows().select([3]).map(lambda row: {"data_type": "image"})
    frames.save_to_disk(str(tmp_path / "frames"))
    with pytest.raises(ValueError, match="question 9001 has 3 images, not one"):
        materialise_dataset("seedbench-img", "test", None, 0, tmp_path / "x", tmp_path / "frames")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "frames"]


def test_vizwiz_from_local_directory_keeps_ten_answers(tmp_path):
    _vizwiz_rows().save_to_disk(str(tmp_path / "viz"))  # a single Dataset is taken as the split
    manifest = materialise_dataset("vizwiz", "val", None, 0, tmp_path / "out", tmp_path / "viz")
    first, second = read_records(tmp_path / "out")
    assert manifest["samples"] == 2 and manifest["task"] == "vizwiz"
    assert first.id == "VizWiz_val_00000000.jpg" and first.task == "vizwiz"
    assert first.answer == "unanswerable" and len(first.answers) == 10 and first.answers.count("soup") == 4
    assert second.answer == "dark blue"
    assert first.question.startswith("What is this?\nWhen the provided information is insufficient")
    assert second.load_image(tmp_path / "out").size == (4, 4)


def test_vizwiz_from_parquet_snapshot_and_missing_answers(tmp_path):
    (tmp_path / "viz" / "data").mkdir(parents=True)
    _vizwiz_rows().to_parquet(str(tmp_path / "viz" / "data" / "val-00000-of-00001.parquet"))
    test_rows = _vizwiz_rows().map(lambda row: {"answers": []})
    test_rows.to_parquet(str(tmp_path / "viz" / "data" / "test-00000-of-00001.parquet"))
    materialise_dataset("vizwiz", "val", 1, 0, tmp_path / "out", tmp_path / "viz")
    assert len(read_records(tmp_path / "out")) == 1
    with pytest.raises(ValueError, match="no reference answers.*split: val"):
        materialise_dataset("vizwiz", "test", None, 0, tmp_path / "test", tmp_path / "viz")
    with pytest.raises(ValueError, match="cannot load split 'train' \\(key: split\\)"):
        materialise_dataset("vizwiz", "train", None, 0, tmp_path / "train", tmp_path / "viz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "viz"]


def test_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'coco' \\(key: dataset\\).*easy-vqa, scienceqa-img, seedbench-img, vizwiz"):
        materialise_dataset("coco", "test", 1, 0, tmp_path / "x")
    with pytest.raises(ValueError, match="num_samples=99999 but only 9673 .*key: num_samples"):
        materialise_dataset("easy-vqa", "test", 99999, 0, tmp_path / "x")
    with pytest.raises(ValueError, match="num_samples=0"):
        materialise_dataset("easy-vqa", "test", 0, 0, tmp_path / "x")
    with pytest.raises(ValueError, match="split 'dev' does not exist"):
        materialise_dataset("easy-vqa", "dev", 1, 0, tmp_path / "x")
    with pytest.raises(ValueError, match="key: local_dir"):
        materialise_dataset("easy-vqa", "test", 1, 0, tmp_path / "x", tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'missing'}.*key: local_dir"):
        materialise_dataset("vizwiz", "val", 1, 0, tmp_path / "x", tmp_path / "missing")
    assert list(tmp_path.iterdir()) == []  # failed runs leave nothing behind


@pytest.mark.parametrize("dataset, hub_id", [("vizwiz", "lmms-lab/VizWiz-VQA"), ("scienceqa-img", "derek-thomas/ScienceQA"),
                                             ("seedbench-img", "lmms-lab/SEED-Bench")])
def test_unreachable_hub_fails_fast_and_suggests_local_dir(tmp_path, dataset, hub_id):
    with pytest.raises(RuntimeError, match=f"{hub_id}.*offline or unreachable.*local_dir"):
        materialise_dataset(dataset, "val", 1, 0, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []
