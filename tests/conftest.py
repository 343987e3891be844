"""Shared fixtures: tiny random models of every supported family, each with a working processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers as tf
from PIL import Image

from qsvd.demo.tokenizer import build_word_tokenizer

WORDS = ["what color is the shape ? yes no red blue green circle square triangle a b c d answer question"]
SMOLVLM_TOKENS = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
IMAGE_SIZE = 32
PATCH = 8


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def _vision(cls=tf.CLIPVisionConfig, **extra):
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               image_size=IMAGE_SIZE, patch_size=PATCH, **extra)


def _text(vocab_size, kv_heads):
    return tf.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=kv_heads, vocab_size=vocab_size, max_position_embeddings=256,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _clip_processor():
    return tf.CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def build_tiny(family: str, kv_heads: int = 4, seed: int = 0):
    """(model, processor) of a tiny random model of `family`; kv_heads < 4 gives GQA."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(WORDS, SMOLVLM_TOKENS if family == "smolvlm" else ())
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    text = _text(len(tokenizer), kv_heads)
    if family == "llava":
        model = tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=_vision(), text_config=text, image_token_id=image_id))
        processor = tf.LlavaProcessor(image_processor=_clip_processor(), tokenizer=tokenizer, patch_size=PATCH,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template=tokenizer.chat_template)
    elif family == "llava-next":
        pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE]]
        model = tf.LlavaNextForConditionalGeneration(
            tf.LlavaNextConfig(vision_config=_vision(), text_config=text, image_token_id=image_id, image_grid_pinpoints=pinpoints))
        image_processor = tf.LlavaNextImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                     image_grid_pinpoints=pinpoints)
        processor = tf.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template=tokenizer.chat_template)
    elif family == "smolvlm":
        # SmolVLM-Instruct's checkpoints are Idefics3ForConditionalGeneration (the smolvlm family).
        config = tf.Idefics3Config(vision_config=_vision(tf.Idefics3VisionConfig).to_dict(), text_config=text.to_dict(),
                                   image_token_id=image_id, scale_factor=2)
        model = tf.Idefics3ForConditionalGeneration(config)
        image_processor = tf.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                                    max_image_size={"longest_edge": IMAGE_SIZE})
        processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                         image_seq_len=(IMAGE_SIZE // PATCH) ** 2 // 4, chat_template=tokenizer.chat_template)
    elif family == "llama":
        model = tf.LlamaForCausalLM(text)
        processor = tokenizer
    else:
        raise ValueError(family)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), processor


FAMILY_CASES = [("llava", 4), ("llava-next", 4), ("smolvlm", 2), ("llama", 1)]


@pytest.fixture(params=FAMILY_CASES, ids=[f"{f}-kv{k}" for f, k in FAMILY_CASES])
def tiny(request):
    """(family name, model, processor) for every family; smolvlm and llama cases are GQA."""
    family, kv_heads = request.param
    model, processor = build_tiny(family, kv_heads)
    return family, model, processor


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (IMAGE_SIZE * 2, IMAGE_SIZE * 2, 3), dtype=np.uint8)) for _ in range(3)]
