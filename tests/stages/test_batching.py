"""Batched calibration and evaluation equal one sample at a time, on a tiny model of every family.

The samples differ in prompt length and (LLaVA-NeXT) in image aspect ratio, hence in image patch
count, so every batch of 3 pads tokens and, for LLaVA-NeXT, image patches.
"""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import BatchFeature

from qsvd.artefacts import read_artefact, read_json
from qsvd.data.records import TEXT, Record, write_records
from qsvd.evaluation.perplexity import sequence_nll, sequence_nlls
from qsvd.models.prompts import (
    FORWARD_PADDING,
    GENERATION_PADDING,
    IGNORE_INDEX,
    _template_adds_bos,
    chat_prompt,
    decode_generated,
    decode_generated_batch,
    encode_prompt,
    encode_text,
    pad_batch,
    tokenizer_of,
)
from qsvd.models.registry import family_by_name
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.calibration import calibration_batches, encode_record
from qsvd.stages.evaluate import run_evaluate

# Five questions of different lengths, (height, width) of their images: wide and tall images get
# LLaVA-NeXT 3 patches, square ones 2.
QUESTIONS = [
    ("what color is the shape?", "red", (64, 64)),
    ("is there a circle?", "yes", (48, 96)),
    ("what shape is in the image? describe the picture of the shape", "triangle", (80, 40)),
    ("how many", "no", (64, 64)),
    ("does the image contain a square? is there a blue square in this photo?", "blue", (40, 72)),
]
PASSAGES = [
    "what color is the shape? " * 2,
    "is there a circle in the image? yes there is a red circle and a blue square. " * 40,  # cut to TEXT_TOKENS
    "the picture",
    "describe the photo: a green triangle on a gray square, and a yellow circle. " * 3,
]
BATCH = 3  # 5 samples: a batch of 3 and a batch of 2, both padded


def _images():
    rng = np.random.default_rng(1)
    return [PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for _, _, (h, w) in QUESTIONS]


@pytest.fixture
def questions(tmp_path):
    directory = tmp_path / "questions"
    (directory / "images").mkdir(parents=True)
    records = []
    for i, ((question, answer, _), image) in enumerate(zip(QUESTIONS, _images())):
        image.save(directory / "images" / f"{i}.png")
        records.append(Record(id=str(i), task="easy-vqa", question=question, answer=answer, answers=[answer], image=f"images/{i}.png"))
    write_records(directory, records)
    return directory


@pytest.fixture
def passages(tmp_path):
    directory = tmp_path / "text"
    write_records(directory, [Record(id=f"doc-{i}", task="text", question=p, answer="", kind=TEXT) for i, p in enumerate(PASSAGES)])
    return directory


def _saved(model, processor, directory):
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return str(directory)


def _assert_batches_equal(actual, expected):
    assert set(actual) == set(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype and torch.equal(actual[key], expected[key]), key


# --- padding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [GENERATION_PADDING, FORWARD_PADDING])
def test_pad_batch_equals_the_processors_own_batch(tiny, side):
    """Encoded one by one and padded, or given to the processor as a list: the same tensors, image padding included."""
    name, _, processor = tiny
    family = family_by_name(name)
    images = _images() if family.multimodal else [None] * len(QUESTIONS)
    singles = [encode_prompt(processor, family, q, image) for (q, _, _), image in zip(QUESTIONS, images)]
    texts = [chat_prompt(processor, family, q) for q, _, _ in QUESTIONS]
    tokenizer = tokenizer_of(processor)
    if family.multimodal:
        expected = processor(text=texts, images=[[image] for image in images], return_tensors="pt", padding=True,
                             padding_side=side, add_special_tokens=not _template_adds_bos(tokenizer, texts[0]))
    else:
        expected = tokenizer(texts, return_tensors="pt", padding=True, padding_side=side, add_special_tokens=False)
    batch = pad_batch(singles, processor, side)
    _assert_batches_equal(batch, expected)
    lengths = [s["input_ids"].shape[1] for s in singles]
    assert len(set(lengths)) == len(lengths)  # every sample padded in the batch but the longest
    if name == "llava-next":
        assert len({s["pixel_values"].shape[1] for s in singles}) == 2  # 2 and 3 patches: patches padded too


def test_smolvlm_image_splitting_pads_whole_images(tiny_model):
    """With image splitting a sample is several images; a batch pads with all-zero images, masked out, as the processor does."""
    import transformers as tf

    from tests.conftest import IMAGE_SIZE

    model, processor = tiny_model("smolvlm", kv_heads=2)
    splitting = tf.Idefics3ImageProcessor(do_image_splitting=True, size={"longest_edge": 2 * IMAGE_SIZE},
                                          max_image_size={"longest_edge": IMAGE_SIZE})
    processor = tf.Idefics3Processor(image_processor=splitting, tokenizer=processor.tokenizer,
                                     image_seq_len=processor.image_seq_len, chat_template=processor.chat_template)
    family = family_by_name("smolvlm")
    images = _images()[:3]
    singles = [encode_prompt(processor, family, q, image) for (q, _, _), image in zip(QUESTIONS, images)]
    assert len({s["pixel_values"].shape[1] for s in singles}) > 1  # 5 tiles for a square image, 3 for a wide one
    texts = [chat_prompt(processor, family, q) for q, _, _ in QUESTIONS[:3]]
    expected = processor(text=texts, images=[[image] for image in images], return_tensors="pt", padding=True,
                         padding_side=FORWARD_PADDING)
    batch = pad_batch(singles, processor, FORWARD_PADDING)
    _assert_batches_equal(batch, expected)
    with torch.no_grad():
        logits = model(**batch).logits
        for row, single in enumerate(singles):
            n = single["input_ids"].shape[1]
            torch.testing.assert_close(logits[row, :n], model(**single).logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_pad_batch_fills_each_kind_of_tensor(tiny_model):
    _, tokenizer = tiny_model("llama", 1)
    long = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
            "labels": torch.tensor([[5, 6, 7]]), "pixel_values": torch.ones(1, 2, 4)}
    short = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
             "labels": torch.tensor([[8]]), "pixel_values": torch.ones(1, 1, 4)}
    long, short = BatchFeature(long), BatchFeature(short)
    pad = tokenizer.pad_token_id
    left = pad_batch([long, short], tokenizer, GENERATION_PADDING)
    assert left["input_ids"].tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]
    assert left["pixel_values"][1].tolist() == [[1.0] * 4, [0.0] * 4]  # per-sample tensors padded at the end
    right = pad_batch([short, long], tokenizer, FORWARD_PADDING)
    assert right["input_ids"].tolist() == [[8, pad, pad], [5, 6, 7]]
    assert pad_batch([short], tokenizer, FORWARD_PADDING) is short
    with pytest.raises(ValueError, match="'left' or 'right'"):
        pad_batch([short, long], tokenizer, "middle")
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="no pad token"):
        pad_batch([short, long], tokenizer, FORWARD_PADDING)


@pytest.mark.unit
def test_decode_generated_batch_cuts_each_row_at_its_eos(tiny_model):
    _, tokenizer = tiny_model("llama", 1)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    red, green = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" red", " green"))
    # Row 0 ended early (pads after its eos); row 1 ran to the end. The prompt is 2 columns.
    rows = [[1, 2] + red + [eos] + [pad] * len(green), [1, 2] + red + green + [eos]]
    texts = decode_generated_batch(tokenizer, torch.tensor(rows), 2, [eos])
    assert texts == ["red", "red green"]
    assert texts[1] == decode_generated(tokenizer, torch.tensor([rows[1]]), 2)


# --- calibration batches -------------------------------------------------------------------------


def test_calibration_batches_of_one_are_the_samples(tiny, questions):
    name, _, processor = tiny
    family = family_by_name(name)
    from qsvd.data.records import read_records

    records = read_records(questions)
    for with_answer in (False, True):
        batches = list(calibration_batches(processor, family, questions, with_answer))
        assert len(batches) == len(records)
        for batch, record in zip(batches, records):
            _assert_batches_equal(batch, encode_record(processor, family, record, questions, with_answer))


def test_calibration_batches_are_right_padded_with_labels_ignored(tiny, questions):
    name, _, processor = tiny
    family = family_by_name(name)
    singles = list(calibration_batches(processor, family, questions, with_answer=True))
    batches = list(calibration_batches(processor, family, questions, with_answer=True, batch_size=BATCH))
    assert [b["input_ids"].shape[0] for b in batches] == [3, 2]
    rows = [(batch, row) for batch in batches for row in range(batch["input_ids"].shape[0])]
    for single, (batch, row) in zip(singles, rows):
        n = single["input_ids"].shape[1]
        mask = batch["attention_mask"][row]
        assert mask[:n].all() and not mask[n:].any()  # real tokens first, then padding
        assert torch.equal(batch["input_ids"][row, :n], single["input_ids"][0])
        assert torch.equal(batch["labels"][row, :n], single["labels"][0])
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_calibration_batches_cast_pixel_values_only(tiny_model, questions):
    _, processor = tiny_model("llava-next")
    batch = next(calibration_batches(processor, family_by_name("llava-next"), questions, False, batch_size=2,
                                     device="cpu", dtype=torch.bfloat16))
    assert batch["pixel_values"].dtype == torch.bfloat16
    assert batch["input_ids"].dtype == batch["image_sizes"].dtype == torch.long


def test_right_padded_forward_equals_each_sample_alone(tiny, questions):
    """Real tokens of a right-padded batch get the logits they get alone (default position ids are right for them)."""
    name, model, processor = tiny
    family = family_by_name(name)
    singles = list(calibration_batches(processor, family, questions, with_answer=True))
    batches = calibration_batches(processor, family, questions, with_answer=True, batch_size=BATCH)
    rows = [(batch, row) for batch in batches for row in range(batch["input_ids"].shape[0])]
    with torch.no_grad():
        for single, (batch, row) in zip(singles, rows):
            n = single["input_ids"].shape[1]
            batched = model(**batch).logits[row, :n]
            torch.testing.assert_close(batched, model(**single).logits[0], rtol=1e-5, atol=1e-5)


# --- statistics ----------------------------------------------------------------------------------


def test_activation_statistics_do_not_depend_on_the_batch_size(tiny, questions, tmp_path):
    name, model, processor = tiny
    source = _saved(model, processor, tmp_path / "model")
    (alone, alone_manifest), (batched, manifest) = (
        read_artefact(run_activation_stats(source, name, questions, tmp_path / f"stats-{b}", gram=True, batch_size=b))
        for b in (1, BATCH)
    )
    assert alone_manifest["layers"] == manifest["layers"]  # padding tokens never counted
    assert manifest["config"]["batch_size"] == BATCH and manifest["config"]["device"] == "cpu"
    assert set(batched) == set(alone)
    for key in alone:
        assert batched[key].dtype == alone[key].dtype and batched[key].device.type == "cpu"
        torch.testing.assert_close(batched[key], alone[key], rtol=1e-5, atol=1e-6, msg=key)


def test_activation_statistics_count_exactly_the_real_tokens(tiny, questions, tmp_path):
    name, model, processor = tiny
    family = family_by_name(name)
    source = _saved(model, processor, tmp_path / "model")
    _, manifest = read_artefact(run_activation_stats(source, name, questions, tmp_path / "stats", batch_size=BATCH))
    real = sum(b["input_ids"].shape[1] for b in calibration_batches(processor, family, questions, with_answer=False))
    assert {entry["tokens"] for entry in manifest["layers"]} == {real}


# --- evaluation ----------------------------------------------------------------------------------


def _predictions(path):
    return [json.loads(line) for line in path.with_suffix(".predictions.jsonl").read_text().splitlines()]


def test_batched_generation_answers_as_one_at_a_time(tiny, questions, tmp_path):
    name, model, processor = tiny
    source = _saved(model, processor, tmp_path / "model")
    results = {}
    for b in (1, BATCH):
        out = run_evaluate(source, name, questions, tmp_path / f"eval-{b}.json", 5, {"method": "uncompressed"}, batch_size=b)
        results[b] = read_json(out), _predictions(out)
    (alone, alone_predictions), (batched, predictions) = results[1], results[BATCH]
    assert [p["id"] for p in predictions] == [str(i) for i in range(len(QUESTIONS))]
    assert any(p["generated"] for p in predictions)
    assert predictions == alone_predictions  # generated text, extraction and score, sample by sample
    assert batched["score"] == alone["score"] and batched["num_samples"] == len(QUESTIONS)
    assert batched["config"]["batch_size"] == BATCH and batched["config"]["device"] == "cpu"


def test_left_padded_generation_first_step_logits_equal_alone(tiny, questions):
    """The logits of the first generated token, batched (left-padded, position ids from the mask) and alone."""
    name, model, processor = tiny
    family = family_by_name(name)
    from qsvd.data.records import read_records

    records = read_records(questions)
    singles = [encode_prompt(processor, family, r.question, r.load_image(questions) if family.multimodal else None)
               for r in records]
    batch = pad_batch(singles, processor, GENERATION_PADDING)
    with torch.no_grad():
        first = model.generate(**batch, max_new_tokens=1, do_sample=False, output_logits=True,
                               return_dict_in_generate=True).logits[0]
        for row, single in enumerate(singles):
            alone = model.generate(**single, max_new_tokens=1, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True).logits[0][0]
            torch.testing.assert_close(first[row], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_batched_nll_of_each_passage_equals_it_alone(tiny_model):
    model, tokenizer = tiny_model("llama", kv_heads=2)
    singles = [encode_text(tokenizer, p, with_labels=False) for p in PASSAGES]
    batch = pad_batch(singles, tokenizer, FORWARD_PADDING)
    batched = sequence_nlls(model, batch)
    alone = [sequence_nll(model, s) for s in singles]
    assert [t for _, t in batched] == [t for _, t in alone] == [s["input_ids"].shape[1] - 1 for s in singles]
    assert [n for n, _ in batched] == pytest.approx([n for n, _ in alone], rel=1e-5)
    one_token = BatchFeature({"input_ids": torch.tensor([[5, 6, 7], [8, 0, 0]]), "attention_mask": torch.tensor([[1, 1, 1], [1, 0, 0]])})
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sequence_nlls(model, one_token)


def test_evaluate_perplexity_does_not_depend_on_the_batch_size(saved_tiny_model, passages, tmp_path):
    source, _, _ = saved_tiny_model("llama", kv_heads=2)
    runs = {}
    for b in (1, BATCH):
        out = run_evaluate(str(source), "llama", passages, tmp_path / f"text-{b}.json", 8, {"method": "uncompressed"}, batch_size=b)
        runs[b] = read_json(out), _predictions(out)
    (alone, alone_predictions), (batched, predictions) = runs[1], runs[BATCH]
    assert [p["id"] for p in predictions] == [p["id"] for p in alone_predictions]
    assert [p["tokens"] for p in predictions] == [p["tokens"] for p in alone_predictions]
    assert [p["nll"] for p in predictions] == pytest.approx([p["nll"] for p in alone_predictions], rel=1e-5)
    assert batched["score"] == pytest.approx(alone["score"], rel=1e-5)
