import math

import pytest
import torch
from transformers import BatchFeature

from qsvd.evaluation.perplexity import perplexity, sequence_nll

pytestmark = pytest.mark.unit


def _brute_force_nll(model, ids: torch.Tensor) -> float:
    """-Σ_t log p(ids[t] | ids[:t]), each term from its own forward pass over the prefix alone."""
    total = 0.0
    with torch.no_grad():
        for t in range(1, ids.shape[1]):
            logits = model(input_ids=ids[:, :t]).logits[0, -1].double()
            total -= torch.log_softmax(logits, dim=-1)[ids[0, t]].item()
    return total


def test_sequence_nll_equals_brute_force_over_prefixes(tiny_model):
    model, tokenizer = tiny_model("llama", kv_heads=2)
    ids = torch.randint(0, len(tokenizer), (1, 12), generator=torch.Generator().manual_seed(0))
    nll, tokens = sequence_nll(model, BatchFeature({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}))
    assert tokens == 11
    assert nll == pytest.approx(_brute_force_nll(model, ids), rel=1e-5)
    with torch.no_grad():  # the model's own shifted loss is the mean of the same terms
        assert model(input_ids=ids, labels=ids).loss.item() == pytest.approx(nll / tokens, rel=1e-5)


def test_perplexity_weighs_every_token_equally():
    assert perplexity([2.0, 6.0], [1, 3]) == pytest.approx(math.exp(8.0 / 4))
    assert perplexity([0.0], [5]) == 1.0
    with pytest.raises(ValueError, match="no predicted tokens"):
        perplexity([], [])


def test_sequence_nll_rejects_what_it_cannot_score(tiny_model):
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sequence_nll(model, BatchFeature({"input_ids": torch.tensor([[5]])}))
