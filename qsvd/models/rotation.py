"""Rotations of the language model that leave its function unchanged (method §3, QuaRot style).

H1 rotates the LM residual stream by an orthonormal Q: RMSNorm scales are folded into the linears
that read them, then every residual reader gets W Q (the shared low-rank down-projection B
included), every writer Qᵀ W (o_proj, down_proj, the projector's output layer), the embeddings
E Q, LLaVA-NeXT's image_newline v Q, and lm_head W Q. Online rotations make the inputs of down_proj
(order = MLP width) and o_proj (across heads; the head-dim part is folded into V) outlier-free.
H2 rotates each low-rank latent: B ← Rᵀ B, A_p ← A_p R. All folds are done in float64, a Hadamard rotation by
the fast transform (O(n log n) per weight row, not a dense n×n product: at LLaVA-7B's width this is most of the
time of a quantize job).

The vision tower's residual stream is read through LayerNorms, which centre: its rotation Q fixes the
all-ones vector, so centring commutes with it and an affine-free LayerNorm gives LN(hQ) = LN(h) Q
exactly. Each LayerNorm's (γ, b) is folded into its readers (W diag(γ), bias + W b); a LayerNorm that
writes the stream (CLIP's pre_layrnorm) keeps its affine map as a full linear map (diag(γ) Q).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from qsvd.math.hadamard import Rotation, make_rotation, mean_preserving_rotation
from qsvd.models.lowrank import LatentUpProjection, SharedDownProjection
from qsvd.models.quantized import QuantizedLinear
from qsvd.models.registry import (
    ModelFamily,
    attention_of,
    attention_shape,
    decoder_layers,
    part,
    qkv_projections,
    set_part,
    text_config,
    vision_config,
    vision_layers,
)

# Offsets of the seeds of each rotation from the run's seed: one random matrix per role and size.
SEED_OFFSETS = {"residual": 0, "mlp_down": 1, "heads": 2, "head_dim": 3, "latent": 1000,
                "vision_residual": 10, "vision_mlp_down": 11, "vision_heads": 12, "vision_head_dim": 13}


@dataclass
class Rotations:
    """The rotations applied: role -> {"size", "kind", "seed"}, and the matrices of the online "random" ones."""

    roles: dict[str, dict] = field(default_factory=dict)
    matrices: dict[str, torch.Tensor] = field(default_factory=dict)

    def make(self, role: str, size: int, seed: int, online: bool = False) -> Rotation:
        """A new orthonormal rotation for `role`. Where a Hadamard is constructible: a plain one for `online`
        roles (applied to activations at run time), QuaRot's randomized D·H for rotations only folded into
        weights (so seeds give different rotations); else a seeded random orthogonal matrix."""
        return self._record(role, seed, make_rotation(size, seed, randomized=not online))

    def make_mean_preserving(self, role: str, size: int, seed: int) -> Rotation:
        """A new orthonormal rotation for `role` that fixes the all-ones vector (a LayerNorm stream's); folded
        into weights only."""
        return self._record(role, seed, Rotation(size, "mean-preserving", dense=mean_preserving_rotation(size, seed)))

    def _record(self, role: str, seed: int, rotation: Rotation) -> Rotation:
        if role in self.roles:
            raise ValueError(f"rotation {role!r} was already made")
        self.roles[role] = {"size": rotation.size, "kind": rotation.kind, "seed": seed}
        if rotation.kind == "random":
            self.matrices[role] = rotation.matrix.to(torch.float32)
        return rotation

    def online_matrix(self, role: str) -> torch.Tensor | None:
        return self.matrices.get(role)


RowMap = Callable[[torch.Tensor], torch.Tensor]  # x ↦ x·M along the last dimension (a Rotation, or built from them)
ROW_CHUNK = 4096  # weight rows transformed at a time: bounds a fold's float64 temporaries


def _blockwise(rotation: Rotation, blocks: int) -> RowMap:
    """x ↦ x·diag(Q, …, Q), `blocks` copies of Q along the diagonal."""
    return lambda x: rotation(x.reshape(*x.shape[:-1], blocks, rotation.size)).reshape(x.shape)


def _kronecker(outer: Rotation, inner: Rotation) -> RowMap:
    """x ↦ x·(A ⊗ B) for A = `outer`, B = `inner`: B within each block of x, then A across the blocks."""
    def apply(x: torch.Tensor) -> torch.Tensor:
        blocks = inner(x.reshape(*x.shape[:-1], outer.size, inner.size))
        return outer(blocks.transpose(-1, -2)).transpose(-1, -2).reshape(x.shape)
    return apply


def _rows(transform: RowMap, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([transform(chunk.contiguous()) for chunk in x.split(ROW_CHUNK)])


def _fold(module: nn.Module, left: RowMap | None = None, right: RowMap | None = None) -> None:
    """weight ← Lᵀ · weight · R (and bias ← Lᵀ · bias) for the maps x ↦ x·L and x ↦ x·R, in float64; a
    convolution's weight as (output channels, everything else)."""
    with torch.no_grad():
        weight = module.weight.to(torch.float64).flatten(1)
        if left is not None:
            weight = _rows(left, weight.T).T  # Lᵀ W = (Wᵀ L)ᵀ
            if getattr(module, "bias", None) is not None:
                module.bias.copy_(left(module.bias.to(torch.float64)).to(module.bias.dtype))
        if right is not None:
            weight = _rows(right, weight)
        module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight.dtype))


def attention_readers(layer: nn.Module, family: ModelFamily) -> list[nn.Module]:
    """The modules that read a decoder layer's normalised attention input: dense q/k/v and shared down-projections."""
    readers: list[nn.Module] = []
    for projection in qkv_projections(layer, family):
        reader = projection.down if isinstance(projection, LatentUpProjection) else projection
        if not any(reader is seen for seen in readers):
            readers.append(reader)
    return readers


def _norm_weight(norm: nn.Module, where: str) -> nn.Parameter:
    if getattr(norm, "bias", None) is not None or not hasattr(norm, "weight"):
        raise TypeError(f"{where} is a {type(norm).__name__}: only RMSNorm-style norms (a scale, no bias) fold into an LM rotation")
    return norm.weight


def fold_norms(model: nn.Module, family: ModelFamily) -> None:
    """Move every LM RMSNorm scale into the linears that read its output; the norms keep scale 1."""
    groups = []
    for index, layer in enumerate(decoder_layers(model, family)):
        groups.append((part(layer, family.attention_norm, family), attention_readers(layer, family), f"layer {index} attention norm"))
        groups.append((part(layer, family.mlp_norm, family), [part(layer, p, family) for p in family.mlp_inputs], f"layer {index} MLP norm"))
    groups.append((part(model, family.final_norm, family), [part(model, family.lm_head, family)], "the final norm"))
    with torch.no_grad():
        for norm, readers, where in groups:
            scale = _norm_weight(norm, where).to(torch.float64)
            for reader in readers:
                _fold(reader, right=lambda x, scale=scale: x * scale.to(x.device))  # W·diag(γ)
            norm.weight.fill_(1.0)


def untie_lm_head(model: nn.Module, family: ModelFamily) -> None:
    """Give lm_head its own weight where it shares the embeddings' (they rotate differently)."""
    head, embeddings = part(model, family.lm_head, family), part(model, family.embeddings, family)
    if head.weight is embeddings.weight or head.weight.data_ptr() == embeddings.weight.data_ptr():
        head.weight = nn.Parameter(embeddings.weight.detach().clone())
    set_tied_embeddings(model.config, False)


def set_tied_embeddings(config, tie: bool) -> None:
    """tie_word_embeddings = `tie` on `config` and on its text config (a VLM's LM reads the latter)."""
    for each in {id(c): c for c in (config, config.get_text_config())}.values():
        each.tie_word_embeddings = tie


def _quantized(root: nn.Module, path: str, family: ModelFamily) -> QuantizedLinear:
    module = QuantizedLinear.from_linear(part(root, path, family))
    set_part(root, path, module, family)
    return module


def _set_online_rotation(layer: nn.Module, path: str, rotations: Rotations, role: str, family: ModelFamily) -> None:
    """Rotate the input of the linear at `path` online by the recorded `role` (across blocks when it is smaller)."""
    recorded = rotations.roles[role]
    linear = _quantized(layer, path, family)
    linear.input_transform.set_rotation(recorded["kind"], recorded["size"], rotations.online_matrix(role))


def install_online_rotations(model: nn.Module, family: ModelFamily, rotations: Rotations) -> None:
    """Set the online rotations recorded in `rotations` on every down_proj and o_proj input of the LM, and of
    fc2 and out_proj of the vision tower where it was rotated (also on reload)."""
    stacks = [(decoder_layers(model, family), "", family.mlp_output, f"{family.attention}.{family.o_proj}")]
    if "vision_residual" in rotations.roles:
        stacks.append((vision_layers(model, family), "vision_", family.vision_mlp_output, family.vision_attention_output))
    for layers, prefix, mlp_output, attention_output in stacks:
        for layer in layers:
            for role, path in ((f"{prefix}mlp_down", mlp_output), (f"{prefix}heads", attention_output)):
                if role in rotations.roles:
                    _set_online_rotation(layer, path, rotations, role, family)


def install_rotated_modules(model: nn.Module, family: ModelFamily, rotations: Rotations) -> None:
    """Rebuild, before loading a rotated checkpoint's tensors, what its rotations changed in the architecture."""
    if "vision_residual" in rotations.roles:
        install_vision_shells(model, family)
    install_online_rotations(model, family, rotations)


def rotate_language_model(model: nn.Module, family: ModelFamily, seed: int) -> Rotations:
    """Apply H1 and the online rotations to the LM of `model` in place; the function is unchanged."""
    shape = attention_shape(model)
    config = text_config(model)
    rotations = Rotations()
    untie_lm_head(model, family)
    fold_norms(model, family)
    residual = rotations.make("residual", shape.hidden_size, seed + SEED_OFFSETS["residual"])
    mlp_down = rotations.make("mlp_down", config.intermediate_size, seed + SEED_OFFSETS["mlp_down"], online=True)
    heads = rotations.make("heads", shape.num_heads, seed + SEED_OFFSETS["heads"], online=True)
    head_dim = rotations.make("head_dim", shape.head_dim, seed + SEED_OFFSETS["head_dim"])
    with torch.no_grad():
        _fold(part(model, family.embeddings, family), right=residual)  # a table's rows are stream vectors: E Q
        for layer in decoder_layers(model, family):
            for reader in attention_readers(layer, family) + [part(layer, p, family) for p in family.mlp_inputs]:
                _fold(reader, right=residual)
            v_proj = qkv_projections(layer, family)[2]
            _fold(v_proj, left=_blockwise(head_dim, shape.num_kv_heads))
            _fold(part(attention_of(layer, family), family.o_proj, family), left=residual, right=_kronecker(heads, head_dim))
            _fold(part(layer, family.mlp_output, family), left=residual, right=mlp_down)
        _fold(part(model, family.lm_head, family), right=residual)
        if family.projector_output is not None:
            _fold(part(model, family.projector_output, family), left=residual)
        if family.image_newline is not None:
            newline = part(model, family.image_newline, family)
            newline.copy_(residual(newline.to(torch.float64)).to(newline.dtype))
    install_online_rotations(model, family, rotations)
    return rotations


class LinearAffineLayerNorm(nn.Module):
    """A LayerNorm whose affine map is a full linear map: one that writes a rotated residual stream, where
    diag(γ)·Q is no longer diagonal."""

    def __init__(self, features: int, eps: float, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(features, eps=eps, elementwise_affine=False, device=device, dtype=dtype)
        self.linear = nn.Linear(features, features, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(x))


def _layer_norm_affine(norm: nn.Module, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ, b) of a LayerNorm, float64."""
    if not isinstance(norm, nn.LayerNorm) or norm.weight is None or norm.bias is None:
        raise TypeError(f"{where} is a {type(norm).__name__}: the vision rotation needs an nn.LayerNorm with a scale "
                        f"and a bias there; fix the family's vision_* paths in qsvd/models/registry.py")
    return norm.weight.to(torch.float64), norm.bias.to(torch.float64)


def _fold_layer_norm(norm: nn.Module, readers: list[nn.Module], where: str, blocks: int = 1) -> None:
    """Move a LayerNorm's (γ, b) into the linears that read `blocks` of its outputs side by side:
    W ← W·diag(γ), bias ← bias + W·b. The norm keeps γ = 1, b = 0."""
    scale, shift = (t.repeat(blocks) for t in _layer_norm_affine(norm, where))
    with torch.no_grad():
        for reader in readers:
            if reader.bias is None:
                raise ValueError(f"a linear reading {where} has no bias to take the norm's shift b")
            weight = reader.weight.to(torch.float64)
            reader.bias.copy_((reader.bias.to(torch.float64) + weight @ shift).to(reader.bias.dtype))
            reader.weight.copy_((weight * scale).to(reader.weight.dtype))
        norm.weight.fill_(1.0)
        norm.bias.zero_()


def _rotate_writer(writer: nn.Module, rotation: Rotation, where: str) -> None:
    """The stream state `writer` produces becomes h·Q: output channels of a conv or linear, rows of a table."""
    if isinstance(writer, (nn.Linear, nn.Conv2d)):
        _fold(writer, left=rotation)
    elif isinstance(writer, nn.Embedding):
        _fold(writer, right=rotation)
    else:
        raise TypeError(f"{where} is a {type(writer).__name__}: a vision stream writer must be a Linear, Conv2d or "
                        f"Embedding; fix vision_embeddings of the family in qsvd/models/registry.py")


def _stream_blocks(reader: nn.Linear, width: int, where: str) -> int:
    """How many stream vectors of `width` the connector's reader takes side by side (pixel shuffle, feature layers)."""
    if reader.in_features % width:
        raise ValueError(f"{where} reads {reader.in_features} features, not a multiple of the vision width {width}: "
                         f"it does not read whole vision tokens; fix vision_output_reader in qsvd/models/registry.py")
    return reader.in_features // width


def install_vision_shells(model: nn.Module, family: ModelFamily) -> None:
    """Give the vision tower the parameters its rotation adds: the pre-norm's full affine map and a bias on the
    connector's reader where a post-norm's shift folds into it (unset values)."""
    if family.vision_pre_norm is not None:
        norm = part(model, family.vision_pre_norm, family)
        _layer_norm_affine(norm, family.vision_pre_norm)
        shell = LinearAffineLayerNorm(norm.normalized_shape[-1], norm.eps, device=norm.weight.device, dtype=norm.weight.dtype)
        set_part(model, family.vision_pre_norm, shell, family)
    reader = part(model, family.vision_output_reader, family)
    if family.vision_post_norm is not None and reader.bias is None:
        reader.bias = nn.Parameter(torch.zeros(reader.out_features, device=reader.weight.device, dtype=reader.weight.dtype))


def rotate_vision_tower(model: nn.Module, family: ModelFamily, seed: int, rotations: Rotations) -> None:
    """Apply H1 (a mean-preserving Q) and the online rotations to the vision tower in place, recorded in
    `rotations`; the function is unchanged."""
    config = vision_config(model, family)
    width, num_heads = config.hidden_size, config.num_attention_heads
    if family.vision_output_reader is None:
        raise ValueError(f"family {family.name!r} names no vision_output_reader in qsvd/models/registry.py")
    layers = vision_layers(model, family)
    reader = part(model, family.vision_output_reader, family)
    blocks = _stream_blocks(reader, width, family.vision_output_reader)
    pre_norm = None
    if family.vision_pre_norm is not None:
        pre_norm = _layer_norm_affine(part(model, family.vision_pre_norm, family), family.vision_pre_norm)
    for index, layer in enumerate(layers):
        _fold_layer_norm(part(layer, family.vision_attention_norm, family), [part(layer, p, family) for p in family.vision_qkv],
                         f"vision layer {index} attention norm")
        _fold_layer_norm(part(layer, family.vision_mlp_norm, family), [part(layer, p, family) for p in family.vision_mlp_inputs],
                         f"vision layer {index} MLP norm")
    install_vision_shells(model, family)
    if family.vision_post_norm is not None:
        _fold_layer_norm(part(model, family.vision_post_norm, family), [reader], family.vision_post_norm, blocks)
    residual = rotations.make_mean_preserving("vision_residual", width, seed + SEED_OFFSETS["vision_residual"])
    mlp_down = rotations.make("vision_mlp_down", config.intermediate_size, seed + SEED_OFFSETS["vision_mlp_down"], online=True)
    heads = rotations.make("vision_heads", num_heads, seed + SEED_OFFSETS["vision_heads"], online=True)
    head_dim = rotations.make("vision_head_dim", width // num_heads, seed + SEED_OFFSETS["vision_head_dim"])
    with torch.no_grad():
        for path in family.vision_embeddings:
            _rotate_writer(part(model, path, family), residual, path)
        if pre_norm is not None:
            scale, shift = pre_norm
            affine = part(model, family.vision_pre_norm, family).linear
            affine.weight.copy_((residual.matrix.T * scale).to(affine.weight.dtype))  # (diag(γ)·Q)ᵀ
            affine.bias.copy_(residual(shift).to(affine.bias.dtype))
        for layer in layers:
            for reader_path in (*family.vision_qkv, *family.vision_mlp_inputs):
                _fold(part(layer, reader_path, family), right=residual)
            _fold(part(layer, family.vision_qkv[2], family), left=_blockwise(head_dim, num_heads))
            _fold(part(layer, family.vision_attention_output, family), left=residual, right=_kronecker(heads, head_dim))
            _fold(part(layer, family.vision_mlp_output, family), left=residual, right=mlp_down)
        _fold(reader, right=_blockwise(residual, blocks))
    install_online_rotations(model, family, rotations)


def latent_modules(model: nn.Module, family: ModelFamily) -> list[tuple[SharedDownProjection, list[LatentUpProjection]]]:
    """Every shared down-projection of the LM with the up-projections that read its latent, in layer order."""
    found = []
    for layer in decoder_layers(model, family):
        ups = [p for p in qkv_projections(layer, family) if isinstance(p, LatentUpProjection)]
        for down in {id(up.down): up.down for up in ups}.values():
            found.append((down, [up for up in ups if up.down is down]))
    return found


def rotate_latents(model: nn.Module, family: ModelFamily, seed: int, rotations: Rotations) -> list[torch.Tensor]:
    """H2: rotate each latent C by its own seeded orthonormal R (B ← Rᵀ B, A_p ← A_p R); recorded per unit.

    Returns the R of every latent, in `latent_modules` order (float64)."""
    matrices = []
    for index, (down, ups) in enumerate(latent_modules(model, family)):
        rotation = rotations.make(f"latent.{index}", down.rank, seed + SEED_OFFSETS["latent"] + index)
        _fold(down, left=rotation)
        for up in ups:
            _fold(up, right=rotation)
        matrices.append(rotation.matrix)
    return matrices
