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
    if ids.shape[0] != 1:
        raise ValueError(f"sequence_nll takes one sequence of at least 2 tokens, got input_ids of shape {tuple(ids.shape)}")
    return sequence_nlls(model, batch)[0]


@torch.no_grad()
def sequence_nlls(model: nn.Module, batch: BatchFeature) -> list[tuple[float, int]]:
    """(summed next-token NLL, predicted tokens) of every sequence of a batch, padding excluded.

    Sequences are right-padded (as `pad_batch` pads forward-only batches): a sequence's real tokens
    are where `attention_mask` is 1, and a token is predicted when it and the token before it are real.
    Each sequence's sum is that of its own forward alone, up to float rounding.
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    lengths = mask.sum(1)
    if ids.shape[1] < 2 or int(lengths.min()) < 2:
        raise ValueError(f"sequence_nll takes sequences of at least 2 tokens, got lengths {lengths.tolist()} (input_ids {tuple(ids.shape)})")
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    logits = model(**inputs).logits[:, :-1]
    predicted = mask[:, 1:] & mask[:, :-1]
    results = []
    for row in range(ids.shape[0]):
        keep = predicted[row]
        nll = F.cross_entropy(logits[row][keep].float(), ids[row, 1:][keep], reduction="sum")
        results.append((nll.item(), int(keep.sum())))
    return results


@torch.no_grad()
def decoded_nll(model: nn.Module, input_ids: torch.Tensor, cache, cache_argument: str = "cache") -> tuple[float, int]:
    """`sequence_nll` of one sequence fed one token at a time through `cache` (any transformers cache, passed by
    the keyword `cache_argument`), so every prediction reads the cache as generation does."""
    if input_ids.shape[0] != 1 or input_ids.shape[1] < 2:
        raise ValueError(f"decoded_nll takes one sequence of at least 2 tokens, got input_ids of shape {tuple(input_ids.shape)}")
    total = 0.0
    for t in range(input_ids.shape[1] - 1):
        logits = model(input_ids=input_ids[:, t:t + 1], use_cache=True, **{cache_argument: cache}).logits[0, -1]
        total += F.cross_entropy(logits.float()[None], input_ids[0, t + 1:t + 2], reduction="sum").item()
    return total, input_ids.shape[1] - 1


def perplexity(nll_sums: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(total NLL / total predicted tokens): every token weighs the same, whatever its sequence."""
    tokens = sum(token_counts)
    if tokens == 0:
        raise ValueError("perplexity of no predicted tokens")
    return math.exp(math.fsum(nll_sums) / tokens)
