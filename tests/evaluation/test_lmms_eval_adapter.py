"""lmms-eval's `qsvd` model answers easy-vqa questions exactly as qsvd's own evaluate stage does, offline.

The 8 questions come from the easy-vqa package through the data stage and are served to lmms-eval as a local task
(`write_question_task`: a task YAML and a JSON-lines file in tmp_path, no hub); the model is a tiny random SmolVLM
with its joint-QKV low-rank checkpoint. A random model's greedy answers differ from image to image and change with
any change of prompt, image, weights or decoding, so equal answer strings per question mean the same path.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip(
    "lmms_eval",
    reason="lmms-eval is not installed: pip install 'qsvd[lmmseval]' with the current torch held by a constraints "
    "file (README, 'lmms-eval'); it needs a torchvision that loads beside that torch (or PYTHONPATH to a target dir)",
)

from lmms_eval.evaluator import simple_evaluate  # noqa: E402
from lmms_eval.models import get_model  # noqa: E402
from lmms_eval.tasks import TaskManager  # noqa: E402

from qsvd.data.materialise import materialise_dataset  # noqa: E402
from qsvd.data.records import read_records  # noqa: E402
from qsvd.evaluation.lmms_eval_adapter import QSVDModel, cut_at, generation_options, write_question_task  # noqa: E402
from qsvd.models.checkpoint import open_checkpoint  # noqa: E402
from qsvd.stages.evaluate import run_evaluate  # noqa: E402
from tests.stages.test_pipeline_tiny import dataset  # noqa: E402,F401  (fixture)
from tests.stages.test_quantize import _lowrank_checkpoint  # noqa: E402

pytestmark = pytest.mark.unit

FAMILY = "smolvlm"
QUESTIONS = 8
MAX_NEW_TOKENS = 6
TASK = "qsvd_easy_vqa"


@pytest.fixture
def served(tiny_model, dataset, tmp_path, monkeypatch):  # noqa: F811
    """(checkpoint, easy-vqa data dir, task YAML): a compressed tiny SmolVLM and 8 easy-vqa test questions."""
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "lmms-cache"))
    model, processor = tiny_model(FAMILY, kv_heads=2)
    checkpoint = _lowrank_checkpoint(FAMILY, model, processor, dataset, tmp_path)
    questions = tmp_path / "easy-vqa"
    materialise_dataset("easy-vqa", "test", QUESTIONS, 0, questions)
    return checkpoint, questions, write_question_task(questions, tmp_path / "tasks", TASK, MAX_NEW_TOKENS)


def _evaluate_stage(checkpoint, questions, out, batch_size=1) -> list[dict]:
    run_evaluate(str(checkpoint), FAMILY, questions, out, MAX_NEW_TOKENS, {}, batch_size=batch_size)
    return [json.loads(line) for line in out.with_suffix(".predictions.jsonl").read_text().splitlines()]


def _lmms_answers(results) -> list[str]:
    samples = sorted(results["samples"][TASK], key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in samples] == list(range(QUESTIONS))
    return [s["filtered_resps"][0] for s in samples]


def _assert_same_answers(expected: list[dict], answers: list[str]) -> None:
    assert len({p["generated"] for p in expected}) >= 3, "the random model's answers should differ between images"
    for prediction, answer in zip(expected, answers, strict=True):
        assert answer == prediction["generated"], prediction["id"]


def test_model_qsvd_with_pretrained_answers_as_the_evaluate_stage(served, tmp_path):
    checkpoint, questions, task = served
    expected = _evaluate_stage(checkpoint, questions, tmp_path / "eval.json")
    assert get_model("qsvd") is QSVDModel  # found through qsvd's lmms_eval.models entry point
    results = simple_evaluate(model="qsvd", model_args=f"pretrained={checkpoint}", tasks=[TASK],
                              task_manager=TaskManager(include_path=str(task.parent), include_defaults=False),
                              bootstrap_iters=0, log_samples=True)
    _assert_same_answers(expected, _lmms_answers(results))


def test_a_model_in_memory_answers_in_batches_as_the_evaluate_stage(served, tmp_path):
    checkpoint, questions, task = served
    expected = _evaluate_stage(checkpoint, questions, tmp_path / "eval.json", batch_size=3)
    model, processor, _ = open_checkpoint(checkpoint, FAMILY)
    lm = QSVDModel(model=model, processor=processor, family=FAMILY, batch_size=3)
    results = simple_evaluate(model=lm, tasks=[TASK], bootstrap_iters=0, log_samples=True,
                              task_manager=TaskManager(include_path=str(task.parent), include_defaults=False))
    _assert_same_answers(expected, _lmms_answers(results))


@pytest.mark.slow
def test_the_lmms_eval_command_line_answers_as_the_evaluate_stage(served, tmp_path):
    checkpoint, questions, task = served
    expected = _evaluate_stage(checkpoint, questions, tmp_path / "eval.json")
    out = tmp_path / "lmms-out"
    command = [sys.executable, "-m", "lmms_eval", "--model", "qsvd", "--model_args", f"pretrained={checkpoint}",
               "--tasks", TASK, "--include_path", str(task.parent), "--output_path", str(out), "--log_samples"]
    run = subprocess.run(command, check=False, cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (samples,) = out.glob(f"**/*_samples_{TASK}.jsonl")
    logged = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["input"] for s in logged] == [r.question for r in read_records(questions)]
    _assert_same_answers(expected, [s["filtered_resps"] for s in logged])


def test_generation_options_are_greedy_and_until_cuts():
    assert generation_options({"until": ["\n\n"], "max_new_tokens": 16, "temperature": 0, "do_sample": False}, 8) == (
        16, ["\n\n"])
    assert generation_options({"until": "ASSISTANT:"}, 8) == (8, ["ASSISTANT:"])
    assert generation_options(None, 8) == (8, [])
    for key, value in [("temperature", 0.2), ("do_sample", True), ("num_beams", 3)]:
        with pytest.raises(ValueError, match=key):
            generation_options({key: value}, 8)
    assert cut_at(" a red circle ASSISTANT: no\n\nyes", ["\n\n", "ASSISTANT:"]) == "a red circle"
    assert cut_at("yes", []) == "yes"


def test_a_directory_without_a_manifest_needs_its_family(tmp_path):
    with pytest.raises(ValueError, match="family="):
        QSVDModel(pretrained=str(tmp_path))
    with pytest.raises(ValueError, match="processor= and family="):
        QSVDModel(model=object())
