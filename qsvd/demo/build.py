"""Build the demo VLM: a word-level tokenizer, a LLaVA processor and a small LLaVA from config objects.

The vision tower is a CLIP vision transformer on 64x64 images, the projector LLaVA's two-layer MLP,
and the language model a Llama with multi-head attention (as many KV heads as query heads).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from qsvd.data.records import Record

PAD, BOS, EOS, UNK, IMAGE = "<pad>", "<s>", "</s>", "<unk>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)
# LLaVA-1.5's conversation format, one image item -> one <image> placeholder the processor expands:
# "<s> USER: <image> what color is the shape? ASSISTANT:" (the answer follows after a space).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %} USER: {% else %} ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image> "
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
TEMPLATE_TEXT = "USER: ASSISTANT:"  # the words the template writes, trained into the vocabulary
IMAGE_SIZE = 64  # easy-vqa images are 64x64: no resize, no crop
PATCH_SIZE = 8
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class VisionSizes:
    """Widths and depths of a trained vision tower (the patch size comes from the processor)."""

    vision_hidden: int = 64
    vision_intermediate: int = 256
    vision_layers: int = 2
    vision_heads: int = 4


@dataclass(frozen=True)
class DemoSizes(VisionSizes):
    """Widths and depths of the demo LLaVA: its vision tower and its language model."""

    text_hidden: int = 128
    text_intermediate: int = 256
    text_layers: int = 2
    text_heads: int = 4  # num_key_value_heads is the same: multi-head attention

    @classmethod
    def from_overrides(cls, **overrides: int) -> DemoSizes:
        """Defaults with `overrides` applied; an unknown key is an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown demo model size {unknown[0]!r}; known sizes: {sorted(known)}")
        return cls(**overrides)


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer for `texts`: lower-cased words, punctuation split off.

    The vocabulary is the special tokens, then the words in sorted order: the same ids on every run
    and machine (a trainer's frequency order breaks ties arbitrarily).
    """
    normalizer, pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))})
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *(w for w in words if w not in SPECIAL_TOKENS)])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizer
    core.pre_tokenizer = pre_tokenizer
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces, " ?" -> "?"
    core.add_special_tokens(list(SPECIAL_TOKENS))  # kept whole, never split or lower-cased
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        chat_template=CHAT_TEMPLATE,
    )


def build_demo_processor(records: list[Record], patch_size: int = PATCH_SIZE) -> LlavaProcessor:
    """LLaVA processor: a tokenizer trained on the records' questions and answers, a 64x64 CLIP image processor."""
    if not records:
        raise ValueError("build_demo_processor needs the training records to train its tokenizer; got none")
    tokenizer = build_word_tokenizer([TEMPLATE_TEXT] + [f"{r.question} {r.answer}" for r in records])
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    # "default" drops CLS: the model sees (64 / patch)^2 image tokens, as many as the processor writes.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def image_token_count(processor: LlavaProcessor) -> int:
    """How many <image> tokens the processor writes per image (and the model expects)."""
    crop = processor.image_processor.crop_size
    patches = (crop["height"] // processor.patch_size) * (crop["width"] // processor.patch_size)
    dropped = 1 if processor.vision_feature_select_strategy == "default" else 0
    return patches + processor.num_additional_image_tokens - dropped


def build_demo_model(processor: LlavaProcessor, seed: int, **sizes: int) -> LlavaForConditionalGeneration:
    """A randomly initialised demo LLaVA matching `processor` (image size, patch size, vocabulary), seeded."""
    dims = DemoSizes.from_overrides(**sizes)
    tokenizer = processor.tokenizer
    crop = processor.image_processor.crop_size
    vision = CLIPVisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=dims.vision_intermediate,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
        image_size=crop["height"],
        patch_size=processor.patch_size,
    )
    text = LlamaConfig(
        hidden_size=dims.text_hidden,
        intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_heads,
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
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        vision_feature_layer=-1,
    )
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG: seed it, then restore
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()
