"""Gradient checkpointing in the importance stage: the same scores, the LM decoder layers really recomputed."""

import pytest
import torch

import qsvd.stages.importance as importance_stage
from qsvd.artefacts import read_artefact
from qsvd.models.registry import attention_of, decoder_layers, family_by_name
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.decompose import run_decompose
from qsvd.stages.importance import recomputed_in_backward, run_importance
from tests.conftest import FAMILY_CASES
from tests.stages.test_pipeline_tiny import dataset  # noqa: F401  (fixture)

pytestmark = pytest.mark.unit


class AttentionCalls:
    """Counts the forward calls of every LM attention module of the model the importance stage opens."""

    def __init__(self, monkeypatch, family: str):
        self.count = 0
        self.models = []
        original = importance_stage.open_model

        def open_model(*args, **kwargs):
            model, processor = original(*args, **kwargs)
            for layer in decoder_layers(model, family_by_name(family)):
                attention_of(layer, family_by_name(family)).register_forward_pre_hook(self._called)
            self.models.append(model)
            return model, processor

        monkeypatch.setattr(importance_stage, "open_model", open_model)

    def _called(self, module, args):
        self.count += 1


@pytest.mark.parametrize("family,kv_heads", [pytest.param(f, k, id=f"{f}-kv{k}") for f, k in FAMILY_CASES])
def test_checkpointing_gives_the_same_scores_and_recomputes_every_layer(
    family, kv_heads, saved_tiny_model, dataset, tmp_path, monkeypatch  # noqa: F811
):
    source, model, _ = saved_tiny_model(family, kv_heads)
    stats = run_activation_stats(str(source), family, dataset, tmp_path / "stats", device="cpu")
    decomposition = run_decompose(str(source), family, stats, "joint", "abs_mean", 0.5, tmp_path / "svd", device="cpu")
    layers, samples = len(decoder_layers(model, family_by_name(family))), 3
    scores, calls = {}, {}
    for checkpointing in (False, True):
        counter = AttentionCalls(monkeypatch, family)
        out = run_importance(str(source), family, decomposition, dataset, tmp_path / f"importance-{checkpointing}",
                             device="cpu", gradient_checkpointing=checkpointing)
        scores[checkpointing], manifest = read_artefact(out)
        calls[checkpointing] = counter.count
        assert manifest["config"]["gradient_checkpointing"] is checkpointing
        layer = decoder_layers(counter.models[0], family_by_name(family))[0]
        assert "forward" not in vars(layer) and not layer.training  # unwrapped after, still in eval mode

    assert calls[False] == layers * samples
    assert calls[True] == 2 * layers * samples  # the forward, then the recompute in the backward
    assert scores[True].keys() == scores[False].keys()
    for name, expected in scores[False].items():
        torch.testing.assert_close(scores[True][name], expected, rtol=1e-6, atol=1e-12 * expected.abs().max().item())


def test_the_wrapping_is_undone_when_the_body_raises(tiny_model):
    model, _ = tiny_model("llama", kv_heads=1)
    layers = decoder_layers(model, family_by_name("llama"))
    with pytest.raises(RuntimeError, match="stop"), recomputed_in_backward(layers):
        assert all("forward" in vars(layer) for layer in layers)
        raise RuntimeError("stop")
    assert all("forward" not in vars(layer) for layer in layers)
