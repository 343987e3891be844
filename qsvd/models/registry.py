"""Architecture knowledge as data: where each family keeps its LM layers, q/k/v, vision tower, projector.

Keyed by transformers class name. Nothing else in qsvd matches on module names; to support a new
family, add a `ModelFamily` here (and its name to the schema's `model.family` enum).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class ModelFamily:
    """Where one family keeps its parts; every path is a dotted attribute path."""

    name: str  # the value of the config key model.family
    model_classes: tuple[str, ...]  # transformers class names this family covers
    decoder_layers: str  # from the top-level model to the LM decoder-layer ModuleList
    attention: str = "self_attn"  # attribute of a decoder layer
    q_proj: str = "q_proj"  # attributes of the attention module
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    vision_layers: str | None = None  # from the top-level model to the vision encoder layers ModuleList
    projector: str | None = None  # from the top-level model to the vision->LM projector
    multimodal: bool = True  # False: text-only, the processor is a tokenizer and prompts carry no image
    # The LM residual stream's readers and writers (the H1 rotation, method §3); paths from the top level
    # unless noted, decoder-layer parts relative to one decoder layer.
    embeddings: str = "model.language_model.embed_tokens"
    final_norm: str = "model.language_model.norm"
    rotary_embedding: str = "model.language_model.rotary_emb"  # the LM's RoPE module (cos, sin from position ids)
    lm_head: str = "lm_head"
    attention_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_output: str = "mlp.down_proj"
    projector_output: str | None = None  # the projector's last linear: it writes image features into the LM stream
    image_newline: str | None = None  # a learned LM-space vector (LLaVA-NeXT)
    # The vision tower's residual stream (its H1 rotation): paths from the top level, layer parts relative to one
    # vision encoder layer. Its norms are LayerNorms (γ, b).
    vision_embeddings: tuple[str, ...] = ()  # what writes the first residual state (patch conv, position table)
    vision_pre_norm: str | None = None  # a LayerNorm whose output is the residual stream (it writes it)
    vision_post_norm: str | None = None  # a LayerNorm between the last layer and the connector
    vision_output_reader: str | None = None  # the connector's linear reading the stream, as blocks of concatenated tokens
    vision_attention_norm: str = "layer_norm1"
    vision_mlp_norm: str = "layer_norm2"
    vision_qkv: tuple[str, str, str] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    vision_attention_output: str = "self_attn.out_proj"
    vision_mlp_inputs: tuple[str, ...] = ("mlp.fc1",)
    vision_mlp_output: str = "mlp.fc2"


# LLaVA's CLIP tower: pre_layrnorm writes the stream (the embeddings before it need no rotation); the projector
# reads hidden_states[vision_feature_layer], the raw stream (several of them side by side when that is a list).
# CLIP's post_layernorm only feeds the pooled output, which LLaVA does not use: it is left as it is.
CLIP_VISION_STREAM = dict(
    vision_pre_norm="model.vision_tower.pre_layrnorm",
    vision_output_reader="model.multi_modal_projector.linear_1",
)

FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily(
            name="llava",
            model_classes=("LlavaForConditionalGeneration",),
            decoder_layers="model.language_model.layers",
            vision_layers="model.vision_tower.encoder.layers",
            projector="model.multi_modal_projector",
            projector_output="model.multi_modal_projector.linear_2",
            **CLIP_VISION_STREAM,
        ),
        ModelFamily(
            name="llava-next",
            model_classes=("LlavaNextForConditionalGeneration",),
            decoder_layers="model.language_model.layers",
            vision_layers="model.vision_tower.encoder.layers",
            projector="model.multi_modal_projector",
            projector_output="model.multi_modal_projector.linear_2",
            **CLIP_VISION_STREAM,
            image_newline="model.image_newline",
        ),
        ModelFamily(
            name="smolvlm",
            model_classes=("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration"),
            decoder_layers="model.text_model.layers",
            vision_layers="model.vision_model.encoder.layers",
            projector="model.connector.modality_projection.proj",
            embeddings="model.text_model.embed_tokens",
            final_norm="model.text_model.norm",
            rotary_embedding="model.text_model.rotary_emb",
            projector_output="model.connector.modality_projection.proj",
            vision_embeddings=("model.vision_model.embeddings.patch_embedding", "model.vision_model.embeddings.position_embedding"),
            vision_post_norm="model.vision_model.post_layernorm",
            # pixel shuffle: each connector input is scale_factor² whole token vectors side by side
            vision_output_reader="model.connector.modality_projection.proj",
        ),
        ModelFamily(
            name="llama",
            model_classes=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
            decoder_layers="model.layers",
            multimodal=False,
            embeddings="model.embed_tokens",
            final_norm="model.norm",
            rotary_embedding="model.rotary_emb",
        ),
    )
}

_HOW_TO_ADD = "add a ModelFamily entry in qsvd/models/registry.py (and its name to the model.family enum of the schema)"
PROJECTIONS = ("q", "k", "v")


def family_by_name(name: str) -> ModelFamily:
    """The family named by the config key model.family."""
    if name not in FAMILIES:
        raise ValueError(f"model.family: unknown model family {name!r}; known families: {sorted(FAMILIES)}")
    return FAMILIES[name]


def supported_classes() -> list[str]:
    return sorted(c for f in FAMILIES.values() for c in f.model_classes)


def family_of_class(class_name: str) -> ModelFamily:
    """The family covering the transformers class `class_name` (e.g. a config's architectures[0])."""
    for family in FAMILIES.values():
        if class_name in family.model_classes:
            return family
    raise ValueError(
        f"unsupported model class {class_name!r}; supported classes: {supported_classes()}; "
        f"to support it, {_HOW_TO_ADD}"
    )


def family_of(model: nn.Module) -> ModelFamily:
    """The family of an instantiated model, by its class name."""
    return family_of_class(type(model).__name__)


def _resolve(root: nn.Module, dotted: str, family: ModelFamily) -> nn.Module:
    module = root
    for part in dotted.split("."):
        if not hasattr(module, part):
            raise AttributeError(
                f"{type(root).__name__} has no submodule {dotted!r} (missing {part!r}), which the registry entry of "
                f"family {family.name!r} names; fix that entry or {_HOW_TO_ADD}"
            )
        module = getattr(module, part)
    return module


def _layer_list(model: nn.Module, dotted: str, family: ModelFamily) -> nn.ModuleList:
    layers = _resolve(model, dotted, family)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}.{dotted} is a {type(layers).__name__}, not a ModuleList; "
                        f"fix the registry entry of family {family.name!r}")
    return layers


def decoder_layers(model: nn.Module, family: ModelFamily) -> nn.ModuleList:
    """The language model's decoder layers."""
    return _layer_list(model, family.decoder_layers, family)


def vision_layers(model: nn.Module, family: ModelFamily) -> nn.ModuleList:
    """The vision encoder's layers (multimodal families only)."""
    if family.vision_layers is None:
        raise ValueError(f"family {family.name!r} has no vision encoder")
    return _layer_list(model, family.vision_layers, family)


def vision_config(model: nn.Module, family: ModelFamily) -> PretrainedConfig:
    """The vision tower's config (multimodal families only)."""
    if not family.multimodal or getattr(model.config, "vision_config", None) is None:
        raise ValueError(f"family {family.name!r} ({type(model).__name__}) has no vision tower config")
    return model.config.vision_config


def projector(model: nn.Module, family: ModelFamily) -> nn.Module:
    """The vision-to-language projector (multimodal families only)."""
    if family.projector is None:
        raise ValueError(f"family {family.name!r} has no vision-to-language projector")
    return _resolve(model, family.projector, family)


def part(root: nn.Module, path: str, family: ModelFamily) -> nn.Module:
    """The submodule (or parameter) at `path`, a registry field's value, below `root`."""
    return _resolve(root, path, family)


def set_part(root: nn.Module, path: str, module: nn.Module, family: ModelFamily) -> None:
    """Replace the existing submodule at `path` below `root` by `module`."""
    parent, _, name = path.rpartition(".")
    holder = _resolve(root, parent, family) if parent else root
    _resolve(holder, name, family)  # the slot must exist: never add a stray attribute
    setattr(holder, name, module)


def attention_of(layer: nn.Module, family: ModelFamily) -> nn.Module:
    """The attention module of one decoder layer."""
    return _resolve(layer, family.attention, family)


def _projection_name(family: ModelFamily, which: str) -> str:
    names = {"q": family.q_proj, "k": family.k_proj, "v": family.v_proj, "o": family.o_proj}
    if which not in names:
        raise ValueError(f"projection {which!r} is not one of {sorted(names)}")
    return names[which]


def qkv_projections(layer: nn.Module, family: ModelFamily) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(q, k, v) projections of one decoder layer: nn.Linear, or their low-rank replacements."""
    attention = attention_of(layer, family)
    return tuple(_resolve(attention, _projection_name(family, which), family) for which in PROJECTIONS)


def set_projection(layer: nn.Module, family: ModelFamily, which: str, module: nn.Module) -> None:
    """Replace the q, k or v projection of a decoder layer's attention by `module`."""
    if which not in PROJECTIONS:
        raise ValueError(f"projection {which!r} is not one of {list(PROJECTIONS)}")
    attention = attention_of(layer, family)
    name = _projection_name(family, which)
    _resolve(attention, name, family)  # the slot must exist: never add a stray attribute
    setattr(attention, name, module)


def text_config(model: nn.Module) -> PretrainedConfig:
    """The language model's config (the model's own config for text-only models)."""
    return model.config.get_text_config()


@dataclass(frozen=True)
class AttentionShape:
    """Sizes of one LM attention layer; q/k/v outputs are heads x head_dim."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_out: int
    k_out: int
    v_out: int


def attention_shape(model: nn.Module) -> AttentionShape:
    """The LM attention sizes from the text config (GQA: num_kv_heads < num_heads)."""
    config = text_config(model)
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return AttentionShape(
        hidden_size=config.hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        q_out=num_heads * head_dim,
        k_out=num_kv_heads * head_dim,
        v_out=num_kv_heads * head_dim,
    )
