"""The `smolvlm-offline` model: a SmolVLM (Idefics3 architecture) whose language model is the real SmolLM2.

Language model: SmolLM2-135M-Instruct as exported by the `smollm2` source (the LM inside SmolVLM-256M),
frozen: its weights stay bit-identical. Vision: a small SigLIP-style tower on 64x64 images (patch 8)
and SmolVLM's pixel-shuffle connector (scale factor 2: 16 image tokens), trained here on easy-vqa
with the demo's two phases (qsvd/demo/train.py): attribute heads on the tower, then the connector
with answer-only loss through the frozen LM. The processor is transformers' Idefics3Processor
(SmolVLMProcessor needs the package num2words; Idefics3Processor writes the same single-image
prompt), without image splitting. SmolVLM's four special tokens are added to the SmolLM2 tokenizer;
their new embedding rows (tied with the LM head) are trained, every original row is not.
Measured (2026-11-29, 2-core machine): the full recipe (vision phase on all 4000 images for 24 epochs,
language phase on 4500 questions of 1200 images) trains in 8 min on 2 threads and answers 0.788 of 500
held-out questions (always "no": about 0.37; question-only: about 0.70; the demo LLaVA, whose LM is
trained: 0.93). With 8 vision epochs (loss 0.39 instead of 0.002) it answered 0.800: the frozen LM's
side, not the tower, limits it. The recipe before (1500 questions of 400 images, vision phase on those
400) reached 0.474: single words in the right form, but guessing the image content.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
)

from qsvd.artefacts import MANIFEST, provenance, read_json
from qsvd.demo.build import IMAGE_MEAN, IMAGE_SIZE, IMAGE_STD, PATCH_SIZE, VisionSizes  # the LM's sizes come from SmolLM2
from qsvd.demo.train import fit_vlm, save_demo_model, split_overrides
from qsvd.models.prompts import IGNORE_INDEX

log = logging.getLogger(__name__)

STAGE = "smolvlm_offline_model"
SCALE_FACTOR = 2  # pixel shuffle: 2x2 patches per image token
FAKE_IMAGE, IMAGE, END_OF_UTTERANCE, GLOBAL_IMAGE = "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"
NEW_TOKENS = (FAKE_IMAGE, IMAGE, END_OF_UTTERANCE, GLOBAL_IMAGE)
# SmolVLM's chat template (transformers' SmolVLM default, images and text only):
# "<|im_start|>User:<image>what color is the shape?<end_of_utterance>\nAssistant:" then " red<end_of_utterance>".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}"
    "{% elif item['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# The full recipe (DemoRecipe fields; overrides apply on top). The vision phase is cheap: all 4000 images
# for 24 epochs (this SigLIP-style tower plateaus: loss 1.19 on 400 images, 0.39 after 8 epochs on 4000,
# about 0.002 after 24, under 2 min on one thread; the demo's CLIP tower reaches 0.014 in 8). Every language step runs the
# 135M LM forward and backward (about 4.5 s a step of ~30 questions on one thread), so that phase sees a
# seeded sample of 4500 questions of the first 1200 images, once (1500 of 400 images reached only 0.474).
FULL_RECIPE = {"max_vision_images": 4000, "vision_epochs": 24.0, "max_train_images": 1200, "max_train_questions": 4500,
               "lm_epochs": 1.0, "lm_images_per_step": 8, "lm_lr": 3e-3}


def build_smolvlm_processor(lm_dir: Path) -> Idefics3Processor:
    """Idefics3 processor: SmolLM2's tokenizer plus SmolVLM's special tokens, 64x64 images, no splitting."""
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": list(NEW_TOKENS)})
    tokenizer.eos_token = END_OF_UTTERANCE  # as SmolVLM's tokenizer: an answer ends the utterance
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    image_seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                             chat_template=CHAT_TEMPLATE)


def build_smolvlm_model(processor: Idefics3Processor, lm_dir: Path, seed: int, **sizes: int) -> Idefics3ForConditionalGeneration:
    """A SmolVLM holding SmolLM2's weights from `lm_dir` and a seeded random vision tower and connector.

    The embedding gets one row per added token: <end_of_utterance> starts as SmolLM2's end of turn
    <|im_end|> (so the frozen LM can end an answer from the first step), the others as the mean row.
    """
    dims = VisionSizes(**sizes)
    tokenizer = processor.tokenizer
    text = AutoConfig.from_pretrained(str(lm_dir))
    if text.model_type != "llama":
        raise ValueError(f"{lm_dir} holds a {text.model_type!r} model; smolvlm-offline needs the SmolLM2 (llama) export "
                         "of `qsvd export-smollm2`")
    old_vocab = text.vocab_size
    text.vocab_size = len(tokenizer)
    vision = Idefics3VisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=dims.vision_intermediate,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        tie_word_embeddings=text.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG: seed it, then restore
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    language = AutoModelForCausalLM.from_pretrained(str(lm_dir), dtype=torch.float32)
    weights = language.model.state_dict()
    embed = weights["embed_tokens.weight"]
    if embed.shape[0] != old_vocab:
        raise ValueError(f"{lm_dir}: embedding has {embed.shape[0]} rows, config.vocab_size says {old_vocab}")
    added = _added_rows(embed, tokenizer, old_vocab)
    weights["embed_tokens.weight"] = torch.cat([embed, added])
    model.model.text_model.load_state_dict(weights, strict=True)
    if not text.tie_word_embeddings:
        head = language.lm_head.weight.detach()
        model.lm_head.weight.data.copy_(torch.cat([head, _added_rows(head, tokenizer, old_vocab)]))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model.eval()


def _added_rows(rows: torch.Tensor, tokenizer, old_vocab: int) -> torch.Tensor:
    added = rows.mean(0, keepdim=True).repeat(len(tokenizer) - old_vocab, 1)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if end_of_turn is None or end_of_turn >= old_vocab:
        raise ValueError("the language model's tokenizer has no <|im_end|>: smolvlm-offline needs SmolLM2's tokenizer")
    added[tokenizer.convert_tokens_to_ids(END_OF_UTTERANCE) - old_vocab] = rows[end_of_turn]
    return added


@dataclass(frozen=True)
class SmolVLMParts:
    """Idefics3 for `qsvd.demo.train`: phase 2 trains the connector and the added tokens' embedding rows."""

    original_vocab: int  # rows below this index are SmolLM2's and stay frozen
    family: str = "smolvlm"

    def vision_tower(self, model: Idefics3ForConditionalGeneration) -> nn.Module:
        return model.model.vision_model

    def patch_features(self, model: Idefics3ForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
        return model.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_embeddings(self, model: Idefics3ForConditionalGeneration, features: torch.Tensor) -> torch.Tensor:
        return model.model.connector(features)

    def language_model(self, model: Idefics3ForConditionalGeneration) -> nn.Module:
        return model.model.text_model

    def suffix_loss(self, model: Idefics3ForConditionalGeneration, suffix: torch.Tensor, mask: torch.Tensor, cache: Any,
                    labels: torch.Tensor) -> torch.Tensor:
        # Logits at the answer positions only: the 49k-row LM head is most of the cost at every other one.
        hidden = model.model.text_model(inputs_embeds=suffix, attention_mask=mask, past_key_values=cache).last_hidden_state
        target = labels[:, 1:]
        answer = target != IGNORE_INDEX
        return nn.functional.cross_entropy(model.lm_head(hidden[:, :-1][answer]).float(), target[answer])

    @contextmanager
    def language_phase(self, model: Idefics3ForConditionalGeneration) -> Iterator[list[dict]]:
        # A zero gradient and no weight decay leave AdamW's update of the original rows exactly zero.
        embed = model.get_input_embeddings().weight
        new_rows = (torch.arange(embed.shape[0]) >= self.original_vocab).to(embed.dtype)[:, None]
        model.requires_grad_(False)
        model.model.connector.requires_grad_(True)
        embed.requires_grad_(True)
        hook = embed.register_hook(lambda grad: grad * new_rows)
        try:
            yield [{"params": list(model.model.connector.parameters())}, {"params": [embed], "weight_decay": 0.0}]
        finally:
            hook.remove()
            model.requires_grad_(True)


def language_model_dir(lm_dir: Path) -> Path:
    """`lm_dir` if it holds a checkpoint, else an error naming how to make one."""
    if not (Path(lm_dir) / "config.json").is_file():
        raise FileNotFoundError(f"{lm_dir} holds no SmolLM2 checkpoint (config.json); "
                                f"make it with `qsvd export-smollm2 --out {lm_dir}`")
    return Path(lm_dir)


def fit_smolvlm_offline(lm_dir: Path, seed: int = 0, max_minutes: float = 120.0, **recipe) -> tuple[nn.Module, Idefics3Processor, dict]:
    """Build and train the smolvlm-offline model and measure its held-out accuracy: (model, processor, summary).

    `recipe` overrides `FULL_RECIPE` (then `DemoRecipe`) and `VisionSizes` fields; as the demo, training
    stops at `max_minutes` and is otherwise bit-reproducible given `seed` on one torch thread (see `fit_demo_model`).
    """
    lm_dir = language_model_dir(lm_dir)
    plan, sizes = split_overrides(FULL_RECIPE | recipe, VisionSizes)
    start = time.monotonic()
    processor = build_smolvlm_processor(lm_dir)
    model = build_smolvlm_model(processor, lm_dir, seed, **sizes)
    original_vocab = AutoConfig.from_pretrained(str(lm_dir)).vocab_size
    summary = fit_vlm(model, processor, SmolVLMParts(original_vocab), plan, seed, start, start + 60.0 * max_minutes)
    manifest = Path(lm_dir) / MANIFEST
    config = {"max_minutes": max_minutes, "recipe": asdict(plan), "language_model": str(lm_dir)}
    return model, processor, provenance(STAGE, config, seed) | summary | {
        "sizes": asdict(VisionSizes(**sizes)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trained_parameters": sum(p.numel() for p in model.model.vision_model.parameters())
        + sum(p.numel() for p in model.model.connector.parameters())
        + (len(processor.tokenizer) - original_vocab) * model.config.text_config.hidden_size,
        "image_tokens": processor.image_seq_len,
        "language_model_manifest": read_json(manifest) if manifest.is_file() else None,
    }


def train_smolvlm_offline(out_dir: Path, lm_dir: Path, seed: int = 0, max_minutes: float = 120.0, **recipe) -> dict:
    """Build, train, evaluate and save the smolvlm-offline model with its processor into `out_dir`; return the summary."""
    model, processor, summary = fit_smolvlm_offline(lm_dir, seed, max_minutes, **recipe)
    save_demo_model(out_dir, model, processor, summary)
    return summary

