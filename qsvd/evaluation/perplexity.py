"""Token-level perplexity: exp of the mean next-token negative log-likelihood over every predicted token."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BatchFeature


@torch.no_grad()
def sequence_nll(model: nn.Module, batch: BatchFeature) -> tuple[float, int]:
    """(sum of -log p(token_t | tokens_<t) over t = 1..n-1, n - 1) for a batch of one sequence."""
    ids = batch["input_ids"]
    if ids.shape[0] != 1 or ids.shape[1] < 2:
        raise ValueError(f"sequence_nll takes one sequence of at least 2 tokens, got input_ids of shape {tuple(ids.shape)}")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits[0, :-1].float()
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return nll.item(), ids.shape[1] - 1


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(total NLL / total predicted tokens): every token weighs the same, whatever its sequence."""
    tokens = sum(token_counts)
    if tokens == 0:
        raise ValueError("perplexity of no predicted tokens")
    return math.exp(math.fsum(nll_sums) / tokens)
