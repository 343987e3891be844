import json

import pytest
import torch

from qsvd.models.loading import ModelLoadError, load_model
from qsvd.models.prompts import encode_prompt, tokenizer_of
from qsvd.models.registry import family_by_name, family_of

QUESTION = "what shape is in the image?"


@pytest.mark.parametrize(
    ("family_name", "kv_heads", "model_class"),
    [
        ("llava", 4, None),
        ("llava-next", 4, None),
        ("smolvlm", 2, None),
        ("llama", 1, None),
        ("llama", 2, "Qwen2ForCausalLM"),
    ],
)
def test_local_directory_round_trips(saved_tiny_model, images, family_name, kv_heads, model_class):
    directory, original, processor = saved_tiny_model(family_name, kv_heads, model_class)
    loaded, loaded_processor = load_model(str(directory), family=family_name)
    family = family_by_name(family_name)
    assert type(loaded) is type(original) and family_of(loaded) is family
    assert not loaded.training
    assert type(loaded_processor).__name__ == type(processor).__name__ or not family.multimodal
    image = images[1] if family.multimodal else None
    batch = encode_prompt(processor, family, QUESTION, image)
    reloaded_batch = encode_prompt(loaded_processor, family, QUESTION, image)
    assert batch.keys() == reloaded_batch.keys()
    for key in batch:
        assert torch.equal(batch[key], reloaded_batch[key]), key
    with torch.no_grad():
        torch.testing.assert_close(loaded(**reloaded_batch).logits, original(**batch).logits, rtol=0, atol=0)
    assert tokenizer_of(loaded_processor).chat_template == tokenizer_of(processor).chat_template


def test_load_in_bfloat16_without_family_check(saved_tiny_model):
    directory, _, _ = saved_tiny_model("llama", 1)
    model, tokenizer = load_model(str(directory), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.unit
@pytest.mark.parametrize("source", ["/no/such/model", "./missing-model", "~/no-such-qsvd-model"])
def test_missing_local_path_names_key_and_path(source):
    with pytest.raises(FileNotFoundError, match=rf"model\.source.*{source}.*does not exist.*save_pretrained.*hub id"):
        load_model(source)


@pytest.mark.unit
def test_unsupported_architecture_says_how_to_add_one(tmp_path):
    directory = tmp_path / "bert"
    directory.mkdir()
    config = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 32, "hidden_size": 8,
              "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unsupported model class 'BertForMaskedLM'.*LlavaForConditionalGeneration.*"
                                         r"ModelFamily entry in qsvd/models/registry\.py"):
        load_model(str(directory))


@pytest.mark.unit
def test_config_without_architecture_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="names no architecture"):
        load_model(str(tmp_path))


@pytest.mark.unit
def test_directory_without_config_names_the_fix(tmp_path):
    with pytest.raises(ModelLoadError, match=rf"model\.source.*{tmp_path}.*model directory written by save_pretrained"):
        load_model(str(tmp_path))


def test_family_mismatch_names_both(saved_tiny_model):
    directory, _, _ = saved_tiny_model("smolvlm", 2)
    with pytest.raises(ValueError, match=r"model\.family is 'llava' but .* Idefics3ForConditionalGeneration of family "
                                         r"'smolvlm'.*set model\.family: smolvlm"):
        load_model(str(directory), family="llava")
    with pytest.raises(ValueError, match="unknown model family 'gpt'"):
        load_model(str(directory), family="gpt")


@pytest.mark.unit
def test_unreachable_hub_id_names_id_cause_and_fix():
    with pytest.raises(ModelLoadError, match=r"model\.source.*'qsvd-test/no-such-model'.*\(.+\).*check the hub id.*"
                                             r"HF_HUB_OFFLINE=0.*login.*local directory") as caught:
        load_model("qsvd-test/no-such-model")
    assert isinstance(caught.value.__cause__, OSError)
