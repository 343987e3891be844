"""Quantized layers: which linears the quantization stage targets, and `QuantizedLinear`.

`QuantizedLinear` is an nn.Linear whose input goes through an `InputTransform`; the low-rank
modules carry their own (`SharedDownProjection.input_transform` / `.latent_transform`). This is
simulated quantization: weights hold their dequantized values, activations are rounded in floating point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qsvd.models.input_transform import InputTransform
from qsvd.models.lowrank import LatentUpProjection, SharedDownProjection
from qsvd.models.registry import ModelFamily, part


class QuantizedLinear(nn.Linear):
    """An nn.Linear whose input goes through an `InputTransform` (online rotation, activation quantization)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.input_transform = InputTransform(in_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantizedLinear:
        """The same layer (sharing its weight and bias tensors) with an identity input transform."""
        if isinstance(linear, QuantizedLinear):
            return linear
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.input_transform(x), self.weight, self.bias)


@dataclass(frozen=True)
class Target:
    """One layer whose weight (and input) the quantization stage quantizes."""

    name: str  # its module path in the model
    part: str  # "lm", "vision", "projector" (their own activation clip ratios) or "vocabulary" (embeddings, lm_head)
    kind: str  # "linear", "latent_down" (B, reading x; it also quantizes the latent), "latent_up" (A_p) or "embedding"


def quantization_targets(model: nn.Module, family: ModelFamily, vision: bool, vocabulary: bool = False) -> list[Target]:
    """Every linear of the LM decoder layers (low-rank factors included), with `vision` every linear of the
    vision encoder layers and the projector, and with `vocabulary` the LM's embedding table and lm_head."""
    roots = [(family.decoder_layers, "lm")]
    if vision:
        if not family.multimodal:
            raise ValueError(f"vision quantization was requested but family {family.name!r} has no vision tower")
        roots += [(family.vision_layers, "vision"), (family.projector, "projector")]
    targets = []
    for root, part_name in roots:
        module = part(model, root, family)
        for name, child in module.named_modules():  # the root first: SmolVLM's projector is itself a Linear
            kind = "latent_down" if isinstance(child, SharedDownProjection) else "latent_up" if isinstance(child, LatentUpProjection) else (
                "linear" if isinstance(child, nn.Linear) else None
            )
            if kind is not None:
                targets.append(Target(f"{root}.{name}" if name else root, part_name, kind))
    if vocabulary:
        targets += [Target(family.embeddings, "vocabulary", "embedding"), Target(family.lm_head, "vocabulary", "linear")]
    return targets


def input_transforms(model: nn.Module, target: Target) -> list[tuple[str, InputTransform]]:
    """The activation quantizers that feed `target`'s matmuls, by role; nn.Linear targets become QuantizedLinear."""
    module = model.get_submodule(target.name)
    if target.kind in ("latent_up", "embedding"):
        return []  # A_p's input is the latent, quantized once by the shared down-projection's latent_transform
    if target.kind == "latent_down":
        return [("input", module.input_transform), ("latent", module.latent_transform)]
    if not isinstance(module, QuantizedLinear):
        parent, _, child = target.name.rpartition(".")
        module = QuantizedLinear.from_linear(module)
        setattr(model.get_submodule(parent), child, module)
    return [("input", module.input_transform)]
