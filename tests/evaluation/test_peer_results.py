"""The accuracy peers' shared scoring and result writing (benchmarks/peers/peer_result.py) agree with the evaluate
stage, and their rows render in the peer table beside qsvd's; the torchao peer end to end where torchao imports."""

import json
import sys

import pytest

from qsvd.artefacts import read_json
from qsvd.stages.evaluate import run_evaluate
from tests.stages.test_batching import passages  # noqa: F401  (fixture)
from tests.workflow.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "peers"))

import peer_result  # noqa: E402
import table  # noqa: E402

pytestmark = pytest.mark.unit

def test_a_peer_result_scores_as_the_evaluate_stage_and_sits_in_the_peer_table(saved_tiny_model, passages, tmp_path):
    directory, model, tokenizer = saved_tiny_model("llama")
    stage = read_json(run_evaluate(str(directory), "llama", passages, tmp_path / "stage.json", 8, {"method": "uncompressed"}))
    score, predictions = peer_result.score_passages(model, tokenizer, passages)
    assert score == pytest.approx(stage["score"], rel=1e-6)
    stage_predictions = [json.loads(line) for line in (tmp_path / "stage.predictions.jsonl").read_text().splitlines()]
    assert [p["tokens"] for p in predictions] == [p["tokens"] for p in stage_predictions]

    out = peer_result.write_peer_result(
        tmp_path / "peer" / "eval.json", stage="peer-test", config={"model": directory}, seed=0, versions={"tool_version": "1"},
        peer="a-peer", method="a-peer RTN, no rotations", fmt="W8A4", rotate=False, weight_method="rtn",
        execution="simulated", model_name="tiny", evaluation=passages, score=score, predictions=predictions,
        compress_seconds=0.5)
    result = read_json(out)
    assert (result["R1"], result["R2"], result["quantization"]) == (0.5, 0.25, "W8A4 (simulated quantization)")
    assert result["config"]["model"] == str(directory) and result["tool_version"] == "1" and result["task"] == "text"
    assert (out.parent / "eval.predictions.jsonl").is_file()
    rendered = table.main([str(tmp_path / "stage.json"), str(out)])
    assert rendered.splitlines()[0] == "| method | FP | W8A4 |"
    assert f"| a-peer RTN, no rotations |  | {score:.2f} |" in rendered
    assert f"| uncompressed | {stage['score']:.2f} |  |" in rendered


def test_the_torchao_peer_quantizes_every_decoder_linear_and_writes_a_real_w8a8_row(saved_tiny_model, passages, tmp_path):
    pytest.importorskip("torchao", reason="torchao is not installed: pip install 'qsvd[bench]'")
    import torchao_quant

    directory, model, _ = saved_tiny_model("llama")
    out = torchao_quant.main(["--model", str(directory), "--evaluation", str(passages), "--model-name", "tiny",
                              "--out", str(tmp_path / "torchao" / "eval.json")])
    result = read_json(out)
    decoder_linears = sum(type(m).__name__ == "Linear" for n, m in model.named_modules() if n != "lm_head")
    assert result["config"]["linears_quantized"] == decoder_linears > 0
    assert result["quantization"] == "W8A8 (real quantization)" and result["peer"] == "torchao"
    stage = read_json(run_evaluate(str(directory), "llama", passages, tmp_path / "stage.json", 8, {}))
    assert result["score"] != stage["score"] and result["score"] == pytest.approx(stage["score"], rel=0.05)
