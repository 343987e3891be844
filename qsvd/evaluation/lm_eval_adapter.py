r"""A qsvd model in EleutherAI's lm-evaluation-harness (0.4.x, the `lmeval` extra): `HFLM(pretrained=<model>)`.

lm-eval scores a text passage with `loglikelihood_rolling`: the tokens of the passage, encoded here without
special tokens, are preceded by one prefix token (the tokenizer's BOS, else its EOS) and every passage token is
predicted, in disjoint windows of `max_length` tokens. qsvd's perplexity (`qsvd.evaluation.perplexity`, the
evaluate stage) predicts tokens 2..n of the tokenizer's own encoding cut to TEXT_TOKENS tokens. The two sum the
same next-token NLLs when that encoding starts with the prefix token (a tokenizer that adds BOS) and the passage
fits both TEXT_TOKENS and one window; with a tokenizer that adds no BOS, lm-eval predicts one more token.

Units: qsvd reports a token perplexity exp(L / T), L the summed NLL in nats, T the predicted tokens; lm-eval
reports bits_per_byte = L / (B ln 2), B the UTF-8 bytes of the passages, byte_perplexity = 2^bits_per_byte and
word_perplexity = exp(L / W), W = len(re.split(r"\s+", passage)) summed over the passages (lm-eval's
word count: a leading or trailing blank counts as one more word). So bits_per_byte = T ln(perplexity) / (B ln 2).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from torch import nn

# metric -> its aggregation in lm-eval (`lm_eval.api.metrics`); all lower-is-better
ROLLING_METRICS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                   "bits_per_byte": "bits_per_byte"}


def lm_eval_model(model: nn.Module | str | Path, tokenizer=None, batch_size: int = 1, max_length: int | None = None):
    """An lm-eval `HFLM` around a model object (e.g. `qsvd.from_pretrained(path)`) and its tokenizer, or around the
    qsvd checkpoint directory `model` (tokenizer read from it). `add_bos_token=False` because lm-eval prepends
    the BOS itself as the prefix token; a tokenizer that added it too would give two."""
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, (str, Path)):
        import transformers

        import qsvd

        tokenizer = tokenizer or transformers.AutoTokenizer.from_pretrained(model)
        model = qsvd.from_pretrained(model)
    if tokenizer is None:
        raise ValueError("lm_eval_model needs the tokenizer object with a model object (HFLM would fetch one by name)")
    return HFLM(pretrained=model, tokenizer=tokenizer, add_bos_token=False, batch_size=batch_size, max_length=max_length)


def rolling_text_task(passages: Sequence[str], work_dir: str | Path, name: str = "qsvd_passages") -> dict:
    """An lm-eval task config (the dict form of a task YAML) scoring `passages` with `loglikelihood_rolling` and
    the metrics of ROLLING_METRICS, read offline from a JSON-lines file written in `work_dir` (which also holds the
    datasets cache)."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"text": p}) + "\n" for p in passages))
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(work_dir / "datasets")},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": metric, "aggregation": aggregation, "higher_is_better": False}
            for metric, aggregation in ROLLING_METRICS.items()
        ],
        "metadata": {"version": 1.0},
    }


def evaluate_passages(lm, passages: Sequence[str], work_dir: str | Path) -> dict[str, float]:
    """lm-eval's ROLLING_METRICS of `lm` on `passages`, through `simple_evaluate` (no bootstrap, global RNGs left
    as they are, lm-eval's built-in tasks not indexed)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    task = rolling_text_task(passages, work_dir)
    results = simple_evaluate(
        model=lm, tasks=[task], task_manager=TaskManager(include_defaults=False), bootstrap_iters=0, log_samples=False,
        random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None,
    )
    scores = results["results"][task["task"]]
    return {metric: scores[f"{metric},none"] for metric in ROLLING_METRICS}


def bits_per_byte(nll_sums: Sequence[float], passages: Sequence[str]) -> float:
    """Summed NLLs in nats over the passages' UTF-8 bytes, in bits: lm-eval's bits_per_byte of qsvd's NLLs."""
    return math.fsum(nll_sums) / (sum(len(p.encode("utf-8")) for p in passages) * math.log(2))


def perplexity_to_bits_per_byte(perplexity: float, predicted_tokens: int, passage_bytes: int) -> float:
    """A token perplexity over `predicted_tokens` tokens as bits per byte of `passage_bytes` bytes."""
    return predicted_tokens * math.log(perplexity) / (passage_bytes * math.log(2))
