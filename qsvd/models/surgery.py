"""Model surgery: read the q/k/v weights of every LM layer, swap in low-rank shells, fill them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qsvd.math.cost import LayerShape, layout_units
from qsvd.math.decompose import JointFactors
from qsvd.models.lowrank import install_lowrank_group
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


def group_projections(layer: nn.Module, family: ModelFamily, group: str) -> tuple[nn.Module, ...]:
    """The projections named by `group` ("qkv", "k", ...) of one decoder layer, in that order."""
    q, k, v = qkv_projections(layer, family)
    return tuple({"q": q, "k": k, "v": v}[p] for p in group)


def group_weight(layer: nn.Module, family: ModelFamily, group: str) -> torch.Tensor:
    """The stacked weights of `group`, e.g. [W_q; W_k; W_v] for "qkv" (a copy, float64)."""
    return torch.cat([p.weight.detach().to(torch.float64) for p in group_projections(layer, family, group)])


def install_lowrank_shells(
    model: nn.Module,
    family: ModelFamily,
    layout: str,
    ranks: list[int],
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Replace every unit of `layout` (e.g. each layer's joint q/k/v) by empty low-rank modules of the given ranks,
    in `dtype` on `device` (default: those of the weights they replace; "meta" for shells filled by loading)."""
    layers = decoder_layers(model, family)
    units = layout_units(layer_shapes(model, family), layout)
    if len(ranks) != len(units):
        raise ValueError(f"{len(ranks)} ranks for {len(units)} units ({layout!r} layout, {len(layers)} LM layers)")
    for unit, rank in zip(units, ranks):
        layer = layers[unit.layer]
        projections = group_projections(layer, family, unit.group)
        reference = projections[0].weight
        install_lowrank_group(
            attention_of(layer, family),
            unit.group,
            projections,
            lambda which, module, layer=layer: set_projection(layer, family, which, module),
            rank=rank,
            in_features=projections[0].in_features,
            biases=tuple(p.bias is not None for p in projections),
            dtype=dtype or reference.dtype,
            device=device or reference.device,
        )


def apply_factors(
    model: nn.Module, family: ModelFamily, layout: str, factors: Iterable[JointFactors], ranks: list[int] | None = None
) -> None:
    """Swap every unit's projections for y_p = A_p (B x) + b_p (one `factors` entry per unit), keeping biases.

    `factors` may be a generator: with `ranks` given, each unit's factors are made, copied and dropped in turn."""
    layers = decoder_layers(model, family)
    units = layout_units(layer_shapes(model, family), layout)
    biases = [[p.bias for p in group_projections(layers[u.layer], family, u.group)] for u in units]
    if ranks is None:
        factors = list(factors)
        ranks = [len(f.indices) for f in factors]
    install_lowrank_shells(model, family, layout, ranks)
    with torch.no_grad():
        for unit, unit_factors, unit_biases in zip(units, factors, biases, strict=True):
            new = group_projections(layers[unit.layer], family, unit.group)
            new[0].down.weight.copy_(unit_factors.down)
            for up, a, bias in zip(new, unit_factors.up, unit_biases):
                up.weight.copy_(a)
                if bias is not None:
                    up.bias.copy_(bias)


def apply_truncated_svd(model: nn.Module, family: ModelFamily, layout: str, fraction: float) -> list[int]:
    """Replace every unit by its plain (unscaled) truncated SVD at `fraction` of its full rank, half of σ on each
    factor; returns the ranks. The uncompressed model at fraction 1: for tests and benchmarks, not the method."""
    from qsvd.math.decompose import joint_factors, scaled_svd

    if not 0 < fraction <= 1:
        raise ValueError(f"rank fraction must be in (0, 1], got {fraction}")
    shapes = layer_shapes(model, family)
    layers = decoder_layers(model, family)
    units = layout_units(shapes, layout)
    ranks = [max(1, round(fraction * unit.max_rank)) for unit in units]

    factors = []
    for unit, rank in zip(units, ranks):  # all before any shell is installed: they replace what is read here
        weight = group_weight(layers[unit.layer], family, unit.group)
        svd = scaled_svd(weight, torch.ones(weight.shape[1], dtype=torch.float64))
        factors.append(joint_factors(svd, torch.arange(rank), 0.5, [shapes[unit.layer].out(p) for p in unit.group]))
    apply_factors(model, family, layout, factors, ranks)
    return ranks


@contextmanager
def attention_inputs(
    model: nn.Module,
    family: ModelFamily,
    record: Callable[[int, torch.Tensor], None],
    token_mask: Callable[[], torch.Tensor | None] | None = None,
) -> Iterator[None]:
    """Call `record(layer_index, x)` with the input of every LM layer's q/k/v; hooks always removed.

    x is what the projection sees, (batch, tokens, E). With `token_mask`, a function returning the
    (batch, tokens) attention mask of the forward in progress (None: every token), x is instead
    (real tokens, E): the rows where that mask is nonzero, so padding never reaches `record`.
    """

    def observe(index: int, x: torch.Tensor) -> None:
        mask = token_mask() if token_mask is not None else None
        if mask is None:
            record(index, x)
            return
        if mask.shape != x.shape[:-1]:
            raise ValueError(
                f"token mask of shape {tuple(mask.shape)} does not match layer {index}'s input {tuple(x.shape)}: "
                "give the attention_mask of the batch being forwarded"
            )
        record(index, x[mask.to(device=x.device, dtype=torch.bool)])

    handles = []
    try:
        for index, layer in enumerate(decoder_layers(model, family)):
            q = qkv_projections(layer, family)[0]
            handles.append(q.register_forward_pre_hook(lambda module, args, index=index: observe(index, args[0])))
        yield
    finally:
        for handle in handles:
            handle.remove()
