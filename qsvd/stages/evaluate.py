"""Stage 8: score a model on one evaluation set; every prediction saved.

Question sets: greedy generation, answer extraction, accuracy. Text corpora: perplexity over the
first TEXT_TOKENS tokens of every passage, each passage's NLL saved.

Samples go through the model `batch_size` at a time on `device`, each encoded as alone: questions
padded on the left for generate() (which derives position ids from the attention mask), passages
on the right for one forward (whose position ids 0..T-1 are then right for the real tokens), padding
excluded from every NLL. Any batch size scores the same up to float rounding.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from tqdm import tqdm

from qsvd.artefacts import provenance
from qsvd.data.records import read_records
from qsvd.evaluation.answers import score_prediction
from qsvd.evaluation.perplexity import perplexity, sequence_nlls
from qsvd.evaluation.predictions import write_result
from qsvd.models.checkpoint import open_checkpoint
from qsvd.models.prompts import (
    FORWARD_PADDING,
    GENERATION_PADDING,
    TEXT_TOKENS,
    decode_generated_batch,
    encode_prompt,
    encode_text,
    pad_batch,
)
from qsvd.models.registry import family_by_name

METRICS = {"easy-vqa": "accuracy", "scienceqa-img": "accuracy", "seedbench-img": "accuracy", "vizwiz": "vqa_accuracy"}
PERPLEXITY = "perplexity"  # the metric of every text corpus (lower is better)


def run_evaluate(
    model_source: str,
    family: str,
    data_dir: Path,
    out_path: Path,
    max_new_tokens: int,
    labels: dict,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
) -> Path:
    """Score one model on one materialised dataset; `labels` (model, method, budget, ...) go in the result."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    model, processor, manifest = open_checkpoint(model_source, family, dtype, device)
    cost = {"R1": manifest["cost"]["R1"], "R2": manifest["cost"]["R2"]} if "cost" in manifest else {"R1": 1.0, "R2": 1.0}
    quantization = manifest.get("quantization")
    adapter = family_by_name(family)
    records = read_records(data_dir)
    if not records:
        raise ValueError(f"no samples in {data_dir}: re-run the data stage")
    if len({r.is_text for r in records}) > 1:
        raise ValueError(f"{data_dir} mixes text passages and questions: re-run the data stage")
    predictions = []
    with torch.no_grad(), tqdm(total=len(records), desc=f"evaluate {Path(data_dir).name}") as progress:
        for start in range(0, len(records), batch_size):
            chunk = records[start : start + batch_size]
            if records[0].is_text:
                predictions += passage_nlls(model, processor, chunk, dtype)
            else:
                predictions += _answers(model, processor, adapter, chunk, data_dir, max_new_tokens, dtype)
            progress.update(len(chunk))
    if records[0].is_text:
        metric = PERPLEXITY
        score = perplexity([p["nll"] for p in predictions], [p["tokens"] for p in predictions])
    else:
        metric = METRICS[records[0].task]
        score = statistics.fmean(p["score"] for p in predictions)
    task = records[0].task
    result = provenance(
        "evaluate",
        {
            "model_source": str(model_source),
            "family": family,
            "data_dir": str(data_dir),
            "max_new_tokens": max_new_tokens,
            "dtype": str(dtype),
            "batch_size": batch_size,
            "device": str(model.device),  # as resolved ("auto" -> cuda or cpu)
        },
    )
    result.update(labels)
    result.update(
        cost,
        task=task,
        metric=metric,
        score=score,
        num_samples=len(predictions),
        quantization=f"{quantization['label']} (simulated quantization)" if quantization else "none (full precision)",
    )
    return write_result(out_path, result, predictions)


def _stop_token_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def generate_answers(model, processor, adapter, questions, max_new_tokens: int, dtype: torch.dtype) -> list[str]:
    """Greedy answers of `model` to a batch of (question, image or None) pairs, through qsvd's one prompt path
    (left-padded prompts), each decoded up to its first stop token; also the door of qsvd's lmms-eval model."""
    prompts = [encode_prompt(processor, adapter, question, image) for question, image in questions]
    batch = pad_batch(prompts, processor, GENERATION_PADDING).to(device=model.device, dtype=dtype)
    prompt_length = batch["input_ids"].shape[1]
    output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return decode_generated_batch(processor, output, prompt_length, _stop_token_ids(model))


def _answers(model, processor, adapter, records, data_dir: Path, max_new_tokens: int, dtype: torch.dtype) -> list[dict]:
    """Greedy answers to a batch of questions, extracted and scored."""
    questions = [(r.question, r.load_image(data_dir) if adapter.multimodal else None) for r in records]
    texts = generate_answers(model, processor, adapter, questions, max_new_tokens, dtype)
    predictions = []
    for record, text in zip(records, texts):
        extracted, score = score_prediction(record.task, text, record)
        predictions.append(
            {"id": record.id, "question": record.question, "gold": record.answer, "generated": text, "extracted": extracted, "score": score}
        )
    return predictions


def passage_nlls(model, processor, records, dtype: torch.dtype) -> list[dict]:
    """Summed next-token NLL of each passage's first TEXT_TOKENS tokens and how many tokens were predicted."""
    passages = [encode_text(processor, r.question, with_labels=False, max_tokens=TEXT_TOKENS) for r in records]
    batch = pad_batch(passages, processor, FORWARD_PADDING).to(device=model.device, dtype=dtype)
    return [
        {"id": record.id, "nll": nll, "tokens": tokens, "mean_nll": nll / tokens}
        for record, (nll, tokens) in zip(records, sequence_nlls(model, batch))
    ]
