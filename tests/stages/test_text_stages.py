"""Text-corpus passages through the calibration batches and the evaluate stage, on a tiny random Llama."""

import json
import math

import pytest
import torch

from qsvd.artefacts import read_json
from qsvd.data.records import TEXT, Record, write_records
from qsvd.models.prompts import TEXT_TOKENS
from qsvd.models.registry import family_by_name
from qsvd.stages.calibration import calibration_batches
from qsvd.stages.evaluate import run_evaluate

PASSAGES = [
    "what color is the shape? " * 3,
    "is there a circle in the image? yes there is a red circle and a blue square. " * 40,  # > TEXT_TOKENS tokens
]


@pytest.fixture
def text_dataset(tmp_path):
    directory = tmp_path / "text"
    write_records(directory, [Record(id=f"doc-{i}", task="text", question=p, answer="", kind=TEXT) for i, p in enumerate(PASSAGES)])
    return directory


def test_calibration_batches_of_text_label_every_token(saved_tiny_model, text_dataset):
    _, model, tokenizer = saved_tiny_model("llama", kv_heads=2)
    family = family_by_name("llama")
    plain = list(calibration_batches(tokenizer, family, text_dataset, with_answer=False))
    labelled = list(calibration_batches(tokenizer, family, text_dataset, with_answer=True))
    assert all("labels" not in b for b in plain)
    assert plain[0]["input_ids"].tolist() == [tokenizer(PASSAGES[0])["input_ids"]]  # no chat template
    assert plain[1]["input_ids"].shape == (1, TEXT_TOKENS)  # cut to the passage length
    for batch in labelled:
        assert torch.equal(batch["labels"], batch["input_ids"])  # unshifted: the model shifts


def test_evaluate_text_is_perplexity_over_every_predicted_token(saved_tiny_model, text_dataset, tmp_path):
    source, model, tokenizer = saved_tiny_model("llama", kv_heads=2)
    out = run_evaluate(str(source), "llama", text_dataset, tmp_path / "eval" / "text.json", 8, {"method": "uncompressed"})
    result = read_json(out)
    predictions = [json.loads(line) for line in (tmp_path / "eval" / "text.predictions.jsonl").read_text().splitlines()]
    expected_nll, expected_tokens = [], []
    with torch.no_grad():
        for passage in PASSAGES:
            ids = tokenizer(passage, return_tensors="pt")["input_ids"][:, :TEXT_TOKENS]
            expected_nll.append(model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1))
            expected_tokens.append(ids.shape[1] - 1)
    assert [p["id"] for p in predictions] == ["doc-0", "doc-1"]
    assert [p["tokens"] for p in predictions] == expected_tokens and expected_tokens[1] == TEXT_TOKENS - 1
    assert [p["nll"] for p in predictions] == pytest.approx(expected_nll, rel=1e-5)
    assert result["metric"] == "perplexity" and result["task"] == "text" and result["num_samples"] == 2
    assert result["score"] == pytest.approx(math.exp(sum(expected_nll) / sum(expected_tokens)), rel=1e-5)
    assert result["R1"] == result["R2"] == 1.0 and result["method"] == "uncompressed"
