"""Model surgery: read the joint QKV weights of every LM layer, swap in low-rank shells, fill them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qsvd.math.cost import LayerShape
from qsvd.math.decompose import JointFactors
from qsvd.models.lowrank import install_lowrank_qkv
from qsvd.models.registry import (
    ModelFamily,
    attention_of,
    decoder_layers,
    qkv_projections,
    set_projection,
)


def layer_shapes(model: nn.Module, family: ModelFamily) -> list[LayerShape]:
    """Input and q/k/v output sizes of every LM attention layer."""
    shapes = []
    for layer in decoder_layers(model, family):
        q, k, v = qkv_projections(layer, family)
        shapes.append(LayerShape(q.in_features, q.out_features, k.out_features, v.out_features))
    return shapes


def joint_qkv_weight(layer: nn.Module, family: ModelFamily) -> torch.Tensor:
    """[W_q; W_k; W_v] of one decoder layer (a copy, float64)."""
    return torch.cat([p.weight.detach().to(torch.float64) for p in qkv_projections(layer, family)])


def install_lowrank_shells(model: nn.Module, family: ModelFamily, ranks: list[int]) -> None:
    """Replace q/k/v of every LM layer by empty low-rank modules of the given ranks."""
    layers = decoder_layers(model, family)
    if len(ranks) != len(layers):
        raise ValueError(f"{len(ranks)} ranks for a model with {len(layers)} LM layers")
    for layer, rank in zip(layers, ranks):
        projections = qkv_projections(layer, family)
        reference = projections[0].weight
        install_lowrank_qkv(
            attention_of(layer, family),
            projections,
            lambda which, module, layer=layer: set_projection(layer, family, which, module),
            rank=rank,
            in_features=projections[0].in_features,
            biases=tuple(p.bias is not None for p in projections),
            dtype=reference.dtype,
            device=reference.device,
        )


def apply_joint_factors(model: nn.Module, family: ModelFamily, factors: list[JointFactors]) -> None:
    """Swap every LM layer's q/k/v for y_p = A_p (B x) + b_p, keeping the original biases."""
    layers = decoder_layers(model, family)
    biases = [[p.bias for p in qkv_projections(layer, family)] for layer in layers]
    install_lowrank_shells(model, family, [len(f.indices) for f in factors])
    with torch.no_grad():
        for layer, layer_factors, layer_biases in zip(layers, factors, biases):
            new = qkv_projections(layer, family)
            new[0].down.weight.copy_(layer_factors.down)
            for up, a, bias in zip(new, layer_factors.up, layer_biases):
                up.weight.copy_(a)
                if bias is not None:
                    up.bias.copy_(bias)


@contextmanager
def attention_inputs(model: nn.Module, family: ModelFamily, record) -> Iterator[None]:
    """Call `record(layer_index, x)` with the input of every LM layer's q/k/v; hooks always removed."""
    handles = []
    try:
        for index, layer in enumerate(decoder_layers(model, family)):
            q = qkv_projections(layer, family)[0]
            handles.append(
                q.register_forward_pre_hook(lambda module, args, index=index: record(index, args[0]))
            )
        yield
    finally:
        for handle in handles:
            handle.remove()
