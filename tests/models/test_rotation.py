"""H1, the online rotations and H2 leave every family's function unchanged (float32, dense and low-rank)."""

import pytest
import torch

from qsvd.math.cost import layout_units
from qsvd.math.decompose import joint_factors, scaled_svd
from qsvd.models.prompts import encode_prompt
from qsvd.models.quantized import QuantizedLinear
from qsvd.models.registry import decoder_layers, family_by_name, part
from qsvd.models.rotation import Rotations, fold_norms, latent_modules, rotate_language_model, rotate_latents
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
    torch.testing.assert_close(rotations.online_matrix("heads"), matrix.float())


def test_folding_norms_keeps_the_function(tiny_model, images):
    model, processor = tiny_model("smolvlm", kv_heads=2)
    family = family_by_name("smolvlm")
    _randomise_norms_and_newline(model, family)
    expected = _logits(model, processor, family, images)
    fold_norms(model, family)
    torch.testing.assert_close(_logits(model, processor, family, images), expected, rtol=1e-5, atol=1e-5)
