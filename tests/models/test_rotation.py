"""H1, the online rotations and H2 leave every family's function unchanged (float32, dense and low-rank)."""

import pytest
import torch
from torch import nn

from qsvd.math.cost import layout_units
from qsvd.math.decompose import joint_factors, scaled_svd
from qsvd.models.prompts import encode_prompt
from qsvd.models.quantized import QuantizedLinear
from qsvd.models.registry import decoder_layers, family_by_name, part, set_part, vision_layers
from qsvd.math.hadamard import make_rotation
from qsvd.models.rotation import (
    LinearAffineLayerNorm,
    Rotations,
    _blockwise,
    _fold,
    _kronecker,
    fold_norms,
    latent_modules,
    rotate_language_model,
    rotate_latents,
    rotate_vision_tower,
)
from qsvd.models.surgery import apply_factors, group_weight, layer_shapes

pytestmark = pytest.mark.unit


def _randomise_norms_and_newline(model, family, seed=0):
    """Non-trivial RMSNorm scales (tiny models start at 1) so folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norms = [part(model, family.final_norm, family)]
        for layer in decoder_layers(model, family):
            norms += [part(layer, family.attention_norm, family), part(layer, family.mlp_norm, family)]
        for norm in norms:
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
        if family.image_newline is not None:
            part(model, family.image_newline, family).normal_(generator=g)


def _vision_norms(model, family):
    """Every LayerNorm the vision rotation folds: those of each layer, and the family's pre- and post-norm."""
    norms = [part(model, path, family) for path in (family.vision_pre_norm, family.vision_post_norm) if path is not None]
    for layer in vision_layers(model, family):
        norms += [part(layer, family.vision_attention_norm, family), part(layer, family.vision_mlp_norm, family)]
    return norms


def _randomise_vision_norms(model, family, seed=1):
    """Non-trivial LayerNorm scales and shifts (tiny models start at γ = 1, b = 0) so folding them is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in _vision_norms(model, family):
            norm.weight.copy_(0.5 + torch.rand(norm.weight.shape, generator=g))
            norm.bias.normal_(generator=g)


def _make_lowrank(model, family, layout):
    """Every unit of `layout` at about 60% of its rank, through the real factor path."""
    layers = decoder_layers(model, family)
    factors = []
    for unit in layout_units(layer_shapes(model, family), layout):
        weight = group_weight(layers[unit.layer], family, unit.group)
        svd = scaled_svd(weight, torch.linspace(0.5, 2.0, weight.shape[1], dtype=torch.float64))
        rank = max(1, int(0.6 * unit.max_rank))
        factors.append(joint_factors(svd, torch.arange(rank), 0.2, [unit.shape.out(p) for p in unit.group]))
    apply_factors(model, family, layout, factors)


def _logits(model, processor, family, images):
    batch = encode_prompt(processor, family, "what color is the shape?", images[0] if family.multimodal else None)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("layout", [None, "joint", "kv"])
def test_rotated_model_computes_the_same_logits(tiny, images, layout):
    family_name, model, processor = tiny
    family = family_by_name(family_name)
    _randomise_norms_and_newline(model, family)
    if layout is not None:
        _make_lowrank(model, family, layout)
    expected = _logits(model, processor, family, images)
    rotations = rotate_language_model(model, family, seed=0)
    if layout is not None:
        rotate_latents(model, family, seed=0, rotations=rotations)
        assert len([r for r in rotations.roles if r.startswith("latent.")]) == len(latent_modules(model, family))
    torch.testing.assert_close(_logits(model, processor, family, images), expected, rtol=1e-4, atol=1e-4)
    layer = decoder_layers(model, family)[0]
    assert isinstance(part(layer, family.mlp_output, family), QuantizedLinear)
    assert part(layer, family.mlp_output, family).input_transform.rotation_kind == "hadamard"
    assert all(p.weight.eq(1).all() for p in [part(model, family.final_norm, family), part(layer, family.attention_norm, family)])


def test_rotation_changes_the_weights_and_records_what_it_did(tiny_model):
    model, _ = tiny_model("llama", kv_heads=1)
    family = family_by_name("llama")
    before = part(model, family.embeddings, family).weight.clone()
    rotations = rotate_language_model(model, family, seed=0)
    assert not torch.allclose(part(model, family.embeddings, family).weight, before)
    assert set(rotations.roles) == {"residual", "mlp_down", "heads", "head_dim"}
    assert all(set(role) == {"size", "kind", "seed"} for role in rotations.roles.values())
    kinds = {name: role["kind"] for name, role in rotations.roles.items()}
    assert kinds["residual"] == "randomized-hadamard" and kinds["mlp_down"] == "hadamard"  # only folded rotations take signs
    with pytest.raises(ValueError, match="already made"):
        rotations.make("residual", 8, 0)


def test_random_rotations_are_kept_for_orders_without_a_hadamard():
    rotations = Rotations()
    matrix = rotations.make("heads", 9, seed=5)  # SmolLM2's 9 query heads: no Hadamard of order 9
    assert rotations.roles["heads"]["kind"] == "random"
    torch.testing.assert_close(rotations.online_matrix("heads"), matrix.matrix.float())


@pytest.mark.parametrize("size, randomized, kind", [(4096, True, "randomized-hadamard"), (576, False, "hadamard"),
                                                   (1536, True, "randomized-hadamard"), (9, True, "random")])
def test_a_rotation_applies_itself_to_rows_as_its_dense_matrix(size, randomized, kind):
    rotation = make_rotation(size, seed=3, randomized=randomized)
    x = torch.randn(5, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert rotation.kind == kind
    torch.testing.assert_close(rotation(x), x @ rotation.matrix, rtol=0, atol=1e-12)
    torch.testing.assert_close(rotation.matrix @ rotation.matrix.T, torch.eye(size, dtype=torch.float64), rtol=0, atol=1e-12)


def test_a_fold_by_structured_maps_equals_the_dense_products():
    """Lᵀ W R with L = diag(B, B, B) (V's head-dim rotation) and R = A ⊗ B (o_proj's input), and the bias Lᵀ b."""
    heads, head_dim = make_rotation(3, seed=0), make_rotation(64, seed=1, randomized=True)  # random ⊗ Hadamard
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(3 * 64, 3 * 64).double()
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=g, dtype=torch.float64))
        linear.bias.copy_(torch.randn(linear.bias.shape, generator=g, dtype=torch.float64))
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    left = torch.block_diag(*[head_dim.matrix] * 3)
    right = torch.kron(heads.matrix, head_dim.matrix)
    _fold(linear, left=_blockwise(head_dim, 3), right=_kronecker(heads, head_dim))
    torch.testing.assert_close(linear.weight.detach(), left.T @ weight @ right, rtol=0, atol=1e-12)
    torch.testing.assert_close(linear.bias.detach(), left.T @ bias, rtol=0, atol=1e-12)


def test_folding_norms_keeps_the_function(tiny_model, images):
    model, processor = tiny_model("smolvlm", kv_heads=2)
    family = family_by_name("smolvlm")
    _randomise_norms_and_newline(model, family)
    expected = _logits(model, processor, family, images)
    fold_norms(model, family)
    torch.testing.assert_close(_logits(model, processor, family, images), expected, rtol=1e-5, atol=1e-5)


VISION_CASES = [("llava", 4), ("llava-next", 4), ("smolvlm", 2)]
VISION_ROLES = {"vision_residual", "vision_mlp_down", "vision_heads", "vision_head_dim"}


def _vision_linear_paths(family):
    return [*family.vision_qkv, family.vision_attention_output, *family.vision_mlp_inputs, family.vision_mlp_output]


@pytest.mark.parametrize(("family_name", "kv_heads"), VISION_CASES, ids=[f for f, _ in VISION_CASES])
def test_rotated_vision_tower_computes_the_same_logits(tiny_model, images, family_name, kv_heads):
    model, processor = tiny_model(family_name, kv_heads=kv_heads)
    family = family_by_name(family_name)
    _randomise_norms_and_newline(model, family)
    _randomise_vision_norms(model, family)
    expected = _logits(model, processor, family, images)
    layers = vision_layers(model, family)
    before = [{path: part(layer, path, family).weight.clone() for path in _vision_linear_paths(family)} for layer in layers]
    reader_before = part(model, family.vision_output_reader, family).weight.clone()
    rotations = rotate_language_model(model, family, seed=0)
    rotate_vision_tower(model, family, seed=0, rotations=rotations)
    torch.testing.assert_close(_logits(model, processor, family, images), expected, rtol=1e-4, atol=1e-4)

    assert VISION_ROLES <= set(rotations.roles) and rotations.roles["vision_residual"]["kind"] == "mean-preserving"
    for layer, weights in zip(layers, before):
        for path, weight in weights.items():
            assert not torch.allclose(part(layer, path, family).weight, weight, atol=1e-3), path
        fc2 = part(layer, family.vision_mlp_output, family)
        assert isinstance(fc2, QuantizedLinear) and fc2.input_transform.rotation_kind == "hadamard"
        out_proj = part(layer, family.vision_attention_output, family)
        assert out_proj.input_transform.rotation_size == model.config.vision_config.num_attention_heads
    assert not torch.allclose(part(model, family.vision_output_reader, family).weight, reader_before, atol=1e-3)
    if family.vision_pre_norm is not None:
        assert isinstance(part(model, family.vision_pre_norm, family), LinearAffineLayerNorm)
    for norm in _vision_norms(model, family):
        if not isinstance(norm, LinearAffineLayerNorm):
            assert norm.weight.eq(1).all() and norm.bias.eq(0).all()
    # the check has teeth: another image moves the logits far beyond the tolerance
    assert (_logits(model, processor, family, images[1:]) - expected).abs().max() > 1e-2


def test_rotated_vision_tower_keeps_a_projector_reading_several_feature_layers(tiny_model, images):
    model, processor = tiny_model("llava", kv_heads=4)
    family = family_by_name("llava")
    model.config.vision_feature_layer = [-3, -1]  # the stream after the pre-norm and after the last layer, side by side
    width = model.config.vision_config.hidden_size
    set_part(model, family.vision_output_reader, nn.Linear(2 * width, model.config.text_config.hidden_size), family)
    _randomise_vision_norms(model, family)
    expected = _logits(model, processor, family, images)
    rotate_vision_tower(model, family, seed=3, rotations=Rotations())
    torch.testing.assert_close(_logits(model, processor, family, images), expected, rtol=1e-4, atol=1e-4)


def test_vision_rotation_rejects_a_reader_of_partial_tokens(tiny_model):
    model, _ = tiny_model("llava", kv_heads=4)
    family = family_by_name("llava")
    set_part(model, family.vision_output_reader, nn.Linear(40, 64), family)
    with pytest.raises(ValueError, match="not a multiple of the vision width 32"):
        rotate_vision_tower(model, family, seed=0, rotations=Rotations())
