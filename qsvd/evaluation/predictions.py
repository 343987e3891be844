"""The predictions an evaluate result saves beside itself (`<task>.predictions.jsonl`, one JSON object per sample),
and the scores recomputed from them.

Question tasks save per sample its id, question, gold answer, generated text, extracted answer and score; text
corpora its NLL and token count. `strict_score` rescores a multiple-choice result by lmms-eval's own rule
(qsvd.evaluation.answers.STRICT_RULES) from the generated texts alone, so that no model runs again.
"""

from __future__ import annotations

import json
from pathlib import Path

from qsvd.artefacts import FILES, atomic_write, file_records, write_json
from qsvd.evaluation.answers import STRICT_RULES, strict_accuracy

SUFFIX = ".predictions.jsonl"


def predictions_path(result_path: str | Path) -> Path:
    """Where the result file `result_path` (`<task>.json`) keeps its predictions."""
    return Path(result_path).with_suffix(SUFFIX)


def write_result(result_path: str | Path, result: dict, predictions: list[dict]) -> Path:
    """Write `predictions` beside the result file (JSON lines), then the result naming them and recording their size
    and SHA-256 (checked by read_json); each write atomic, the predictions first."""
    saved = predictions_path(result_path)
    lines = "".join(json.dumps(p) + "\n" for p in predictions)
    atomic_write(saved, lambda tmp: tmp.write_text(lines))
    write_json(result_path, {**result, "predictions": saved.name, FILES: file_records(saved.parent, [saved.name])})
    return Path(result_path)


def read_predictions(result_path: str | Path, result: dict) -> list[dict]:
    """The predictions of the result file `result_path`, whose JSON (already read and checked) is `result`."""
    path = Path(result_path).parent / result["predictions"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}, the predictions of {result_path}, does not exist: re-run the evaluate stage "
                                "that wrote them")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def strict_score(result_path: str | Path, result: dict) -> float | None:
    """lmms-eval's score of a multiple-choice result, from its saved predictions; None for a task without a rule."""
    if result["task"] not in STRICT_RULES:
        return None
    predictions = read_predictions(result_path, result)
    if len(predictions) != result["num_samples"]:
        raise ValueError(f"{result_path} counts {result['num_samples']} samples but its predictions hold "
                         f"{len(predictions)}: re-run the evaluate stage that wrote them")
    return strict_accuracy(result["task"], predictions)
