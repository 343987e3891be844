"""Stage 3: statistics of the input of every LM attention block (prompt tokens only).

Per-channel abs_mean and abs_max always; with `gram`, also XᵀX (float64) for SVD-LLM whitening,
written to its own directory because it is E×E per layer and only whitening methods need it.
Prompts go through the model `batch_size` at a time on `device`; padding tokens are left out of
every statistic and token count (the batch's attention mask selects the real tokens), so any batch
size gives the same numbers up to float rounding. Sums are float64 on the device.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from tqdm import tqdm

from qsvd.artefacts import clean_stale_temporaries, provenance, write_artefact
from qsvd.models.checkpoint import open_model
from qsvd.models.registry import family_by_name
from qsvd.models.surgery import attention_inputs
from qsvd.stages.calibration import calibration_batches, count_batches

log = logging.getLogger(__name__)
STATISTICS = ("abs_mean", "abs_max")


class ChannelStatistics:
    """Running |x| mean and max per input channel (and optionally XᵀX), per layer, over every token seen."""

    def __init__(self, gram: bool = False) -> None:
        self.abs_sum: dict[int, torch.Tensor] = {}
        self.abs_max: dict[int, torch.Tensor] = {}
        self.gram: dict[int, torch.Tensor] | None = {} if gram else None
        self.tokens: dict[int, int] = {}

    def record(self, layer: int, x: torch.Tensor) -> None:
        """Add every token of x (..., E): each row of x flattened to (tokens, E) counts once."""
        flat = x.detach().reshape(-1, x.shape[-1]).abs().to(torch.float64)
        if layer not in self.tokens:
            self.abs_sum[layer] = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
            self.abs_max[layer] = torch.zeros(flat.shape[1], dtype=torch.float64, device=flat.device)
            self.tokens[layer] = 0
            if self.gram is not None:
                self.gram[layer] = torch.zeros(flat.shape[1], flat.shape[1], dtype=torch.float64, device=flat.device)
        if self.gram is not None:
            signed = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            self.gram[layer] += signed.T @ signed
        self.abs_sum[layer] += flat.sum(0)
        if flat.shape[0]:
            self.abs_max[layer] = torch.maximum(self.abs_max[layer], flat.max(0).values)
        self.tokens[layer] += flat.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """abs_mean, abs_max (float32) and gram (float64) per layer, on the CPU."""
        out = {}
        for layer in sorted(self.tokens):
            out[f"layer.{layer}.abs_mean"] = (self.abs_sum[layer] / self.tokens[layer]).float().cpu()
            out[f"layer.{layer}.abs_max"] = self.abs_max[layer].float().cpu()
            if self.gram is not None:
                out[f"layer.{layer}.gram"] = self.gram[layer].cpu()
        return out


def run_activation_stats(
    model_source: str,
    family: str,
    data_dir: Path,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    gram: bool = False,
    device: str | torch.device = "cpu",
    batch_size: int = 1,
) -> Path:
    """Forward every calibration prompt and store abs_mean / abs_max (and XᵀX with `gram`) per LM layer."""
    clean_stale_temporaries(out_dir)  # what a killed earlier run left beside the output
    model, processor = open_model(model_source, family, dtype, device)
    adapter = family_by_name(family)
    stats = ChannelStatistics(gram)
    current: dict[str, torch.Tensor] = {}  # the attention mask of the batch being forwarded
    batches = calibration_batches(
        processor, adapter, data_dir, with_answer=False, batch_size=batch_size, device=model.device, dtype=dtype
    )
    with torch.no_grad(), attention_inputs(model, adapter, stats.record, token_mask=lambda: current["mask"]):
        for batch in tqdm(batches, total=count_batches(data_dir, batch_size), desc="activation statistics"):
            current["mask"] = batch["attention_mask"]
            model(**batch)
    if not stats.tokens:
        raise ValueError(f"no calibration samples in {data_dir}")
    manifest = provenance(
        "activation_stats",
        {
            "model_source": str(model_source),
            "family": family,
            "data_dir": str(data_dir),
            "dtype": str(dtype),
            "gram": gram,
            "device": str(model.device),  # as resolved ("auto" -> cuda or cpu)
            "batch_size": batch_size,
        },
    )
    manifest["layers"] = [{"layer": l, "tokens": stats.tokens[l]} for l in sorted(stats.tokens)]
    return write_artefact(out_dir, stats.tensors(), manifest)
