"""Architecture knowledge as data: where each family keeps its LM layers, q/k/v, vision tower, projector.

Keyed by transformers class name. Nothing else in qsvd matches on module names; to support a new
family, add a `ModelFamily` here (and its name to the schema's `model.family` enum).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_classes: tuple[str, ...]
    decoder_layers: str  # dotted path from the top-level model to the LM decoder-layer ModuleList
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    vision_layers: str | None = None
    projector: str | None = None
    multimodal: bool = True


FAMILIES: dict[str, ModelFamily] = {
    f.name: f
    for f in (
        ModelFamily(
            name="llava",
            model_classes=("LlavaForConditionalGeneration",),
            decoder_layers="model.language_model.layers",
            vision_layers="model.vision_tower.encoder.layers",
            projector="model.multi_modal_projector",
        ),
        ModelFamily(
            name="llava-next",
            model_classes=("LlavaNextForConditionalGeneration",),
            decoder_layers="model.language_model.layers",
            vision_layers="model.vision_tower.encoder.layers",
            projector="model.multi_modal_projector",
        ),
        ModelFamily(
            name="smolvlm",
            model_classes=("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration"),
            decoder_layers="model.text_model.layers",
            vision_layers="model.vision_model.encoder.layers",
            projector="model.connector.modality_projection.proj",
        ),
        ModelFamily(
            name="llama",
            model_classes=("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"),
            decoder_layers="model.layers",
            multimodal=False,
        ),
    )
}

_HOW_TO_ADD = "add a ModelFamily entry in qsvd/models/registry.py"


def family_by_name(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r} (model.family); known families: {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_class(class_name: str) -> ModelFamily:
    for family in FAMILIES.values():
        if class_name in family.model_classes:
            return family
    supported = sorted(c for f in FAMILIES.values() for c in f.model_classes)
    raise ValueError(f"unsupported model class {class_name!r}; supported: {supported}; to support it, {_HOW_TO_ADD}")


def family_of(model: nn.Module) -> ModelFamily:
    return family_of_class(type(model).__name__)


def _resolve(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        if not hasattr(module, part):
            raise AttributeError(f"{type(root).__name__} has no submodule {dotted!r}; the registry entry is wrong: {_HOW_TO_ADD}")
        module = getattr(module, part)
    return module


def decoder_layers(model: nn.Module, family: ModelFamily) -> nn.ModuleList:
    return _resolve(model, family.decoder_layers)


def attention_of(layer: nn.Module, family: ModelFamily) -> nn.Module:
    return _resolve(layer, family.attention)


def qkv_projections(layer: nn.Module, family: ModelFamily) -> tuple[nn.Module, nn.Module, nn.Module]:
    attention = attention_of(layer, family)
    return tuple(_resolve(attention, name) for name in (family.q_proj, family.k_proj, family.v_proj))


def set_projection(layer: nn.Module, family: ModelFamily, which: str, module: nn.Module) -> None:
    """Replace the q, k or v projection of a decoder layer's attention."""
    names = {"q": family.q_proj, "k": family.k_proj, "v": family.v_proj}
    if which not in names:
        raise ValueError(f"projection {which!r} is not one of {sorted(names)}")
    setattr(attention_of(layer, family), names[which], module)
