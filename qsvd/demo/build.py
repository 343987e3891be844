"""Build the demo VLM: a LLaVA (CLIP-style vision tower, MLP projector, Llama LM with multi-head attention)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

from qsvd.data.records import Record
from qsvd.demo.tokenizer import build_word_tokenizer


@dataclass(frozen=True)
class DemoSizes:
    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 128
    text_layers: int = 4
    text_heads: int = 4  # as many KV heads as query heads: multi-head attention
    text_intermediate: int = 256


def build_demo_processor(records: list[Record], sizes: DemoSizes = DemoSizes()) -> LlavaProcessor:
    """Word-level tokenizer trained on the records' questions and answers, and a CLIP image processor."""
    tokenizer = build_word_tokenizer(f"{r.question} {r.answer}" for r in records)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": sizes.image_size},
        crop_size={"height": sizes.image_size, "width": sizes.image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=sizes.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )


def build_demo_model(processor: LlavaProcessor, seed: int, sizes: DemoSizes = DemoSizes()) -> LlavaForConditionalGeneration:
    """A randomly initialised demo LLaVA matching `processor` (seeded)."""
    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=4 * sizes.vision_hidden,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image_size,
        patch_size=sizes.patch_size,
    )
    text = LlamaConfig(
        hidden_size=sizes.text_hidden,
        intermediate_size=sizes.text_intermediate,
        num_hidden_layers=sizes.text_layers,
        num_attention_heads=sizes.text_heads,
        num_key_value_heads=sizes.text_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    config.qsvd_demo_sizes = asdict(sizes)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
