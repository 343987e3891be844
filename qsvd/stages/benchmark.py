"""Stage 10 (benchmark): time to first token, decode time per token, cache and weight bytes and peak memory of one
model over a grid of batch sizes × context lengths, every decode figure beside its physical bound.

One job measures one variant of a run:
- a compressed checkpoint (`lowrank_model` or `quantize` stage), loaded by `qsvd.from_pretrained` and measured in
  every mode of `cache_modes` (a mode whose plan caches what an earlier one does is not measured twice); a quantized
  one with integer kernels (`real`) and with dequantized float weights (`simulated`), as `executions` asks;
- the uncompressed model: the peers a user would pick instead (`PEERS`), each on the dense model; a peer whose
  package is not importable gives a "not installed" row.
Every row is labelled `real` (what is stored computes: float weights, or integer codes through the kernels its
`kernels` count names; the cache holds its own tensors) or `simulated` (quantized weights held as floats).

Per cell: a random prompt of `context` tokens (no special token) is prefilled in one forward, only the last
position's logits computed (its time: TTFT); then `warmup` + `decode_steps` single-token greedy steps, the median of
the last `decode_steps` being the time per token. The cache's bytes are summed from its tensors (scales and
positions included) and set beside the cost model's prediction. A cell whose estimated peak memory exceeds the
limit is skipped, and its row says so. Each subject gets one short warm-up generation first.

Beside each decode figure stands its bound (`qsvd.measure.decode_work`, `decode_bound`: the bytes a step moves over
the measured bandwidth, or its operations over the measured matmul peaks, whichever is larger): the row's
`decode_vs_bound` says how far the figure is from it.
"""

from __future__ import annotations

import gc
import importlib
import logging
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from qsvd.artefacts import MANIFEST, provenance, read_json, write_json
from qsvd.machine import Roofline, describe_machine
from qsvd.math.cost import CACHE_MODES, cache_bytes
from qsvd.measure import (
    activation_bytes,
    cache_nbytes,
    current_bytes,
    decode_bound,
    decode_path,
    decode_work,
    dense_cache_bytes,
    kernel_counts,
    matmul_weights,
    memory_limit,
    module_bytes,
    peak_rss_bytes,
    random_prompt,
    reset_peak_rss,
    time_decode,
)
from qsvd.models.checkpoint import from_pretrained, is_compressed_checkpoint, open_model
from qsvd.models.device import dtype_by_name, resolve_device
from qsvd.models.latent_attention import layer_cache_plans, new_cache, use_latent_cache
from qsvd.models.registry import attention_shape, family_by_name, family_of, text_config
from qsvd.models.surgery import layer_shapes

log = logging.getLogger(__name__)

EXECUTIONS = ("real", "simulated")


@dataclass(frozen=True)
class Grid:
    """The cells measured and how: batch sizes × context lengths, decode steps timed after `warmup` untimed ones."""

    batch_sizes: tuple[int, ...] = (1, 4, 16)
    contexts: tuple[int, ...] = (128, 512, 2048, 8192)
    decode_steps: int = 16
    warmup: int = 4
    max_prompt_tokens: int | None = None  # cells whose batch × context exceeds it are skipped (listed)

    def __post_init__(self) -> None:
        if min(self.batch_sizes) < 1 or min(self.contexts) < 1 or self.decode_steps < 1 or self.warmup < 0:
            raise ValueError(f"benchmark grid needs batch sizes, contexts and decode_steps ≥ 1, warmup ≥ 0: {self}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"benchmark max_prompt_tokens must be ≥ 1 or None, got {self.max_prompt_tokens}")


@dataclass(frozen=True)
class Peer:
    """An alternative measured on the dense model: its cache (transformers' DynamicCache, or QuantizedCache with a
    backend), its weights, and the package it needs."""

    description: str
    backend: str | None = None  # QuantizedCache backend; None: DynamicCache
    nbits: int | None = None
    dtype: str | None = None  # None: the run's dtype
    torchao_int8: bool = False  # torchao's Int8DynamicActivationInt8WeightConfig on every linear
    requires: str | None = None  # the module that must import
    package: str | None = None  # what to install (also in the `bench` extra)


PEERS = {
    "dynamic-float32": Peer("dense float32, DynamicCache", dtype="float32"),
    "dynamic-bfloat16": Peer("dense bfloat16, DynamicCache", dtype="bfloat16"),
    "quantized-fp8": Peer("dense, QuantizedCache fp8 (per-tensor)", backend="fp8"),
    "quanto-int4": Peer("dense, QuantizedCache quanto int4", "quanto", 4, requires="optimum.quanto",
                        package="optimum-quanto"),
    "quanto-int2": Peer("dense, QuantizedCache quanto int2", "quanto", 2, requires="optimum.quanto",
                        package="optimum-quanto"),
    "hqq-int4": Peer("dense, QuantizedCache HQQ int4", "hqq", 4, requires="hqq", package="hqq"),
    "torchao-int8": Peer("dense, torchao Int8DynamicActivationInt8Weight, DynamicCache", torchao_int8=True,
                         requires="torchao", package="torchao"),
}


@dataclass
class Subject:
    """One model measured over the grid, and how it caches."""

    runner: str  # "qsvd" or a PEERS key
    description: str
    cache_mode: str
    execution: str
    model: nn.Module
    make_cache: Callable[[], object]
    predict: Callable[[int, int], int | None]  # (batch, tokens) -> the cache bytes the cost model predicts
    kernels: dict[str, int]



def _value_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _latent_bits(manifest: dict) -> int | None:
    """The bits of the cached latent codes (the quantize stage's latent_down layers), None for float latents."""
    layers = (manifest.get("quantization") or {}).get("layers", [])
    bits = {layer.get("latent_bits") for layer in layers if layer["kind"] == "latent_down"}
    if len(bits) > 1:
        raise ValueError(f"latent_down layers are cached at {sorted(map(str, bits))} bits: the cost model takes one")
    return next(iter(bits), None)


def _not_measured(runner: str, description: str, status: str, reason: str, **fields) -> dict:
    return {"runner": runner, "description": description, "status": status, "reason": reason, **fields}


def compressed_subjects(path: str | Path, family: str, dtype: torch.dtype, device: torch.device,
                        cache_modes: tuple[str, ...], executions: tuple[str, ...]) -> Iterator[Subject | dict]:
    """A compressed checkpoint in every cache mode, per execution (a quantized one: integer kernels, `real`, and
    dequantized floats, `simulated`; any other: `real` only). One model is held at a time."""
    manifest = read_json(Path(path) / MANIFEST)
    if manifest["family"] != family:
        raise ValueError(f"checkpoint {path} is of family {manifest['family']!r}, not {family!r}")
    adapter = family_by_name(family)
    quantized = "quantization" in manifest
    ranks = [unit["rank"] for unit in manifest.get("units") or []]
    latent_bits = _latent_bits(manifest)
    value_bytes = _value_bytes(dtype)
    measured = set()
    for execution in executions if quantized else ("real",):
        model = from_pretrained(path, device=device, dtype=dtype, cache_mode=cache_modes[0], integer=execution == "real")
        kernels = kernel_counts(model)
        label = "real" if not quantized or kernels else "simulated"  # no layer packed: the floats are what runs
        description = "qsvd " + (manifest["quantization"]["label"] if quantized else "low-rank")
        if label in measured:
            yield _not_measured("qsvd", description, "skipped", f"{execution}: no layer computes with integer kernels, "
                                "the same model as simulated", execution=execution)
            continue
        measured.add(label)
        shapes = layer_shapes(model, adapter)
        plans_seen: dict[str, list] = {}
        for mode in cache_modes:
            plans = use_latent_cache(model, mode)
            same = next((earlier for earlier, seen in plans_seen.items() if seen == plans), None)
            if same is not None:
                yield _not_measured("qsvd", description, "skipped", f"caches what {same} does (no unit caches a latent "
                                    "there)", cache_mode=mode, execution=label)
                continue
            plans_seen[mode] = plans
            if ranks:
                def predict(batch, tokens, mode=mode):
                    return cache_bytes(shapes, ranks, manifest["layout"], mode, batch, tokens, value_bytes, latent_bits)
            else:  # a quantized dense model (QuaRot): K and V as transformers caches them
                def predict(batch, tokens):
                    return dense_cache_bytes(model, adapter, batch, tokens, value_bytes)
            yield Subject("qsvd", description, mode, label, model, lambda: new_cache(model), predict, kernels)
        del model
        gc.collect()


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _torchao_int8(model: nn.Module) -> dict[str, int]:
    """torchao's dynamic int8 activations × int8 weights on every linear of `model`, in place."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    return {"torchao-int8": linears}


def peer_subjects(source: str, family: str, dtype: torch.dtype, device: torch.device,
                  peers: tuple[str, ...]) -> Iterator[Subject | dict]:
    """The dense model with each peer's cache and weights; a peer whose package does not import: a row saying so."""
    from transformers import DynamicCache, QuantizedCache

    adapter = family_by_name(family)
    for name in peers:
        peer = PEERS[name]
        if peer.requires and not _importable(peer.requires):
            yield _not_measured(name, peer.description, "not installed", f"{peer.requires} does not import: pip "
                                f"install {peer.package} (or qsvd's `bench` extra)", cache_mode="kv", execution="real")
            continue
        peer_dtype = dtype_by_name(peer.dtype) if peer.dtype else dtype
        model, _ = open_model(source, family, peer_dtype, device)
        kernels = _torchao_int8(model) if peer.torchao_int8 else {}
        value_bytes = _value_bytes(peer_dtype)
        if peer.backend is None:
            def make(): return DynamicCache()
            def predict(batch, tokens): return dense_cache_bytes(model, adapter, batch, tokens, value_bytes)
        elif peer.backend == "fp8":  # one byte a value, one fp32 scale for K and one for V per layer
            def make(): return QuantizedCache(backend="fp8", config=model.config)
            def predict(batch, tokens): return dense_cache_bytes(model, adapter, batch, tokens, 1, scales=2)
        else:  # group-wise codes and a full-precision residual window: no formula here, the bytes are measured
            def make(peer=peer): return QuantizedCache(backend=peer.backend, config=model.config, nbits=peer.nbits)
            def predict(batch, tokens): return None
        yield Subject(name, peer.description, "kv", "real", model, make, predict, kernels)
        del model
        gc.collect()


def _precisions(subject: Subject) -> tuple[str, str]:
    """(the weight matmuls' precision, the attention's) for the subject's bound."""
    floats = str(next(subject.model.parameters()).dtype).removeprefix("torch.")
    integer = "int_mm" in subject.kernels or "torchao-int8" in subject.kernels
    return ("int8" if integer else floats), floats


def measure_subject(subject: Subject, grid: Grid, device: torch.device, limit: int, roofline: Roofline,
                    generator: torch.Generator) -> list[dict]:
    """One row per cell of the grid: timings, bytes, peak memory and the bound; or why the cell was not measured."""
    model = subject.model
    adapter = family_of(model)
    path = decode_path(model, adapter)
    path_bytes, elements = module_bytes(path), matmul_weights(path)
    plans = layer_cache_plans(model, subject.cache_mode)
    shape = attention_shape(model)
    dtype = next(model.parameters()).dtype
    weight_precision, float_precision = _precisions(subject)
    positions = getattr(text_config(model), "max_position_embeddings", None) or float("inf")
    base = {"runner": subject.runner, "description": subject.description, "cache_mode": subject.cache_mode,
            "execution": subject.execution, "kernels": subject.kernels, "dtype": str(dtype).removeprefix("torch."),
            "weight_bytes": module_bytes([model]), "decode_path_weight_bytes": path_bytes,
            "decode_steps": grid.decode_steps, "warmup": grid.warmup}
    warm = random_prompt(model, 1, 8, generator).to(device)
    time_decode(model, subject.make_cache(), warm, 1, 1)  # first-call costs (allocator, kernel choice) off the grid
    base["cache"] = type(subject.make_cache()).__name__
    rows = []
    for context in grid.contexts:
        for batch in grid.batch_sizes:
            tokens = context + grid.warmup + grid.decode_steps
            predicted = subject.predict(batch, tokens)
            held = dense_cache_bytes(model, adapter, batch, tokens, _value_bytes(dtype)) if predicted is None else predicted
            estimate = current_bytes(device) + held + activation_bytes(model, batch, context)
            row = base | {"batch": batch, "context": context, "tokens": tokens, "estimated_peak_bytes": estimate}
            rows.append(row)
            if tokens > positions:
                row.update(status="skipped", reason=f"{tokens} tokens exceed the model's max_position_embeddings "
                           f"({positions})")
                continue
            if grid.max_prompt_tokens is not None and batch * context > grid.max_prompt_tokens:
                row.update(status="skipped", reason=f"batch × context = {batch * context} prompt tokens > "
                           f"benchmark.max_prompt_tokens ({grid.max_prompt_tokens})")
                continue
            if estimate > limit:
                row.update(status="skipped", reason=f"estimated peak {estimate / 2**30:.2f} GiB > memory limit "
                           f"{limit / 2**30:.2f} GiB")
                log.info("%s %s b=%d L=%d: %s", subject.runner, subject.cache_mode, batch, context, row["reason"])
                continue
            gc.collect()
            scope = reset_peak_rss()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            cache = subject.make_cache()
            prompt = random_prompt(model, batch, context, generator).to(device)
            try:
                ttft, times = time_decode(model, cache, prompt, grid.decode_steps, grid.warmup)
            except (torch.OutOfMemoryError, MemoryError) as error:
                row.update(status="out of memory", reason=str(error).splitlines()[0][:300])
                del cache, prompt
                gc.collect()
                continue
            decode_ms = statistics.median(times)
            measured = cache_nbytes(cache)
            work = decode_work(plans, shape.q_out, shape.num_heads, batch, tokens, elements, path_bytes, measured)
            bound = decode_bound(work, roofline.bandwidth, roofline.peak(weight_precision), roofline.peak(float_precision))
            row.update(
                status="ok", ttft_ms=ttft, prefill_tokens_per_s=1000 * batch * context / ttft, decode_ms=decode_ms,
                decode_ms_range=[min(times), max(times)], tokens_per_s=1000 * batch / decode_ms, cache_bytes=measured,
                predicted_cache_bytes=predicted, cache_ratio=None if not predicted else measured / predicted,
                peak_rss_bytes=peak_rss_bytes(), peak_rss_scope=scope,
                cuda_max_allocated_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                bound=bound | {"weight_precision": weight_precision, "float_precision": float_precision},
                decode_vs_bound=decode_ms / bound["bound_ms"],
            )
            log.info("%s %s %s b=%d L=%d: TTFT %.1f ms, %.2f ms/token (bound %.3f ms), cache %d B (%s)", subject.runner,
                     subject.cache_mode, subject.execution, batch, context, ttft, decode_ms, bound["bound_ms"], measured,
                     "-" if not predicted else f"{measured / predicted:.3f} of predicted")
            del cache, prompt
    return rows


def run_benchmark(
    model_source: str,
    family: str,
    out_path: Path,
    labels: dict,
    grid: Grid = Grid(),
    cache_modes: tuple[str, ...] = CACHE_MODES,
    executions: tuple[str, ...] = EXECUTIONS,
    peers: tuple[str, ...] = tuple(PEERS),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    memory_limit_gib: float | None = None,
    seed: int = 0,
    roofline: Roofline | None = None,
) -> Path:
    """Benchmark one model (a compressed checkpoint in its cache modes and executions, else the dense model with
    every peer) over `grid`; `labels` (model, method, budget, ...) go in the result. The machine's ceilings are
    measured here unless `roofline` (measured on the same device) is given."""
    for key, values, allowed in (("cache_modes", cache_modes, CACHE_MODES), ("executions", executions, EXECUTIONS),
                                 ("peers", peers, tuple(PEERS))):
        unknown = [v for v in values if v not in allowed]
        if unknown or (key != "peers" and not values):
            raise ValueError(f"benchmark.{key}: {unknown or 'empty'}; use some of {list(allowed)}")
    device = resolve_device(device)
    if is_compressed_checkpoint(model_source):
        subjects = compressed_subjects(model_source, family, dtype, device, tuple(cache_modes), tuple(executions))
    else:
        subjects = peer_subjects(str(model_source), family, dtype, device, tuple(peers))
    config = {"model_source": str(model_source), "family": family, "grid": asdict(grid), "cache_modes": list(cache_modes),
              "executions": list(executions), "peers": list(peers), "dtype": str(dtype), "device": str(device),
              "memory_limit_gib": memory_limit_gib}
    return measure_subjects(subjects, out_path, labels, config, grid, device, memory_limit_gib, seed, roofline)


def measure_subjects(subjects: Iterator[Subject | dict], out_path: Path, labels: dict, config: dict, grid: Grid,
                     device: torch.device, memory_limit_gib: float | None = None, seed: int = 0,
                     roofline: Roofline | None = None) -> Path:
    """Measure each subject over `grid` (a dict is a row already: why it was not measured) and write the result
    with the machine, its measured ceilings and the memory limit; `config` is the resolved stage config on record."""
    generator = torch.Generator().manual_seed(seed)
    machine = describe_machine(device)
    roofline = roofline or Roofline(device)
    limit, limit_source = memory_limit(memory_limit_gib, device)
    rows = []
    for subject in subjects:
        if isinstance(subject, dict):
            rows.append(subject)
        else:
            rows += measure_subject(subject, grid, device, limit, roofline, generator)
        del subject
    roofline.peak("float32")  # always on record, whatever the rows used
    result = provenance("benchmark", config, seed=seed)
    machine["load_average_end"] = describe_machine(device)["load_average"]
    result.update(labels=labels, machine=machine, roofline=roofline.record(), memory_limit_bytes=limit,
                  memory_limit_source=limit_source, rows=rows)
    write_json(out_path, result)
    return Path(out_path)
