"""lm-eval's bits per byte of a qsvd model on local passages equals qsvd's own perplexity in the same units."""

import json
import math
import re

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'qsvd[lmeval]' (or PYTHONPATH to a target dir)")

from qsvd.data.records import TEXT, Record, write_records  # noqa: E402
from qsvd.evaluation.lm_eval_adapter import (  # noqa: E402
    bits_per_byte,
    evaluate_passages,
    lm_eval_model,
    perplexity_to_bits_per_byte,
)
from qsvd.evaluation.perplexity import perplexity, sequence_nll  # noqa: E402
from qsvd.models.prompts import encode_text  # noqa: E402
from qsvd.stages.evaluate import run_evaluate  # noqa: E402
from tests.stages.test_pipeline_tiny import dataset  # noqa: E402,F401  (fixture)
from tests.stages.test_quantize import _lowrank_checkpoint  # noqa: E402

pytestmark = pytest.mark.unit

PASSAGES = [  # each shorter than TEXT_TOKENS and than one lm-eval window, so both score every token
    "what color is the shape? it is a red circle.",
    "is there a square in the picture? yes there is a blue square and a green triangle. " * 3,
    "describe this photo: a gray rectangle on a black background",
]


def _bos_tiny_llama(tiny_model):
    """The tiny Llama with a tokenizer that prepends BOS, so qsvd's encoding starts with lm-eval's prefix token."""
    model, tokenizer = tiny_model("llama", kv_heads=2)
    tokenizer.add_bos_token = True
    assert tokenizer(PASSAGES[0])["input_ids"][0] == tokenizer.bos_token_id
    return model, tokenizer


def test_lm_eval_rolling_metrics_equal_qsvd_perplexity_converted(tiny_model, tmp_path):
    model, tokenizer = _bos_tiny_llama(tiny_model)
    nlls, tokens = zip(*(sequence_nll(model, encode_text(tokenizer, p, with_labels=False)) for p in PASSAGES))
    scores = evaluate_passages(lm_eval_model(model, tokenizer), PASSAGES, tmp_path / "lm_eval")
    passage_bytes = sum(len(p.encode("utf-8")) for p in PASSAGES)
    expected = perplexity_to_bits_per_byte(perplexity(nlls, tokens), sum(tokens), passage_bytes)
    assert expected == pytest.approx(bits_per_byte(nlls, PASSAGES), rel=1e-12)
    assert scores["bits_per_byte"] == pytest.approx(expected, rel=1e-5)
    assert scores["byte_perplexity"] == pytest.approx(2 ** expected, rel=1e-5)
    words = sum(len(re.split(r"\s+", p)) for p in PASSAGES)  # lm-eval's count: PASSAGES[1]'s trailing blank is a word
    assert scores["word_perplexity"] == pytest.approx(math.exp(sum(nlls) / words), rel=1e-5)


def test_lm_eval_on_a_compressed_checkpoint_agrees_with_the_evaluate_stage(tiny_model, dataset, tmp_path):  # noqa: F811
    model, tokenizer = _bos_tiny_llama(tiny_model)
    checkpoint = _lowrank_checkpoint("llama", model, tokenizer, dataset, tmp_path)
    texts = tmp_path / "text"
    write_records(texts, [Record(id=f"doc-{i}", task="text", question=p, answer="", kind=TEXT) for i, p in enumerate(PASSAGES)])
    result = json.loads(run_evaluate(str(checkpoint), "llama", texts, tmp_path / "eval.json", 8, {}).read_text())
    predictions = [json.loads(line) for line in (tmp_path / "eval.predictions.jsonl").read_text().splitlines()]
    predicted = sum(p["tokens"] for p in predictions)
    expected = perplexity_to_bits_per_byte(result["score"], predicted, sum(len(p.encode("utf-8")) for p in PASSAGES))
    with torch.no_grad():
        scores = evaluate_passages(lm_eval_model(checkpoint), PASSAGES, tmp_path / "lm_eval")  # via qsvd.from_pretrained
    assert scores["bits_per_byte"] == pytest.approx(expected, rel=1e-4)
