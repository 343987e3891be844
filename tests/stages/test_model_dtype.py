"""Every model-reading stage holds a bfloat16 model in bfloat16: no stage makes a float32 copy of it."""

import pytest
import torch
import transformers
from torch import nn

from qsvd.artefacts import read_json
from qsvd.models.checkpoint import load_checkpoint
from qsvd.stages.activation_stats import run_activation_stats
from qsvd.stages.decompose import run_decompose
from qsvd.stages.evaluate import run_evaluate
from qsvd.stages.importance import run_importance
from qsvd.stages.lowrank_model import run_lowrank_model
from qsvd.stages.quantize import QuantSpec, run_quantize
from qsvd.stages.rank_plan import run_rank_plan
from tests.stages.test_pipeline_tiny import dataset  # noqa: F401  (fixture)

pytestmark = pytest.mark.unit


class Float32Copies:
    """Records every way a whole model can end up in float32: loaded so, built so, or converted so."""

    def __init__(self, monkeypatch):
        self.events: list[str] = []
        original_from_pretrained = transformers.PreTrainedModel.from_pretrained.__func__
        original_post_init = transformers.PreTrainedModel.post_init
        original_to, original_float = nn.Module.to, nn.Module.float
        spy = self

        def from_pretrained(cls, *args, **kwargs):
            if kwargs.get("dtype") not in (torch.bfloat16, "bfloat16"):
                spy.events.append(f"{cls.__name__}.from_pretrained(dtype={kwargs.get('dtype')})")
            return original_from_pretrained(cls, *args, **kwargs)

        def post_init(self):
            if any(p.dtype == torch.float32 and not p.is_meta for p in self.parameters()):
                spy.events.append(f"{type(self).__name__} built with float32 parameters")
            return original_post_init(self)

        def to(self, *args, **kwargs):
            if isinstance(self, transformers.PreTrainedModel) and torch.float32 in (*args, kwargs.get("dtype")):
                spy.events.append(f"{type(self).__name__}.to(float32)")
            return original_to(self, *args, **kwargs)

        def to_float(self):
            if isinstance(self, transformers.PreTrainedModel):
                spy.events.append(f"{type(self).__name__}.float()")
            return original_float(self)

        monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
        monkeypatch.setattr(transformers.PreTrainedModel, "post_init", post_init)
        monkeypatch.setattr(nn.Module, "to", to)
        monkeypatch.setattr(nn.Module, "float", to_float)


@pytest.mark.parametrize("family", ["llava", "llama"])
def test_no_stage_makes_a_float32_copy_of_a_bfloat16_model(tiny_model, dataset, tmp_path, monkeypatch, family):  # noqa: F811
    model, processor = tiny_model(family, kv_heads=4 if family == "llava" else 2)
    source = tmp_path / "model"
    model.to(torch.bfloat16).save_pretrained(source)
    processor.save_pretrained(source)
    copies = Float32Copies(monkeypatch)
    bf16 = torch.bfloat16

    stats = run_activation_stats(str(source), family, dataset, tmp_path / "stats", bf16, device="cpu")
    decomposition = run_decompose(str(source), family, stats, "joint", "abs_mean", 0.5, tmp_path / "svd", dtype=bf16, device="cpu")
    importance = run_importance(str(source), family, decomposition, dataset, tmp_path / "importance", dtype=bf16, device="cpu")
    plan = run_rank_plan(decomposition, importance, "importance", "R1", 0.8, 1, tmp_path / "plan.json")
    lowrank = run_lowrank_model(str(source), family, decomposition, plan, 0.2, tmp_path / "lowrank", dtype=bf16, device="cpu")
    quantized = run_quantize(str(lowrank), family, dataset, QuantSpec(weight_bits=4, act_bits=8), tmp_path / "quantized",
                             dtype=bf16, device="cpu")
    for checkpoint in (lowrank, quantized):
        run_evaluate(str(checkpoint), family, dataset, tmp_path / checkpoint.name / "eval.json", 2, {}, bf16, device="cpu")

    assert copies.events == []
    for checkpoint in (lowrank, quantized):
        assert read_json(checkpoint / "manifest.json")["dtype"] == "bfloat16"
        reloaded, _, _ = load_checkpoint(checkpoint)
        assert {p.dtype for p in reloaded.parameters()} == {torch.bfloat16}
