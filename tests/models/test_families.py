"""Every family adapter on a tiny random model of its family, through the real prompt and loading path."""

import pytest
import torch
from torch import nn

from qsvd.models.loading import ModelLoadError, load_model
from qsvd.models.prompts import encode_prompt
from qsvd.models.registry import (
    decoder_layers,
    family_by_name,
    family_of,
    qkv_projections,
    set_projection,
)
from qsvd.models.surgery import layer_shapes


def test_registry_finds_layers_and_qkv_shapes(tiny):
    name, model, _ = tiny
    family = family_by_name(name)
    assert family_of(model) is family
    config = model.config.get_text_config()
    layers = decoder_layers(model, family)
    assert len(layers) == config.num_hidden_layers
    head_dim = config.hidden_size // config.num_attention_heads
    for shape in layer_shapes(model, family):
        assert shape.hidden_size == config.hidden_size
        assert shape.q_out == config.num_attention_heads * head_dim
        assert shape.k_out == shape.v_out == config.num_key_value_heads * head_dim
    replacement = nn.Linear(config.hidden_size, shape.k_out)
    set_projection(layers[0], family, "k", replacement)
    assert qkv_projections(layers[0], family)[1] is replacement


def test_load_model_round_trips_a_local_directory(tiny, images, tmp_path):
    name, model, processor = tiny
    family = family_by_name(name)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_model(str(tmp_path), family=name)
    batch = encode_prompt(loaded_processor, family, "what color is the shape?", images[0] if family.multimodal else None)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


def test_family_mismatch_is_an_error(tmp_path):
    from tests.conftest import build_tiny

    model, processor = build_tiny("llama", 1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model.family is 'llava'.*'llama'"):
        load_model(str(tmp_path), family="llava")


def test_missing_local_path_names_the_key():
    with pytest.raises(FileNotFoundError, match="model.source.*/no/such/dir"):
        load_model("/no/such/dir")


def test_offline_hub_id_fails_fast_with_advice():
    with pytest.raises(ModelLoadError, match="qsvd-test/no-such-model.*HF_HUB_OFFLINE"):
        load_model("qsvd-test/no-such-model")


def test_unknown_family_and_class_are_errors():
    with pytest.raises(ValueError, match="known families"):
        family_by_name("gpt")
    with pytest.raises(ValueError, match="qsvd/models/registry.py"):
        family_of(nn.Linear(2, 2))
