"""What every accuracy peer script shares: scoring a model on qsvd's test passages as the evaluate stage does, and
writing the result in qsvd's evaluation format (labels, score, predictions, provenance), so peer rows sit in the
same tables as QuaRot and QSVD (benchmarks/peers/table.py)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from qsvd.artefacts import provenance
from qsvd.data.records import read_records
from qsvd.evaluation.perplexity import perplexity
from qsvd.evaluation.predictions import write_result
from qsvd.stages.evaluate import passage_nlls


def peer_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every peer script takes: the dense model and its label, the test passages, threads, the result."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", type=Path, default=Path("results/smollm2/model"), help="a dense transformers checkpoint")
    p.add_argument("--model-name", default="smollm2", help="the `model` label of the result (qsvd's model.name)")
    p.add_argument("--evaluation", type=Path, default=Path("results/data/sotu-test-n32-s0"))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True, help="the result JSON (predictions written beside it)")
    return p


def start(args: argparse.Namespace) -> None:
    """Logging and torch's thread count, as the parsed peer arguments say."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)


def bits_of(fmt: str) -> tuple[int | None, int | None]:
    """(weight bits, activation bits) of "W4A4"; 16 = full precision."""
    weight, act = (int(b) for b in fmt[1:].split("A"))
    return (None if weight == 16 else weight), (None if act == 16 else act)


def score_passages(model, tokenizer, evaluation: Path) -> tuple[float, list[dict]]:
    """(perplexity, predictions) on the passages of `evaluation`, one passage per forward, as
    `qsvd evaluate --batch-size 1` scores them (first 256 tokens, the stage's own `passage_nlls`)."""
    model.eval()
    with torch.no_grad():
        predictions = [p for record in read_records(evaluation) for p in passage_nlls(model, tokenizer, [record], torch.float32)]
    return perplexity([x["nll"] for x in predictions], [x["tokens"] for x in predictions]), predictions


def write_peer_result(out: Path, *, stage: str, config: dict, seed: int, versions: dict, peer: str, method: str,
                      fmt: str, rotate: bool, weight_method: str, execution: str, model_name: str, evaluation: Path,
                      score: float, predictions: list[dict], compress_seconds: float) -> Path:
    """The peer's result JSON (and its predictions beside it), labelled as qsvd's evaluate stage labels a dense
    quantized model (QuaRot's costs: R1, R2 = bits / 16); `execution` is "simulated" or "real" quantization."""
    weight_bits, act_bits = bits_of(fmt)
    config = {key: (str(value) if isinstance(value, Path) else value) for key, value in config.items()}
    result = provenance(stage, config, seed)
    result.update(versions, compress_seconds=compress_seconds)
    result.update(
        model=model_name, method=method, seed=seed, budget="full", budget_kind="none", budget_value=1.0,
        R1=(weight_bits or 16) / 16, R2=(act_bits or 16) / 16,
        quant_format=fmt, rotate=rotate, weight_method=weight_method, peer=peer,
        task=read_records(evaluation)[0].task, metric="perplexity", score=score, num_samples=len(predictions),
        quantization=f"{fmt} ({execution} quantization)",
    )
    return write_result(out, result, predictions)
