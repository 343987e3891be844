"""Stage 8: score a model on one evaluation set; every prediction saved.

Question sets: greedy generation, answer extraction, accuracy. Text corpora: perplexity over the
first TEXT_TOKENS tokens of every passage, each passage's NLL saved.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from qsvd.artefacts import atomic_write, provenance, write_json
from qsvd.data.records import read_records
from qsvd.evaluation.answers import score_prediction
from qsvd.evaluation.perplexity import perplexity, sequence_nll
from qsvd.models.checkpoint import open_checkpoint
from qsvd.models.prompts import TEXT_TOKENS, decode_generated, encode_prompt, encode_text
from qsvd.models.registry import family_by_name

METRICS = {"easy-vqa": "accuracy", "scienceqa-img": "accuracy", "vizwiz": "vqa_accuracy"}
PERPLEXITY = "perplexity"  # the metric of every text corpus (lower is better)


def run_evaluate(
    model_source: str,
    family: str,
    data_dir: Path,
    out_path: Path,
    max_new_tokens: int,
    labels: dict,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Score one model on one materialised dataset; `labels` (model, method, budget, ...) go in the result."""
    model, processor, manifest = open_checkpoint(model_source, family, dtype)
    cost = {"R1": manifest["cost"]["R1"], "R2": manifest["cost"]["R2"]} if "cost" in manifest else {"R1": 1.0, "R2": 1.0}
    quantization = manifest.get("quantization")
    adapter = family_by_name(family)
    records = read_records(data_dir)
    if not records:
        raise ValueError(f"no samples in {data_dir}: re-run the data stage")
    if len({r.is_text for r in records}) > 1:
        raise ValueError(f"{data_dir} mixes text passages and questions: re-run the data stage")
    progress = tqdm(records, desc=f"evaluate {Path(data_dir).name}")
    with torch.no_grad():
        if records[0].is_text:
            predictions = [_passage_nll(model, processor, record) for record in progress]
            metric = PERPLEXITY
            score = perplexity([p["nll"] for p in predictions], [p["tokens"] for p in predictions])
        else:
            predictions = [_answer(model, processor, adapter, record, data_dir, max_new_tokens) for record in progress]
            metric = METRICS[records[0].task]
            score = statistics.fmean(p["score"] for p in predictions)
    task = records[0].task
    result = provenance(
        "evaluate",
        {"model_source": str(model_source), "family": family, "data_dir": str(data_dir), "max_new_tokens": max_new_tokens, "dtype": str(dtype)},
    )
    result.update(labels)
    result.update(
        cost,
        task=task,
        metric=metric,
        score=score,
        num_samples=len(predictions),
        quantization=f"{quantization['label']} (simulated quantization)" if quantization else "none (full precision)",
        predictions=Path(out_path).with_suffix(".predictions.jsonl").name,
    )
    lines = "".join(json.dumps(p) + "\n" for p in predictions)
    atomic_write(Path(out_path).with_suffix(".predictions.jsonl"), lambda tmp: tmp.write_text(lines))
    write_json(out_path, result)
    return Path(out_path)


def _answer(model, processor, adapter, record, data_dir: Path, max_new_tokens: int) -> dict:
    """Greedy answer to one question, extracted and scored."""
    image = record.load_image(data_dir) if adapter.multimodal else None
    batch = encode_prompt(processor, adapter, record.question, image)
    prompt_length = batch["input_ids"].shape[1]
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    text = decode_generated(processor, output, prompt_length)
    extracted, score = score_prediction(record.task, text, record)
    return {"id": record.id, "question": record.question, "gold": record.answer, "generated": text, "extracted": extracted, "score": score}


def _passage_nll(model, processor, record) -> dict:
    """Summed next-token NLL of a passage's first TEXT_TOKENS tokens and how many tokens were predicted."""
    nll, tokens = sequence_nll(model, encode_text(processor, record.question, with_labels=False, max_tokens=TEXT_TOKENS))
    return {"id": record.id, "nll": nll, "tokens": tokens, "mean_nll": nll / tokens}
