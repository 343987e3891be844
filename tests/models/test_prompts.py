import pytest
import torch

from qsvd.models.prompts import (
    IGNORE_INDEX,
    PLAIN_TEXT_PROMPT,
    answer_token_ids,
    chat_prompt,
    decode_generated,
    encode_prompt,
    encode_with_answer,
    tokenizer_of,
)
from qsvd.models.registry import decoder_layers, family_by_name, family_of, qkv_projections

QUESTION = "what color is the shape?"


def _image(family, images):
    return images[0] if family.multimodal else None


@pytest.mark.unit
@pytest.mark.parametrize(
    ("family_name", "expected"),
    [
        ("llava", "USER: <image>\nwhat color is the shape? ASSISTANT:"),
        ("llava-next", "[INST] <image>\nwhat color is the shape? [/INST]"),
        ("smolvlm", "<|im_start|>User:<image>what color is the shape?<end_of_utterance>\nAssistant:"),
        ("llama", "<|im_start|>user\nwhat color is the shape?<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_chat_prompt_is_the_processors_template(tiny_model, family_name, expected):
    _, processor = tiny_model(family_name)
    assert chat_prompt(processor, family_by_name(family_name), QUESTION) == expected


@pytest.mark.unit
def test_text_only_without_chat_template_uses_plain_prompt(tiny_model):
    _, tokenizer = tiny_model("llama", 1)
    tokenizer.chat_template = None
    family = family_by_name("llama")
    assert chat_prompt(tokenizer, family, QUESTION) == PLAIN_TEXT_PROMPT.format(question=QUESTION)
    batch = encode_with_answer(tokenizer, family, QUESTION, "red", None)
    answer = tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX], skip_special_tokens=True)
    assert answer == " red"  # "Answer:" is followed by a space, then the answer


@pytest.mark.unit
@pytest.mark.parametrize(
    ("family_name", "tokens"),
    [("llava", ["▁red"]), ("smolvlm", ["Ġre", "d"]), ("llama", ["re", "d"])],
)
def test_answer_tokens_are_the_continuation_of_the_prompt(tiny_model, family_name, tokens):
    # SentencePiece style: "▁red", never "▁▁red"; byte-level: a leading space after "Assistant:",
    # none after ChatML's "assistant\n".
    _, processor = tiny_model(family_name)
    tokenizer = tokenizer_of(processor)
    prompt = chat_prompt(processor, family_by_name(family_name), QUESTION)
    ids = answer_token_ids(tokenizer, prompt, "  red ")
    assert tokenizer.convert_ids_to_tokens(ids) == tokens


@pytest.mark.unit
def test_empty_answer_is_rejected(tiny_model):
    _, tokenizer = tiny_model("llama", 1)
    with pytest.raises(ValueError, match="answer is empty"):
        answer_token_ids(tokenizer, "Answer:", "  ")


def test_encode_prompt_carries_the_processors_image_inputs(tiny, images):
    family_name, model, processor = tiny
    family = family_of(model)
    batch = encode_prompt(processor, family, QUESTION, _image(family, images))
    expected_keys = {
        "llava": {"input_ids", "attention_mask", "pixel_values"},
        "llava-next": {"input_ids", "attention_mask", "pixel_values", "image_sizes"},
        "smolvlm": {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"},
        "llama": {"input_ids", "attention_mask"},
    }[family_name]
    assert set(batch) == expected_keys
    ids = batch["input_ids"]
    assert ids.shape[0] == 1
    tokenizer = tokenizer_of(processor)
    if tokenizer.bos_token_id is not None:
        assert ids[0, :2].tolist() != [tokenizer.bos_token_id] * 2  # never a second BOS
    if family.multimodal:
        image_tokens = int((ids == model.config.image_token_id).sum())
        assert image_tokens > 0
        with torch.no_grad():
            model(**batch)  # the image features fill exactly the image tokens, or the model raises


def test_encode_with_answer_labels_and_gradients(tiny, images):
    _, model, processor = tiny
    family = family_of(model)
    tokenizer = tokenizer_of(processor)
    prompt = encode_prompt(processor, family, QUESTION, _image(family, images))
    batch = encode_with_answer(processor, family, QUESTION, "blue", _image(family, images))
    n_prompt = prompt["input_ids"].shape[1]
    answer = answer_token_ids(tokenizer, chat_prompt(processor, family, QUESTION), "blue")
    labels, ids = batch["labels"][0], batch["input_ids"][0]
    # Unshifted: -100 over the whole prompt, then exactly the answer ids and eos, aligned with input_ids.
    assert ids.shape == labels.shape == (n_prompt + len(answer) + 1,)
    assert torch.equal(ids[:n_prompt], prompt["input_ids"][0])
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert labels[n_prompt:].tolist() == answer + [tokenizer.eos_token_id]
    assert torch.equal(labels[n_prompt:], ids[n_prompt:])
    assert batch["attention_mask"].shape == batch["input_ids"].shape and bool(batch["attention_mask"].all())
    for key in set(prompt) - {"input_ids", "attention_mask"}:
        assert torch.equal(batch[key], prompt[key])  # image inputs exactly as the processor returned them

    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    for layer in decoder_layers(model, family):
        for projection in qkv_projections(layer, family):
            assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


def test_generate_and_decode(tiny, images):
    _, model, processor = tiny
    family = family_of(model)
    batch = encode_prompt(processor, family, QUESTION, _image(family, images))
    n_prompt = batch["input_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert output.shape[1] > n_prompt and torch.equal(output[:, :n_prompt], batch["input_ids"])
    text = decode_generated(processor, output, n_prompt)
    expected = tokenizer_of(processor).decode(output[0, n_prompt:], skip_special_tokens=True).strip()
    assert isinstance(text, str) and text == expected
    assert decode_generated(processor, output[0], n_prompt) == text


@pytest.mark.unit
def test_decode_generated_drops_special_tokens_and_space(tiny_model):
    _, tokenizer = tiny_model("llama", 1)
    prompt = tokenizer("<|im_start|>user\nhi", add_special_tokens=False)["input_ids"]
    new = tokenizer(" red green", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert decode_generated(tokenizer, torch.tensor([prompt + new]), len(prompt)) == "red green"
    with pytest.raises(ValueError, match="batch of one"):
        decode_generated(tokenizer, torch.tensor([prompt, prompt]), 1)


@pytest.mark.unit
def test_image_presence_is_checked(tiny_model, images):
    _, processor = tiny_model("llava")
    with pytest.raises(ValueError, match="'llava' needs an image"):
        encode_prompt(processor, family_by_name("llava"), QUESTION, None)
    _, tokenizer = tiny_model("llama", 1)
    with pytest.raises(ValueError, match="'llama' is text-only"):
        encode_prompt(tokenizer, family_by_name("llama"), QUESTION, images[0])


def test_grayscale_image_is_converted(tiny_model, images):
    model, processor = tiny_model("llava")
    batch = encode_prompt(processor, family_by_name("llava"), QUESTION, images[0].convert("L"))
    assert batch["pixel_values"].shape[1] == 3


@pytest.mark.unit
def test_template_that_writes_bos_gets_no_second_one(tiny_model, images):
    _, processor = tiny_model("llava")
    bos = processor.tokenizer.bos_token_id
    plain = encode_prompt(processor, family_by_name("llava"), QUESTION, images[0])["input_ids"]
    processor.chat_template = "{{ bos_token }}" + processor.chat_template
    with_bos = encode_prompt(processor, family_by_name("llava"), QUESTION, images[0])["input_ids"]
    for ids in (plain, with_bos):
        assert ids[0, 0] == bos and (ids == bos).sum() == 1
