"""What each stage job asks a scheduler for (memory, disk, run time), sized from the model's shapes.

Sizes come from the model's config alone (a skeleton on the meta device: no weights are read), so that a
7B run on a cluster asks for what it needs and a small one does not hold a node. The figures are budgets with
headroom, not measurements; `qsvd bench-stages`-style measurements are in the README.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

RUNTIME_OVERHEAD_MB = 2500  # python, torch, transformers, the processor and allocator slack
GIB = 2**30


@dataclass(frozen=True)
class ModelSize:
    """What the resource model needs of a model: parameters, LM shapes, and the dtype it is held in."""

    parameters: int
    layers: int
    hidden_size: int
    largest_linear: int  # elements of the largest LM decoder weight
    qkv_out: int  # rows of the stacked q/k/v weight
    bytes_per_parameter: int

    @property
    def model_bytes(self) -> int:
        return self.parameters * self.bytes_per_parameter


def runs_within(sizes: list[int], limit_bytes: int) -> list[list[int]]:
    """Indices of `sizes`, in order, cut into runs whose sizes add up to at most `limit_bytes` (an item larger
    than that alone): the passes of a stage that may hold only so much at once."""
    runs: list[list[int]] = []
    used = limit_bytes
    for index, size in enumerate(sizes):
        if used + size > limit_bytes:
            runs.append([])
            used = 0
        runs[-1].append(index)
        used += size
    return runs


def model_size(model: nn.Module, bytes_per_parameter: int) -> ModelSize:
    """The size of an instantiated (possibly meta-device) model."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    intermediate = getattr(config, "intermediate_size", 4 * config.hidden_size)
    return ModelSize(
        parameters=sum(p.numel() for p in model.parameters()),
        layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        largest_linear=config.hidden_size * max(intermediate, (heads + 2 * kv_heads) * head_dim),
        qkv_out=(heads + 2 * kv_heads) * head_dim,
        bytes_per_parameter=bytes_per_parameter,
    )


def size_from_config(config, dtype: torch.dtype) -> ModelSize:
    """The size of the model `config` describes, built on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    architecture = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, architecture) if architecture else transformers.AutoModelForCausalLM
    with init_empty_weights():
        model = model_class._from_config(config) if architecture else model_class.from_config(config)
    return model_size(model, torch.empty((), dtype=dtype).element_size())


def stage_resources(stage: str, size: ModelSize, gpu: bool, gram: bool = False) -> dict[str, int]:
    """mem_mb, disk_mb and runtime (minutes) of one job of `stage` for a model of `size`."""
    model = size.model_bytes
    layer = 8 * 4 * size.largest_linear  # one decoder weight's float64 working copies (weight, factors, products)
    qkv_svd = 8 * (2 * size.qkv_out * size.hidden_size + size.hidden_size**2)  # float64 W·T, U and V of one layer
    host_model = model // 4 if gpu else model  # on a GPU the model lives in device memory; the host stages some of it
    billions = size.parameters / 1e9
    memory = {
        "activation_stats": host_model + layer + (8 * size.layers * size.hidden_size**2 if gram else 0),
        "decompose": host_model + 2 * qkv_svd,
        "importance": host_model + model // 4 + 4 * GIB + qkv_svd,
        "lowrank_model": host_model + 2 * qkv_svd,
        "quantize": host_model + model // 2 + 4 * GIB + layer,
        "evaluate": host_model + layer,
    }[stage]
    disk = {
        "activation_stats": 8 * size.layers * size.hidden_size * (size.hidden_size if gram else 2),
        "decompose": 4 * size.layers * (size.qkv_out + size.hidden_size) * size.hidden_size,
        "importance": 8 * size.layers * size.hidden_size,
        "lowrank_model": model // 2,
        "quantize": model // 2,
        "evaluate": 0,
    }[stage]
    minutes_per_billion = {"activation_stats": 5, "decompose": 10, "importance": 30, "lowrank_model": 5,
                           "quantize": 20, "evaluate": 30}[stage]
    if not gpu:
        minutes_per_billion *= 10
    return {
        "mem_mb": RUNTIME_OVERHEAD_MB + int(1.2 * memory) // 2**20,
        "disk_mb": 100 + int(1.2 * disk) // 2**20,
        "runtime": 20 + int(minutes_per_billion * billions),
    }


# Built sources (qsvd.config.BUILT_SOURCES) exist only once their rule ran: sized as the largest of them
# (smolvlm-offline: SmolLM2-135M inside a small SmolVLM, float32).
BUILT_SOURCE_SIZE = ModelSize(parameters=140_000_000, layers=30, hidden_size=576, largest_linear=576 * 1536,
                              qkv_out=960, bytes_per_parameter=4)
GPU_STAGES = ("activation_stats", "decompose", "importance", "lowrank_model", "quantize", "evaluate")


def source_size(config) -> ModelSize:
    """The size of the model a run (qsvd.config.QsvdConfig) configures, from its config only."""
    from qsvd.models.device import dtype_by_name

    dtype = dtype_by_name(config.model.dtype)
    if config.model.source == "random":
        from qsvd.sources.random_model import architecture_config

        random = config.random_model
        return size_from_config(architecture_config(random.architecture, random.layers, random.vision_layers), dtype)
    if config.model.is_built:
        return BUILT_SOURCE_SIZE
    import transformers

    return size_from_config(transformers.AutoConfig.from_pretrained(config.model.source), dtype)


def job_resources(config) -> dict[str, dict[str, int]]:
    """stage -> the resources of its jobs for the run `config` (a qsvd.config.QsvdConfig); "input_gram" is the
    statistics stage with XᵀX."""
    size = source_size(config)
    gpu = config.compute.uses_gpu
    stages = {stage: (stage, False) for stage in GPU_STAGES} | {"input_gram": ("activation_stats", True)}
    resources = {name: stage_resources(stage, size, gpu, gram) | ({"gpu": 1} if gpu else {})
                 for name, (stage, gram) in stages.items()}
    resources["random_model"] = {"mem_mb": RUNTIME_OVERHEAD_MB + int(1.3 * size.model_bytes) // 2**20,
                                 "disk_mb": 100 + int(1.2 * size.model_bytes) // 2**20}
    return resources
