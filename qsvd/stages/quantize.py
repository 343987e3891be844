"""Stage 9: simulated low-precision model: H1/H2 rotations, then weight and activation quantization (method §3).

H1 rotates the LM and, where the vision tower is quantized too, the vision tower.

Input: a low-rank checkpoint (any SVD method) or a dense model (QuaRot, no SVD). Weights are
quantized (RTN with the clipping search, or GPTQ on Hessians of the calibration inputs each layer
actually sees, after its online rotation) and replaced by their dequantized values; the integer codes
and scales are saved beside the checkpoint. Activations are fake-quantized per token at the input of
every quantized linear, the low-rank latent included (the cache precision). Embeddings and lm_head
stay in full precision unless `vocabulary_bits` is set: then both are quantized per row (RTN, symmetric; the
head's input per token at the format's activation bits, at least 8). Every result of this stage is simulated
quantization.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from qsvd.artefacts import clean_stale_temporaries, provenance
from qsvd.math.beta import choose_beta, latent_singular_values, rebalance
from qsvd.math.quantize import WeightFormat, quantize_gptq, quantize_per_token, quantize_rtn
from qsvd.models.checkpoint import QUANTIZED_STAGE, ROTATIONS, open_checkpoint, save_checkpoint, stored_codes
from qsvd.models.device import resolve_device
from qsvd.resources import runs_within
from qsvd.models.quantized import Target, input_transforms, quantization_targets
from qsvd.models.registry import attention_shape, decoder_layers, family_by_name
from qsvd.models.rotation import (Rotations, latent_modules, rotate_language_model, rotate_latents, rotate_vision_tower,
                                  untie_lm_head)
from qsvd.stages.calibration import calibration_batches

WEIGHT_METHODS = ("rtn", "gptq")
BETA_SEARCH_TOKENS = 4096  # calibration tokens per layer for the β search


@dataclass(frozen=True)
class QuantSpec:
    """One precision setting; None bits keep that side in full precision."""

    weight_bits: int | None = 8
    act_bits: int | None = 8
    weight_method: str = "rtn"
    group_size: int | None = None
    symmetric: bool = True
    clip_search: bool = True
    lm_clip: float = 0.9  # activation clip ratios (the paper's 0.9 LM, 0.85 vision)
    vision_clip: float = 0.85
    rotate: bool = True  # H1 and the online rotations
    rotate_latent: bool = True  # H2 (low-rank models only)
    vision: bool = True  # quantize the vision tower and projector too (multimodal families)
    gptq_damping: float = 0.01
    hessian_memory_gib: float = 4.0  # GPTQ Hessians held at once; more targets than fit take further calibration passes
    act_order: bool = False
    beta: float | None = None  # None: β chosen per layer (paper Eq. 14); a number: that β in every layer
    vocabulary_bits: int | None = None  # None: embeddings and lm_head in full precision; else their weight bits
    seed: int = 0

    def __post_init__(self) -> None:
        if self.weight_method not in WEIGHT_METHODS:
            raise ValueError(f"weight_method must be one of {WEIGHT_METHODS}, got {self.weight_method!r}")
        if self.weight_bits is not None:
            self.weight_format()  # range checks
        if self.act_bits is not None and not 2 <= self.act_bits <= 16:
            raise ValueError(f"act_bits must be in [2, 16] or None, got {self.act_bits}")
        if self.beta is not None and not 0 <= self.beta <= 1:
            raise ValueError(f"beta must be in [0, 1] (or None to choose it per layer), got {self.beta}")
        if self.vocabulary_bits is not None and not 2 <= self.vocabulary_bits <= 8:
            raise ValueError(f"vocabulary_bits must be in [2, 8] or None (full precision), got {self.vocabulary_bits}")

    def weight_format(self) -> WeightFormat:
        return WeightFormat(self.weight_bits, self.symmetric, self.group_size, self.clip_search)

    def bits(self, target: Target) -> tuple[int | None, int | None]:
        """(weight bits, input activation bits) of one target: the format's, or for the vocabulary layers
        `vocabulary_bits` and, at lm_head's input, the format's activation bits but at least 8 (None: full precision)."""
        if target.part != "vocabulary":
            return self.weight_bits, self.act_bits
        act = None if target.kind == "embedding" or self.act_bits is None else max(self.act_bits, 8)
        return self.vocabulary_bits, act

    def uses_gptq(self, target: Target) -> bool:
        """GPTQ where the spec asks for it, except the vocabulary layers (always RTN: no Hessian of an embedding)."""
        return self.weight_method == "gptq" and target.part != "vocabulary"

    def target_format(self, target: Target) -> WeightFormat:
        """The vocabulary layers are quantized per row (symmetric): an embedding row is one token's vector."""
        if target.part == "vocabulary":
            return WeightFormat(self.vocabulary_bits, True, None, self.clip_search)
        return self.weight_format()

    def label(self, lowrank: bool) -> str:
        """"W4A4"; "W4A4, fixed β 0.2" for a low-rank model at one fixed β; "… without rotations" (the ablation)."""
        beta = f", fixed β {self.beta:g}" if lowrank and self.beta is not None else ""
        vocabulary = f", {self.vocabulary_bits}-bit embeddings and lm_head" if self.vocabulary_bits else ""
        return f"W{self.weight_bits or 16}A{self.act_bits or 16}{beta}{vocabulary}" + ("" if self.rotate else " without rotations")


def run_quantize(
    model_source: str,
    family: str,
    data_dir: Path | None,
    spec: QuantSpec,
    out_dir: Path,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = "cpu",
) -> Path:
    """Rotate, quantize and save the model of `model_source`; `data_dir` (calibration) is needed for GPTQ.

    The model is held in `dtype` on `device`; rotations are folded in float64 and each weight is quantized in
    float32, one at a time. The checkpoint stores the integer codes and scales, not dequantized weights."""
    device = resolve_device(device)
    clean_stale_temporaries(out_dir)  # a killed earlier run's full-size temporary checkpoint
    model, processor, base_manifest = open_checkpoint(model_source, family, dtype, device)
    adapter = family_by_name(family)
    lowrank = bool(latent_modules(model, adapter))
    if spec.rotate_latent and not spec.rotate:
        raise ValueError("rotate_latent (H2) needs rotate (H1) in this implementation: set both or neither")
    set_beta = lowrank and (spec.weight_bits is not None or spec.act_bits is not None)
    if set_beta:
        sigmas = [latent_singular_values(torch.cat([up.weight.detach().float() for up in ups]), base_manifest["beta"])
                  for _, ups in latent_modules(model, adapter)]
    rotations, latent_rotations = Rotations(), None
    if spec.rotate:
        rotations = rotate_language_model(model, adapter, spec.seed)
        if spec.vision and adapter.multimodal:
            rotate_vision_tower(model, adapter, spec.seed, rotations)
        if spec.rotate_latent and lowrank:
            latent_rotations = rotate_latents(model, adapter, spec.seed, rotations)
    model.to(device)  # the online rotations' stored matrices
    betas = {}
    if set_beta:
        betas = _choose_betas(model, processor, adapter, data_dir, spec, sigmas, latent_rotations, base_manifest["beta"], device)
    if spec.vocabulary_bits:
        untie_lm_head(model, adapter)  # two tables quantized on their own rows (rotated, they differ anyway)
    targets = quantization_targets(model, adapter, vision=spec.vision and adapter.multimodal,
                                   vocabulary=bool(spec.vocabulary_bits))
    transforms = {t.name: input_transforms(model, t) for t in targets}
    codes: dict[str, torch.Tensor] = {}  # as stored: packed codes, scales and zeros of every quantized weight
    weighted = [t for t in targets if spec.bits(t)[0] is not None]
    by_gptq = [t for t in weighted if spec.uses_gptq(t)]
    runs = [(run, True) for run in hessian_batches(model, by_gptq, int(spec.hessian_memory_gib * 2**30))]
    runs.append(([t for t in weighted if not spec.uses_gptq(t)], False))
    progress = tqdm(total=len(weighted), desc=f"quantize weights ({spec.weight_method}, {spec.weight_bits} bits)")
    for batch, with_hessians in runs:
        hessians = _input_hessians(model, processor, adapter, batch, data_dir, device) if with_hessians else {}
        for target in batch:
            codes |= _quantize_weight(model, target, spec, hessians.pop(target.name, None))
            progress.update()
    progress.close()
    for target in targets:
        clip = spec.vision_clip if target.part in ("vision", "projector") else spec.lm_clip
        for _, transform in transforms[target.name]:
            transform.set_quantization(spec.bits(target)[1], clip)
    layers = [_layer_record(model, target, transforms[target.name], spec) | betas.get(target.name, {}) for target in targets]
    manifest = provenance(QUANTIZED_STAGE, {"model_source": str(model_source), "family": family,
                                             "data_dir": None if data_dir is None else str(data_dir), **dataclasses.asdict(spec),
                                             "dtype": str(dtype), "device": str(device)}, spec.seed)
    manifest.update(
        family=family,
        quantization={
            "simulated": True,
            "label": spec.label(lowrank),
            "spec": dataclasses.asdict(spec),
            "rotations": rotations.roles,
            "layers": layers,
            "full_precision": _full_precision(adapter, spec),
        },
        cost=_quantized_cost(base_manifest.get("cost", {"R1": 1.0, "R2": 1.0}), spec) | _byte_figures(
            model, adapter, codes, {t.name: spec.bits(t)[0] for t in weighted}, spec, base_manifest),
        layout=base_manifest.get("layout"),
        units=base_manifest.get("units", []),
    )
    for key in ("beta", "method"):
        if key in base_manifest:
            manifest[key] = base_manifest[key]
    if betas:
        manifest["beta"] = "per layer (searched)" if spec.beta is None else spec.beta
    return save_checkpoint(model, processor, out_dir, manifest, extra_tensors={ROTATIONS: rotations.matrices}, quantized_codes=codes)


def _choose_betas(model, processor, family, data_dir: Path | None, spec: QuantSpec, sigmas, latent_rotations, beta: float,
                  device) -> dict[str, dict]:
    """Set every latent's β in place, rebalancing its factors: `spec.beta`, or where it is None the β of
    the grid with the smallest quantized output error on calibration inputs (RTN as the weight quantizer)."""
    units = latent_modules(model, family)
    names = {id(module): name for name, module in model.named_modules()}
    inputs: dict[str, list[torch.Tensor]] = {}
    if spec.beta is None:
        if data_dir is None:
            raise ValueError("the per-layer β search needs calibration data (--data); set beta to a number to fix β instead")

        def record(name: str, x: torch.Tensor) -> None:
            inputs.setdefault(name, []).append(x.detach().reshape(-1, x.shape[-1]))

        targets = [Target(names[id(down)], "lm", "latent_down") for down, _ in units]
        _calibration_pass(model, processor, family, data_dir, targets, record, "β search inputs", device)
    fmt = spec.weight_format() if spec.weight_bits is not None else None

    def quantize_weight(weight):
        return weight if fmt is None else quantize_rtn(weight, fmt).dequantize()

    def quantize_activation(x):
        return x if spec.act_bits is None else quantize_per_token(x, spec.act_bits, spec.lm_clip)

    chosen = {}
    for index, (down, ups) in enumerate(tqdm(units, desc="per-layer β" if spec.beta is None else f"β = {spec.beta:g}")):
        up = torch.cat([u.weight.detach().float() for u in ups])
        rotation = None if latent_rotations is None else latent_rotations[index].to(up.device)
        record = {"beta": spec.beta}
        if spec.beta is None:
            tokens = torch.cat(inputs.pop(names[id(down)]))[:BETA_SEARCH_TOKENS].float()
            best, errors = choose_beta(tokens, down.weight.detach().float(), up, sigmas[index], beta, quantize_weight,
                                       quantize_activation, rotation)
            record = {"beta": best, "beta_errors": {f"{b:g}": e for b, e in errors.items()}}
        new_down, new_up = rebalance(down.weight.detach().float(), up, sigmas[index], record["beta"] - beta, rotation)
        with torch.no_grad():
            down.weight.copy_(new_down.to(down.weight.dtype))
            for u, part_weight in zip(ups, new_up.split([u.out_features for u in ups])):
                u.weight.copy_(part_weight.to(u.weight.dtype))
        chosen[names[id(down)]] = record
    return chosen


def _quantize_weight(model, target: Target, spec: QuantSpec, hessian: torch.Tensor | None) -> dict[str, torch.Tensor]:
    module = model.get_submodule(target.name)
    fmt = spec.target_format(target)
    weight = module.weight.detach().float()  # one layer's float32 working copy
    if spec.uses_gptq(target):
        quantized = quantize_gptq(weight, hessian, fmt, spec.gptq_damping, act_order=spec.act_order)
    else:
        quantized = quantize_rtn(weight, fmt)
    with torch.no_grad():
        module.weight.copy_(quantized.dequantize(module.weight.dtype))
    return stored_codes(target.name, quantized, fmt.bits)


def _calibration_pass(model, processor, family, data_dir: Path, targets: list[Target], record, what: str, device) -> None:
    """Run the calibration samples once, calling `record(name, x)` with the input of every target's matmul
    (after its online rotation); every target must be reached."""
    reached = set()

    def hook(name):
        def observe(module, args, out) -> None:  # returns None: a forward hook's return value replaces the output
            reached.add(name)
            record(name, out)

        return observe

    handles = []
    try:
        for target in targets:
            module = model.get_submodule(target.name)
            transform = module.down.latent_transform if target.kind == "latent_up" else module.input_transform
            handles.append(transform.register_forward_hook(hook(target.name)))
        with torch.no_grad():
            dtype = next(model.parameters()).dtype
            batches = calibration_batches(processor, family, data_dir, with_answer=False, device=device, dtype=dtype)
            for batch in tqdm(batches, desc=what):
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    missing = [t.name for t in targets if t.name not in reached]
    if missing:
        raise RuntimeError(f"no calibration input reached {missing[:3]}: is the calibration set for this model's modality?")


def hessian_batches(model, targets: list[Target], limit_bytes: int) -> list[list[Target]]:
    """`targets` in order, cut into runs whose float64 Hessians (in_features² × 8 bytes each) fit in
    `limit_bytes` (a target larger than that alone). Each run is one calibration pass: it sees the
    weights of the runs before it already quantized, as in layer-by-layer GPTQ."""
    sizes = [8 * model.get_submodule(target.name).weight.shape[1] ** 2 for target in targets]
    return [[targets[i] for i in run] for run in runs_within(sizes, limit_bytes)]


def _input_hessians(model, processor, family, targets: list[Target], data_dir: Path | None, device) -> dict[str, torch.Tensor]:
    """H = Σ xᵀx (float64) of every target's matmul input over the calibration samples (full-precision activations)."""
    if data_dir is None:
        raise ValueError("weight_method gptq needs calibration data (--data): the Hessians come from its inputs")
    hessians: dict[str, torch.Tensor] = {}

    def record(name: str, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        hessians[name] = hessians.get(name, 0) + flat.T @ flat

    _calibration_pass(model, processor, family, data_dir, targets, record, "GPTQ Hessians", device)
    return hessians


def _full_precision(family, spec: QuantSpec) -> list[str]:
    """The parts the quantized model keeps in full precision."""
    kept = [] if spec.vocabulary_bits else ["embeddings", "lm_head"]
    if family.multimodal and not spec.vision:
        kept += ["vision tower", "projector"]
    elif family.multimodal:
        kept += ["vision embeddings"] + (["vision pre-norm affine map (rotated)"] if spec.rotate and family.vision_pre_norm else [])
    return kept


def _layer_record(model, target: Target, transforms, spec: QuantSpec) -> dict:
    """What is quantized at one layer: weight bits and format (and how its codes are stored), each activation
    quantizer and rotation."""
    weight_bits = spec.bits(target)[0]
    method = "gptq" if spec.uses_gptq(target) else "rtn"
    record = {"name": target.name, "part": target.part, "kind": target.kind,
              "weight_bits": weight_bits, "weight_method": method if weight_bits else None}
    if weight_bits:
        columns = model.get_submodule(target.name).weight.shape[1]
        group = spec.target_format(target).group_size or columns
        record.update(weight_columns=columns, weight_group_size=min(group, columns))  # wider groups: one per row
    for role, transform in transforms:
        record[f"{role}_bits"] = transform.bits
        record[f"{role}_clip"] = transform.clip_ratio if transform.bits else None
        if transform.rotation_kind:
            record[f"{role}_rotation"] = f"{transform.rotation_kind}({transform.rotation_size})"
    if target.kind == "latent_up":
        record["input_bits"] = spec.act_bits
        record["input"] = "the shared latent, quantized once by its down-projection"
    return record


def _byte_figures(model, family, codes: dict[str, torch.Tensor], bits: dict[str, int], spec: QuantSpec,
                  base_manifest: dict) -> dict:
    """Model bytes (integer codes at each layer's `bits` + fp16 scales/zeros + everything else at fp16) and cache bytes per token
    (cached elements at activation bits + one fp16 scale per cached vector per token)."""
    quantized = {name[: -len(".codes")] for name in codes if name.endswith(".codes")}
    code_bytes = sum(model.get_submodule(name).weight.numel() * bits[name] / 8 for name in quantized)
    code_bytes += sum(t.numel() * 2 for name, t in codes.items() if not name.endswith(".codes"))
    other = sum(p.numel() for name, p in model.named_parameters() if name.rpartition(".")[0] not in quantized)
    shape = attention_shape(model)
    layers = len(decoder_layers(model, family))
    dense_cache = layers * (shape.k_out + shape.v_out)
    elements = base_manifest["cost"]["kv_cache_bytes_per_token"] / 2 if "cost" in base_manifest else dense_cache
    vectors = 2 * layers
    if base_manifest.get("units"):  # one scale per cached latent, two (K, V) per cached K/V pair
        covered = {(u["layer"], p) for u in base_manifest["units"] for p in u["group"]}
        vectors = sum({"latent": 1, "kv": len(set(u["group"]) & {"k", "v"}), "none": 0}[u["caches"]] for u in base_manifest["units"])
        vectors += sum(1 for layer in range(layers) for p in ("k", "v") if (layer, p) not in covered)
    act_bits = spec.act_bits or 16
    return {
        "weight_bytes": int(code_bytes + 2 * other),
        "dense_weight_bytes": 2 * sum(p.numel() for p in model.parameters()),
        "kv_cache_bytes_per_token": elements * act_bits / 8 + (2 * vectors if spec.act_bits else 0),
        "dense_kv_cache_bytes_per_token": 2 * dense_cache,
    }


def _quantized_cost(cost: dict, spec: QuantSpec) -> dict:
    """R1 scaled by w_bits/16, R2 by a_bits/16 (the latent is cached at activation precision), paper Table 2."""
    weight, act = (spec.weight_bits or 16) / 16, (spec.act_bits or 16) / 16
    return {**cost, "R1": cost["R1"] * weight, "R2": cost["R2"] * act, "R1_fp16": cost["R1"], "R2_fp16": cost["R2"]}
