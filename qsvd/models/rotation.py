"""Rotations of the language model that leave its function unchanged (method §3, QuaRot style).

H1 rotates the LM residual stream by an orthonormal Q: RMSNorm scales are folded into the linears
that read them, then every residual reader gets W Q (the shared low-rank down-projection B
included), every writer Qᵀ W (o_proj, down_proj, the projector's output layer), the embeddings
E Q, LLaVA-NeXT's image_newline v Q, and lm_head W Q. Online rotations make the inputs of down_proj
(order = MLP width) and o_proj (across heads; the head-dim part is folded into V) outlier-free.
H2 rotates each low-rank latent: B ← Rᵀ B, A_p ← A_p R. All folds are done in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qsvd.math.hadamard import rotation_matrix
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
)

# Offsets of the seeds of each rotation from the run's seed: one random matrix per role and size.
SEED_OFFSETS = {"residual": 0, "mlp_down": 1, "heads": 2, "head_dim": 3, "latent": 1000}


@dataclass
class Rotations:
    """The rotations applied: role -> {"size", "kind", "seed"}, and the matrices of the online "random" ones."""

    roles: dict[str, dict] = field(default_factory=dict)
    matrices: dict[str, torch.Tensor] = field(default_factory=dict)

    def make(self, role: str, size: int, seed: int, online: bool = False) -> torch.Tensor:
        """A new orthonormal matrix for `role`, float64. Where a Hadamard is constructible: a plain one for
        `online` roles (applied to activations at run time), QuaRot's randomized D·H for rotations only
        folded into weights (so seeds give different rotations); else a seeded random orthogonal matrix."""
        if role in self.roles:
            raise ValueError(f"rotation {role!r} was already made")
        matrix, kind = rotation_matrix(size, seed, randomized=not online)
        self.roles[role] = {"size": size, "kind": kind, "seed": seed}
        if kind == "random":
            self.matrices[role] = matrix.to(torch.float32)
        return matrix

    def online_matrix(self, role: str) -> torch.Tensor | None:
        return self.matrices.get(role)


def _fold(module: nn.Module, left: torch.Tensor | None = None, right: torch.Tensor | None = None) -> None:
    """weight ← leftᵀ · weight · right (and bias ← leftᵀ · bias), computed in float64."""
    with torch.no_grad():
        weight = module.weight.to(torch.float64)
        if left is not None:
            weight = left.T @ weight
            if getattr(module, "bias", None) is not None:
                module.bias.copy_((left.T @ module.bias.to(torch.float64)).to(module.bias.dtype))
        if right is not None:
            weight = weight @ right
        module.weight.copy_(weight.to(module.weight.dtype))


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
                _fold(reader, right=torch.diag(scale))
            norm.weight.fill_(1.0)


def untie_lm_head(model: nn.Module, family: ModelFamily) -> None:
    """Give lm_head its own weight where it shares the embeddings' (they rotate differently)."""
    head, embeddings = part(model, family.lm_head, family), part(model, family.embeddings, family)
    if head.weight is embeddings.weight or head.weight.data_ptr() == embeddings.weight.data_ptr():
        head.weight = nn.Parameter(embeddings.weight.detach().clone())
    for config in {id(c): c for c in (model.config, text_config(model))}.values():
        config.tie_word_embeddings = False


def _quantized(root: nn.Module, path: str, family: ModelFamily) -> QuantizedLinear:
    module = QuantizedLinear.from_linear(part(root, path, family))
    set_part(root, path, module, family)
    return module


def install_online_rotations(model: nn.Module, family: ModelFamily, rotations: Rotations) -> None:
    """Set the online rotations recorded in `rotations` on every down_proj and o_proj input (also on reload)."""
    shape = attention_shape(model)
    for layer in decoder_layers(model, family):
        if "mlp_down" in rotations.roles:
            down = _quantized(layer, family.mlp_output, family)
            role = rotations.roles["mlp_down"]
            down.input_transform.set_rotation(role["kind"], role["size"], rotations.online_matrix("mlp_down"))
        if "heads" in rotations.roles:
            o_proj = _quantized(attention_of(layer, family), family.o_proj, family)
            o_proj.input_transform.set_rotation(rotations.roles["heads"]["kind"], shape.num_heads, rotations.online_matrix("heads"))


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
        embeddings = part(model, family.embeddings, family)
        embeddings.weight.copy_((embeddings.weight.to(torch.float64) @ residual).to(embeddings.weight.dtype))
        for layer in decoder_layers(model, family):
            for reader in attention_readers(layer, family) + [part(layer, p, family) for p in family.mlp_inputs]:
                _fold(reader, right=residual)
            v_proj = qkv_projections(layer, family)[2]
            _fold(v_proj, left=torch.block_diag(*[head_dim] * shape.num_kv_heads))
            _fold(part(attention_of(layer, family), family.o_proj, family), left=residual, right=torch.kron(heads, head_dim))
            _fold(part(layer, family.mlp_output, family), left=residual, right=mlp_down)
        _fold(part(model, family.lm_head, family), right=residual)
        if family.projector_output is not None:
            _fold(part(model, family.projector_output, family), left=residual)
        if family.image_newline is not None:
            newline = part(model, family.image_newline, family)
            newline.copy_((newline.to(torch.float64) @ residual).to(newline.dtype))
    install_online_rotations(model, family, rotations)
    return rotations


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
        matrices.append(rotation)
    return matrices
