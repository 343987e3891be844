import pytest
import torch
from torch import nn

from qsvd.models.registry import (
    FAMILIES,
    attention_of,
    attention_shape,
    decoder_layers,
    family_by_name,
    family_of,
    family_of_class,
    projector,
    qkv_projections,
    set_projection,
    text_config,
    vision_layers,
)

pytestmark = pytest.mark.unit

# Every class the registry names, built tiny: (family, kv heads, model class).
CLASS_CASES = [
    ("llava", 4, "LlavaForConditionalGeneration"),
    ("llava-next", 2, "LlavaNextForConditionalGeneration"),
    ("smolvlm", 2, "Idefics3ForConditionalGeneration"),
    ("smolvlm", 4, "SmolVLMForConditionalGeneration"),
    ("llama", 1, "LlamaForCausalLM"),
    ("llama", 2, "Qwen2ForCausalLM"),
    ("llama", 4, "MistralForCausalLM"),
]


def test_every_registered_class_is_tested():
    assert {c for f in FAMILIES.values() for c in f.model_classes} == {c for _, _, c in CLASS_CASES}


@pytest.mark.parametrize(("family_name", "kv_heads", "model_class"), CLASS_CASES, ids=[c for _, _, c in CLASS_CASES])
def test_registry_paths_resolve_on_a_real_model(tiny_model, family_name, kv_heads, model_class):
    model, _ = tiny_model(family_name, kv_heads, model_class=model_class)
    assert type(model).__name__ == model_class
    family = family_of(model)
    assert family.name == family_name
    config = text_config(model)
    layers = decoder_layers(model, family)
    assert isinstance(layers, nn.ModuleList) and len(layers) == config.num_hidden_layers
    # The registry's layers are the very modules the model runs: the LM's own ModuleList.
    lm_layer_names = {name for name, module in model.named_modules() if module is layers}
    assert lm_layer_names == {family.decoder_layers}
    shape = attention_shape(model)
    assert shape.num_kv_heads == kv_heads and shape.num_heads == 4
    for layer in layers:
        q, k, v = qkv_projections(layer, family)
        assert all(isinstance(p, nn.Linear) for p in (q, k, v))
        assert q.weight.shape == (shape.q_out, shape.hidden_size)
        assert k.weight.shape == (shape.k_out, shape.hidden_size)
        assert v.weight.shape == (shape.v_out, shape.hidden_size)
        assert getattr(attention_of(layer, family), family.o_proj).in_features == shape.q_out
    if family.multimodal:
        vision = vision_layers(model, family)
        assert isinstance(vision, nn.ModuleList) and len(vision) == model.config.vision_config.num_hidden_layers
        assert isinstance(projector(model, family), nn.Module)
        assert family.projector in dict(model.named_modules())
        modules = dict(model.named_modules())
        hidden = model.config.vision_config.hidden_size
        for path in (*family.vision_embeddings, family.vision_pre_norm, family.vision_post_norm):
            assert path is None or path in modules
        for path in (family.vision_pre_norm, family.vision_post_norm):
            assert path is None or isinstance(modules[path], nn.LayerNorm)
        reader = modules[family.vision_output_reader]
        assert isinstance(reader, nn.Linear) and reader.in_features % hidden == 0
        for layer in vision:
            for path in (family.vision_attention_norm, family.vision_mlp_norm):
                assert isinstance(layer.get_submodule(path), nn.LayerNorm)
            for path in (*family.vision_qkv, family.vision_attention_output, *family.vision_mlp_inputs, family.vision_mlp_output):
                assert isinstance(layer.get_submodule(path), nn.Linear)
    else:
        with pytest.raises(ValueError, match="no vision encoder"):
            vision_layers(model, family)


def test_gqa_shapes(tiny_model):
    model, _ = tiny_model("smolvlm", kv_heads=2)
    shape = attention_shape(model)
    assert (shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (64, 4, 2, 16)
    assert (shape.q_out, shape.k_out, shape.v_out) == (64, 32, 32)


def test_set_projection_replaces_the_module_the_forward_uses(tiny):
    _, model, _ = tiny
    family = family_of(model)
    layer = decoder_layers(model, family)[0]
    q, k, v = qkv_projections(layer, family)
    input_ids = torch.tensor([[5, 6, 7, 8]])  # text only: every family runs its LM alone
    calls = []

    class Recording(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            calls.append(x.shape)
            return self.inner(x)

    with torch.no_grad():
        before = model(input_ids=input_ids).logits
        for which, original in zip("qkv", (q, k, v)):
            set_projection(layer, family, which, Recording(original))
        after = model(input_ids=input_ids).logits
    assert len(calls) == 3
    assert [type(p).__name__ for p in qkv_projections(layer, family)] == ["Recording"] * 3
    torch.testing.assert_close(after, before)
    set_projection(layer, family, "k", nn.Linear(k.in_features, k.out_features))
    assert isinstance(qkv_projections(layer, family)[1], nn.Linear)


def test_set_projection_rejects_unknown_projection(tiny_model):
    model, _ = tiny_model("llama", 1)
    family = family_of(model)
    with pytest.raises(ValueError, match="'o'.*one of"):
        set_projection(decoder_layers(model, family)[0], family, "o", nn.Identity())


def test_unknown_family_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"model\.family.*'gpt'.*llava-next.*smolvlm"):
        family_by_name("gpt")


def test_unsupported_class_says_how_to_add_one():
    how_to_add = r"'BertModel'.*LlavaForConditionalGeneration.*ModelFamily entry in qsvd/models/registry\.py"
    with pytest.raises(ValueError, match=how_to_add):
        family_of(type("BertModel", (nn.Module,), {})())
    with pytest.raises(ValueError, match="unsupported model class 'Qwen2VLForConditionalGeneration'"):
        family_of_class("Qwen2VLForConditionalGeneration")


def test_wrong_registry_path_names_family_and_fix(tiny_model):
    model, _ = tiny_model("llama", 1)
    broken = FAMILIES["llama"].__class__(name="broken", model_classes=(), decoder_layers="model.blocks")
    with pytest.raises(AttributeError, match=r"'model\.blocks'.*family 'broken'.*registry"):
        decoder_layers(model, broken)


def test_tiny_models_are_deterministic(tiny_model):
    (first, first_processor), (second, second_processor) = tiny_model("smolvlm", 2), tiny_model("smolvlm", 2)
    assert first_processor.tokenizer.get_vocab() == second_processor.tokenizer.get_vocab()
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
