"""Measuring a model at inference: the bytes it holds (weights, generation caches), what a decode step must move
and compute (and so its bound on a machine of measured bandwidth and peaks), timed prefill and decode steps, and
peak memory (the kernel's peak-RSS mark, reset per measurement where Linux allows; CUDA's maximum allocated).

The bound of a decode step is the arithmetic of the notes' "The physical limit for decode": bytes = the decode
path's weights + the cache, each read once; operations = 2·b·(matmul weights) + attention over the L cached tokens
(2·b·L·d_q for QKᵀ; 2·b·L·d_q for PV, or 2·b·L·H·r for the absorbed V; 2·b·L·r·d_k for a K rebuild); bound =
max(bytes / bandwidth, weight operations / their peak + attention operations / the float peak).
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from qsvd.machine import GIB, synchronize
from qsvd.math.cost import LayerCache
from qsvd.models.latent_attention import CACHE_ARGUMENT
from qsvd.models.latent_cache import LatentCache
from qsvd.models.registry import attention_shape, decoder_layers, part, text_config
from qsvd.models.surgery import layer_shapes


# ---------------------------------------------------------------------------------------------------------- bytes

def tensor_bytes(value, seen: set | None = None) -> int:
    """Bytes of the tensors in `value` (a tensor, a tensor subclass holding inner tensors, or nested tuples, lists and
    dicts of them), each storage counted once."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        if is_traceable_wrapper_subclass(value):  # torchao's quantized weights (also as nn.Parameter), DTensor, ...
            names, _ = value.__tensor_flatten__()
            return sum(tensor_bytes(getattr(value, name), seen) for name in names)
        key = (value.device, value.untyped_storage().data_ptr()) if value.numel() else None
        if key in seen:
            return 0
        if key is not None:
            seen.add(key)
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v, seen) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v, seen) for v in value.values())
    return 0


def module_bytes(modules: list[nn.Module]) -> int:
    """Parameter and buffer bytes of `modules` (tied and shared tensors once)."""
    seen: set = set()
    return sum(tensor_bytes(t, seen) for module in modules for t in [*module.parameters(), *module.buffers()])


def cache_nbytes(cache) -> int:
    """Bytes a generation cache holds: `LatentCache.nbytes`, else every tensor of every layer (quantized stores,
    their scales and any full-precision residual)."""
    if isinstance(cache, LatentCache):
        return cache.nbytes
    seen: set = set()
    return sum(tensor_bytes(list(vars(layer).values()), seen) for layer in cache.layers)


def dense_cache_bytes(model: nn.Module, family, batch: int, tokens: int, value_bytes: float, scales: int = 0) -> int:
    """K and V of every LM layer at `value_bytes` per value, plus `scales` fp32 scalars per layer."""
    shapes = layer_shapes(model, family)
    return round(batch * tokens * sum(s.k_out + s.v_out for s in shapes) * value_bytes) + 4 * scales * len(shapes)


def decode_path(model: nn.Module, family) -> list[nn.Module]:
    """The modules every decode step reads: the LM decoder layers, the final norm and the LM head."""
    return [*decoder_layers(model, family), part(model, family.final_norm, family), part(model, family.lm_head, family)]


def matmul_weights(modules: list[nn.Module]) -> int:
    """Elements of every matmul weight in `modules` (float, torchao, or qsvd's packed integer weights)."""
    from qsvd.models.packed import PackedWeight

    total, seen = 0, set()
    for module in (m for root in modules for m in root.modules()):
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, PackedWeight):
            total += module.out_features * module.in_features
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2 \
                and not isinstance(module, nn.Embedding):
            total += module.weight.numel()
    return total


def kernel_counts(model: nn.Module) -> dict[str, int]:
    """How many packed modules compute with each kernel (`int_mm`, `int8pack`, `int4pack`, `dequant`)."""
    return dict(Counter(m.kernel for m in model.modules() if isinstance(getattr(m, "kernel", None), str)))


# ----------------------------------------------------------------------------------------------------------- bound

@dataclass(frozen=True)
class DecodeWork:
    """What one decode step must move and compute."""

    bytes: int
    weight_ops: int
    attention_ops: int


def decode_work(plans: list[LayerCache], q_out: int, heads: int, batch: int, tokens: int, matmul_elements: int,
                path_weight_bytes: int, cache_held: int) -> DecodeWork:
    """The notes' arithmetic for one step at batch `batch` over `tokens` cached tokens (see the module docstring)."""
    attention = 0
    for plan in plans:
        attention += 2 * batch * tokens * q_out  # QKᵀ
        if plan.v_latent is None:
            attention += 2 * batch * tokens * q_out  # PV
        else:
            attention += 2 * batch * tokens * heads * plan.latents[plan.v_latent]  # P·C, then A_v per head
        if plan.k_latent is not None:
            attention += 2 * batch * tokens * plan.latents[plan.k_latent] * plan.k_out  # K = A_k C
    return DecodeWork(path_weight_bytes + cache_held, 2 * batch * matmul_elements, attention)


def decode_bound(work: DecodeWork, bandwidth: float, weight_peak: float, float_peak: float) -> dict:
    """The step's lower bound in ms: memory (bytes / bandwidth) or compute, whichever is larger."""
    memory_ms = 1000 * work.bytes / bandwidth
    compute_ms = 1000 * (work.weight_ops / weight_peak + work.attention_ops / float_peak)
    return {"bytes": work.bytes, "weight_ops": work.weight_ops, "attention_ops": work.attention_ops,
            "memory_ms": memory_ms, "compute_ms": compute_ms, "bound_ms": max(memory_ms, compute_ms),
            "bound_by": "memory" if memory_ms >= compute_ms else "compute"}


# ---------------------------------------------------------------------------------------------------------- timing

def random_prompt(model: nn.Module, batch: int, context: int, generator: torch.Generator) -> torch.Tensor:
    """(batch, context) token ids drawn uniformly from the LM vocabulary, image/video placeholder ids excluded."""
    vocab = text_config(model).vocab_size
    special = {getattr(model.config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")}
    ids = torch.randint(0, vocab, (batch, context), generator=generator)
    for token in sorted(t for t in special if isinstance(t, int) and 0 <= t < vocab):
        ids[ids == token] = (token + 1) % vocab if (token + 1) % vocab not in special else (token + 2) % vocab
    return ids


def time_decode(model: nn.Module, cache, prompt: torch.Tensor, steps: int, warmup: int) -> tuple[float, list[float]]:
    """(prefill ms, the timed decode steps' ms): prefill `prompt` into `cache`, then greedy single-token steps."""
    device = prompt.device
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        synchronize(device)
        start = time.perf_counter()
        logits = model(input_ids=prompt, use_cache=True, **keep, **{CACHE_ARGUMENT: cache}).logits
        token = logits[:, -1:].argmax(-1)
        synchronize(device)
        prefill = 1000 * (time.perf_counter() - start)
        times = []
        for step in range(warmup + steps):
            start = time.perf_counter()
            logits = model(input_ids=token, use_cache=True, **{CACHE_ARGUMENT: cache}).logits
            token = logits[:, -1:].argmax(-1)
            synchronize(device)
            if step >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    return prefill, times


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            return next((int(line.split()[1]) for line in status if line.startswith(field + ":")), None)
    except OSError:
        return None


def reset_peak_rss() -> str:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux): "cell"; where it cannot, "process"."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
        return "cell"
    except OSError:
        return "process"


def peak_rss_bytes() -> int:
    """The process's peak resident set since the last reset (VmHWM), else since it started (getrusage)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return 1024 * hwm
    import resource

    return 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def current_bytes(device: torch.device) -> int:
    """What is in use now: CUDA allocated memory on a GPU, the resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return 1024 * (_status_kib("VmRSS") or 0)


def memory_limit(limit_gib: float | None, device: torch.device) -> tuple[int, str]:
    """(bytes, where it came from): the configured limit, else 90% of the GPU's memory or of the memory available
    now plus what this process holds."""
    if limit_gib is not None:
        return int(limit_gib * GIB), "benchmark.memory_limit_gib"
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory), "90% of the GPU's memory"
    available = None
    try:
        with open("/proc/meminfo") as info:
            available = next((1024 * int(line.split()[1]) for line in info if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if available is None:
        raise RuntimeError("cannot read the available memory (/proc/meminfo): set benchmark.memory_limit_gib")
    return int(0.9 * (available + current_bytes(device))), "90% of the memory available at the start"


def activation_bytes(model: nn.Module, batch: int, context: int) -> int:
    """A generous estimate of the prefill's transient memory: one layer's intermediates in float32 (twice), the
    eager attention's scores where it is eager, and one row of logits."""
    config = text_config(model)
    shape = attention_shape(model)
    intermediate = getattr(config, "intermediate_size", 4 * shape.hidden_size)
    per_token = 3 * shape.hidden_size + 2 * intermediate + shape.q_out + 2 * (shape.k_out + shape.v_out)
    total = 2 * 4 * batch * context * per_token + 4 * batch * config.vocab_size
    if getattr(config, "_attn_implementation", "eager") == "eager":
        total += 2 * 4 * batch * shape.num_heads * context * context
    return total
