"""Real integer execution: quantized layers that hold integer weight codes and multiply with integer kernels.

The simulated model (`load_checkpoint`) computes with dequantized float weights; `pack_model` replaces each
quantized layer by a module holding its codes and scales as buffers:
- activations quantized to ≤ 8 bits: rotate, take the per-token int8 codes (`per_token_codes`), one exact
  int8 × int8 → int32 `torch._int_mm` per weight group against the weight's codes stored [N, K] row-major
  (passed as `.t()`: the fast oneDNN path), then rescale by per-token × per-(row, group) scales. Asymmetric
  codes subtract their zero points exactly in integers (x·(q − z)ᵀ = x·qᵀ − (Σ_k x_k)·z, per group).
  Weights of ≤ 4 bits are stored packed two per byte and unpacked to int8 on each call: 4-bit storage,
  int8 arithmetic (PyTorch has no int4 × int4 kernel).
- weight-only (activations not quantized, or above 8 bits), bf16/fp16 on CPU: `aten._weight_int8pack_mm`
  (8-bit symmetric, per row) or `aten._weight_int4pack_mm_for_cpu` (≤ 4 bits, in its own opaque layout);
  anything else dequantizes on each call and runs F.linear (in float32 these kernels are 10 to 100× slower
  than F.linear). The path a module takes is its `kernel`, shown by `extra_repr`.
- the low-rank latent: the packed down-projection computes B x with `_int_mm` and quantizes the latent as its
  `latent_transform` says; each packed up-projection multiplies A_p's codes with the latent's int8 codes.

A packed model is for inference: it is not saved (the checkpoint holds the codes already) nor trained.
"""

from __future__ import annotations

import torch
from torch import nn

from qsvd.math.packing import pack_codes, packs_two_per_byte, unpack_codes
from qsvd.math.quantize import QuantizedWeight, per_token_codes
from qsvd.models.checkpoint import stored_weight
from qsvd.models.input_transform import InputTransform
from qsvd.models.lowrank import LatentUpProjection, SharedDownProjection
from qsvd.models.registry import ModelFamily
from qsvd.models.rotation import latent_modules

LAYOUTS = ("codes", "int8pack", "int4pack")  # how a PackedWeight holds its weight
HALF = (torch.bfloat16, torch.float16)  # the activation dtypes the CPU weight-only kernels are fast for
INT4PACK_GROUPS = (256, 128, 64, 32)  # the group sizes `_weight_int4pack_mm_for_cpu` accepts
INT4PACK_INNER_K_TILES = 2
INT8PACK_K_MULTIPLE = 16  # measured: torch 2.13's CPU `_weight_int8pack_mm` is wrong (or crashes) for other K


def int_mm_rows(x: torch.Tensor, weight: torch.Tensor, pad: bool | None = None) -> torch.Tensor:
    """x · weightᵀ for int8 x [M, K] and weight [N, K] → int32 [M, N], exactly, with `torch._int_mm`.

    On CUDA `_int_mm` needs M > 16 and K, N multiples of 8: with `pad` (default: on CUDA) M is padded to 32 at
    least and K, N to multiples of 8 with zeros, and the result sliced back. (The CUDA path is written, not tested.)"""
    pad = x.device.type == "cuda" if pad is None else pad
    if not pad:
        return torch._int_mm(x, weight.t())
    (m, k), n = x.shape, weight.shape[0]
    pad_m = 32 - m if m <= 16 else -m % 8
    pad_k, pad_n = -k % 8, -n % 8
    if pad_m or pad_k:
        x = nn.functional.pad(x, (0, pad_k, 0, pad_m))
    if pad_k or pad_n:
        weight = nn.functional.pad(weight, (0, pad_k, 0, pad_n))
    return torch._int_mm(x, weight.t())[:m, :n]


def _int4pack_group(columns: int, group_size: int) -> int | None:
    """The kernel group (a supported size dividing both the weight's groups and its width), or None."""
    return next((g for g in INT4PACK_GROUPS if min(group_size, columns) % g == 0 and columns % g == 0), None)


def weight_layout(quantized: QuantizedWeight, bits: int, activation_bits: int | None, dtype: torch.dtype) -> str:
    """How to hold a weight for its fastest path: integer codes for `_int_mm` (activations ≤ 8 bits, and the
    dequantizing fallback), or a CPU weight-only kernel's layout for bf16/fp16 activations where the shape fits."""
    rows, columns = quantized.codes.shape
    if activation_bits is not None and activation_bits <= 8:
        return "codes"
    if dtype not in HALF or quantized.codes.device.type != "cpu":
        return "codes"
    per_row = quantized.group_size >= columns
    if bits == 8 and quantized.zero is None and per_row and columns % INT8PACK_K_MULTIPLE == 0:
        return "int8pack"
    if bits <= 4 and rows % 16 == 0 and _int4pack_group(columns, quantized.group_size) is not None:
        return "int4pack"
    return "codes"


class PackedWeight(nn.Module):
    """One weight's integer codes and scales as buffers, in one of `LAYOUTS`, and its matmuls.

    "codes": ≤ 4-bit codes packed two per byte (uint8 [N, ⌈K/2⌉]), wider ones int8 [N, K] (8-bit asymmetric
    codes shifted by −128, their zero points with them); scales float32 (N, groups); zero points int32.
    "int8pack": int8 [N, K] and per-row scales, for `_weight_int8pack_mm`. "int4pack": the opaque layout of
    `_convert_weight_to_int4pack_for_cpu` and its (K/g, N, 2) scales-and-zeros in the activation dtype."""

    def __init__(self, quantized: QuantizedWeight, bits: int, layout: str, dtype: torch.dtype) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.out_features, self.in_features = quantized.codes.shape
        self.bits, self.group_size, self.layout, self.activation_dtype = bits, quantized.group_size, layout, dtype
        self.symmetric = quantized.zero is None
        self.offset = 128 if bits == 8 and not self.symmetric else 0  # uint8 codes 0..255 → int8
        if layout == "int4pack":
            self._init_int4pack(quantized, dtype)
            return
        codes = quantized.codes
        if packs_two_per_byte(bits):
            codes = pack_codes(codes, bits)
        else:
            codes = (codes.to(torch.int16) - self.offset).to(torch.int8)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", quantized.scale.to(torch.float32).contiguous())
        zero = None if self.symmetric else quantized.zero
        if zero is not None and not zero.is_meta and not torch.equal(zero, zero.round()):
            raise ValueError("asymmetric zero points must be integers for the integer matmul")
        self.register_buffer("zero", None if zero is None else (zero - self.offset).to(torch.int32))

    def _init_int4pack(self, quantized: QuantizedWeight, dtype: torch.dtype) -> None:
        columns = self.in_features
        group = _int4pack_group(columns, quantized.group_size)
        values = quantized.codes.to(torch.int32) + (8 if self.symmetric else 0)  # the kernel's q in 0..15
        self.register_buffer("codes", torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, INT4PACK_INNER_K_TILES))
        owner = torch.arange(columns // group, device=values.device) * group // quantized.group_size
        scale = quantized.scale[:, owner]  # (N, K/g): each kernel group's scale
        zero = torch.zeros_like(scale) if self.symmetric else (8 - quantized.zero[:, owner]) * scale  # (q − 8)s + zero
        self.register_buffer("scale_and_zero", torch.stack([scale.T, zero.T], dim=-1).to(dtype).contiguous())
        self.kernel_group = group

    @property
    def groups(self) -> int:
        return -(-self.in_features // min(self.group_size, self.in_features))

    def int8_codes(self) -> torch.Tensor:
        """The codes as int8 [N, K] (unpacked from nibbles at ≤ 4 bits)."""
        if self.layout == "int4pack":
            raise RuntimeError("an int4pack weight holds the CPU kernel's opaque layout: no int8 codes")
        if packs_two_per_byte(self.bits):
            return unpack_codes(self.codes, self.bits, self.in_features, signed=self.symmetric).view(torch.int8)
        return self.codes

    def int_matmul(self, x_codes: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
        """(x_codes · x_scale) · Wᵀ for int8 codes [M, K] and per-token scales [M, 1]: integer sums per group, rescaled
        in float32 (float64 for float64 scales)."""
        weight = self.int8_codes()
        compute = torch.float64 if x_scale.dtype == torch.float64 else torch.float32
        group = min(self.group_size, self.in_features)
        out = None
        for index, start in enumerate(range(0, self.in_features, group)):
            columns = slice(start, start + group)
            x_part = x_codes if group == self.in_features else x_codes[:, columns]
            w_part = weight if group == self.in_features else weight[:, columns]
            sums = int_mm_rows(x_part, w_part)
            if self.zero is not None:
                sums -= x_part.sum(dim=1, keepdim=True, dtype=torch.int32) * self.zero[:, index]
            term = sums.to(compute).mul_(self.scale[:, index])
            out = term if out is None else out.add_(term)
        return out.mul_(x_scale.to(compute))

    def weight_only(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x · Wᵀ (+ bias) for float x [M, K], in x's dtype, by the layout's kernel (else dequantize and F.linear)."""
        if self.layout != "codes" and x.dtype != self.activation_dtype:
            raise TypeError(f"this weight is packed for {self.activation_dtype} activations ({self.layout}), got {x.dtype}: "
                            f"pack the model in {x.dtype} instead")
        if self.layout == "codes":
            return nn.functional.linear(x, self.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
        if self.layout == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.codes, self.scale[:, 0].to(x.dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.codes, self.kernel_group, self.scale_and_zero)
        return _with_bias(y, bias, x.dtype)

    @property
    def weight_only_kernel(self) -> str:
        return {"codes": "dequant"}.get(self.layout, self.layout)

    def quantized(self) -> QuantizedWeight:
        """The `QuantizedWeight` these buffers hold (not for int4pack)."""
        codes = self.int8_codes()
        if not self.symmetric:
            codes = (codes.to(torch.int16) + self.offset).to(torch.uint8)
        zero = None if self.zero is None else (self.zero + self.offset).to(torch.float32)
        return QuantizedWeight(codes, self.scale, zero, self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight, exactly as `QuantizedWeight.dequantize` gives it (what the simulated model holds)."""
        return self.quantized().dequantize(dtype)

    def extra_repr(self) -> str:
        return (f"out_features={self.out_features}, in_features={self.in_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}, layout={self.layout}")


def _activation_codes(transform: InputTransform, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The int8 codes and per-token scale `transform` quantizes x to (after its rotation), or None (not ≤ 8 bits)."""
    if transform.bits is None or transform.bits > 8:
        return None
    if transform.rotation_kind is not None:
        x = transform.rotate(x)
    return per_token_codes(x, transform.bits, transform.clip_ratio)


def _project(packed: PackedWeight, transform: InputTransform, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """packed · transform(x) (+ bias) for x [M, K], in x's dtype: the integer path when x is quantized to ≤ 8 bits,
    else weight-only."""
    codes = _activation_codes(transform, x)
    if codes is None:
        return packed.weight_only(transform(x), bias)
    return _with_bias(packed.int_matmul(*codes), bias, x.dtype)


def _kernel(packed: PackedWeight, transform: InputTransform) -> str:
    return "int_mm" if transform.bits is not None and transform.bits <= 8 else packed.weight_only_kernel


def _with_bias(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """y (+ bias), added in y's precision (float32 after an integer matmul), then in `dtype`."""
    return (y if bias is None else y + bias.to(y.dtype)).to(dtype)


def _on(quantized: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    zero = None if quantized.zero is None else quantized.zero.to(device)
    return QuantizedWeight(quantized.codes.to(device), quantized.scale.to(device), zero, quantized.group_size)


def _bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


class PackedLinear(nn.Module):
    """y = W · transform(x) + b with W held as integer codes (see the module docstring for the kernels)."""

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, input_transform: InputTransform) -> None:
        super().__init__()
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.packed = packed
        self.register_buffer("bias", bias)
        self.input_transform = input_transform

    @classmethod
    def from_quantized(cls, linear: nn.Module, quantized: QuantizedWeight, bits: int,
                       dtype: torch.dtype | None = None, layout: str | None = None) -> PackedLinear:
        """The packed form of an nn.Linear or QuantizedLinear (its bias and input transform kept; its weight
        replaced by `quantized`), for activations in `dtype` (default: the layer's)."""
        if quantized.codes.shape != (linear.out_features, linear.in_features):
            raise ValueError(f"codes of shape {tuple(quantized.codes.shape)} for a "
                             f"{linear.out_features}x{linear.in_features} layer")
        transform = getattr(linear, "input_transform", None)
        transform = InputTransform(linear.in_features) if transform is None else transform
        dtype = dtype or linear.weight.dtype
        quantized = _on(quantized, linear.weight.device)
        layout = layout or weight_layout(quantized, bits, transform.bits, dtype)
        return cls(PackedWeight(quantized, bits, layout, dtype), _bias(linear), transform)

    @property
    def kernel(self) -> str:
        return _kernel(self.packed, self.input_transform)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _project(self.packed, self.input_transform, x.reshape(-1, self.in_features), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"kernel={self.kernel}")


class PackedEmbedding(nn.Module):
    """An embedding table held as per-row integer codes and scales: each looked-up row is dequantized on its own."""

    def __init__(self, packed: PackedWeight, padding_idx: int | None = None) -> None:
        super().__init__()
        if packed.layout != "codes" or not packed.symmetric or packed.groups != 1:
            raise ValueError("a packed embedding holds symmetric per-row codes (the \"codes\" layout)")
        self.num_embeddings, self.embedding_dim = packed.out_features, packed.in_features
        self.padding_idx = padding_idx
        self.packed = packed

    @classmethod
    def from_quantized(cls, embedding: nn.Embedding, quantized: QuantizedWeight, bits: int) -> PackedEmbedding:
        if quantized.codes.shape != embedding.weight.shape:
            raise ValueError(f"codes of shape {tuple(quantized.codes.shape)} for a {tuple(embedding.weight.shape)} table")
        packed = PackedWeight(_on(quantized, embedding.weight.device), bits, "codes", embedding.weight.dtype)
        return cls(packed, embedding.padding_idx)

    @property
    def kernel(self) -> str:
        return "row gather"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        rows = unpack_codes(packed.codes[ids], packed.bits, self.embedding_dim, signed=True)  # only the rows looked up
        return (rows.to(torch.float32) * packed.scale[ids]).to(packed.activation_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.packed.bits}, kernel={self.kernel}"


class PackedSharedDownProjection(SharedDownProjection):
    """The shared down-projection with B as integer codes: B x by `_int_mm` from x's codes, then the latent
    quantized to codes as `latent_transform` says (the same rule as `SharedDownProjection.compute_latent`)."""

    def __init__(self, packed: PackedWeight, input_transform: InputTransform, latent_transform: InputTransform) -> None:
        super().__init__(packed.in_features, packed.out_features, device="meta")
        del self.weight
        self.packed = packed
        self.input_transform, self.latent_transform = input_transform, latent_transform

    @classmethod
    def from_down(cls, down: SharedDownProjection, quantized: QuantizedWeight, bits: int,
                  dtype: torch.dtype | None = None, layout: str | None = None) -> PackedSharedDownProjection:
        dtype = dtype or down.weight.dtype
        quantized = _on(quantized, down.weight.device)
        layout = layout or weight_layout(quantized, bits, down.input_transform.bits, dtype)
        return cls(PackedWeight(quantized, bits, layout, dtype), down.input_transform, down.latent_transform)

    @property
    def kernel(self) -> str:
        return _kernel(self.packed, self.input_transform)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed.dequantize(dtype)

    def project_down(self, x: torch.Tensor) -> torch.Tensor:
        pre = _project(self.packed, self.input_transform, x.reshape(-1, self.in_features))
        return pre.reshape(*x.shape[:-1], self.rank)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel}"


class PackedLatentUpProjection(LatentUpProjection):
    """y = A_p C + b with A_p as integer codes: A_p's codes × the latent's int8 codes (`down.last_codes`) by
    `_int_mm`, rescaled; a float latent (not quantized to ≤ 8 bits) takes the weight-only path."""

    def __init__(self, down: SharedDownProjection, packed: PackedWeight, bias: torch.Tensor | None) -> None:
        super().__init__(down, packed.out_features, bias=False, device="meta")
        del self.weight, self.bias
        self.packed = packed
        self.register_buffer("bias", bias)

    @classmethod
    def from_up(cls, up: LatentUpProjection, quantized: QuantizedWeight, bits: int,
                dtype: torch.dtype | None = None, layout: str | None = None) -> PackedLatentUpProjection:
        """The packed form of `up`, reading the latent of `up.down` (pack the down-projection first)."""
        dtype = dtype or up.weight.dtype
        quantized = _on(quantized, up.weight.device)
        layout = layout or weight_layout(quantized, bits, up.down.latent_transform.bits, dtype)
        return cls(up.down, PackedWeight(quantized, bits, layout, dtype), _bias(up))

    @property
    def kernel(self) -> str:
        transform = self.down.latent_transform
        return "int_mm" if transform.rotation_kind is None and transform.bits is not None and transform.bits <= 8 else (
            self.packed.weight_only_kernel)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.packed.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latent = self.down(x)
        codes = self.down.last_codes
        return self.project(latent) if codes is None else self.project_codes(*codes, latent.dtype)

    def project(self, latent: torch.Tensor) -> torch.Tensor:
        """A C + b for a float latent C, by the weight-only path."""
        y = self.packed.weight_only(latent.reshape(-1, self.down.rank), self.bias)
        return y.reshape(*latent.shape[:-1], self.out_features)

    def project_codes(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A C + b for a latent given as int8 codes (…, rank) and per-token scales (…, 1): one `_int_mm`."""
        y = self.packed.int_matmul(codes.reshape(-1, self.down.rank), scale.reshape(-1, 1))
        return _with_bias(y, self.bias, dtype).reshape(*codes.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel={self.kernel}"


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def pack_model(model: nn.Module, family: ModelFamily, quantization: dict, stored: dict[str, torch.Tensor],
               layout: str | None = None) -> nn.Module:
    """Replace, in place, every layer with quantized weights that a quantized checkpoint's manifest `quantization`
    record lists by its packed module, built from the checkpoint's `quantized_weights.safetensors` tensors
    `stored`: `model` (as `load_checkpoint` gives it) then holds integer codes, not float weights. `layout` forces
    one layout (default: each weight's fastest, `weight_layout`).

    Shared down-projections are packed first and their up-projections (packed or not) repointed to them."""
    layers = [layer for layer in quantization["layers"] if layer.get("weight_bits")]
    unknown = {layer["kind"] for layer in layers} - {"linear", "latent_down", "latent_up", "embedding"}
    if unknown:
        raise ValueError(f"no packed module for quantized layers of kind {sorted(unknown)}")
    packed_downs: dict[int, PackedSharedDownProjection] = {}
    for layer in [layer for layer in layers if layer["kind"] == "latent_down"]:
        down = model.get_submodule(layer["name"])
        new = PackedSharedDownProjection.from_down(down, stored_weight(stored, layer), layer["weight_bits"], layout=layout)
        _replace(model, layer["name"], new)  # the attention's release hook finds it by name
        packed_downs[id(down)] = new
    for down, ups in latent_modules(model, family):
        for up in ups:
            if id(down) in packed_downs:
                object.__setattr__(up, "down", packed_downs[id(down)])
    for layer in [layer for layer in layers if layer["kind"] != "latent_down"]:
        module, quantized, bits = model.get_submodule(layer["name"]), stored_weight(stored, layer), layer["weight_bits"]
        if layer["kind"] == "latent_up":
            new = PackedLatentUpProjection.from_up(module, quantized, bits, layout=layout)
        elif layer["kind"] == "embedding":
            new = PackedEmbedding.from_quantized(module, quantized, bits)
        else:
            new = PackedLinear.from_quantized(module, quantized, bits, layout=layout)
        _replace(model, layer["name"], new)
    return model


def install_packed_shells(model: nn.Module, family: ModelFamily, quantization: dict) -> None:
    """Packed modules with empty codes on the meta device (the "codes" layout) for every quantized layer of
    `quantization`, to be filled by loading a packed model's state dict (the transformers door)."""
    pack_model(model, family, quantization, _empty_stored(model, quantization), layout="codes")


def _empty_stored(model: nn.Module, quantization: dict) -> dict[str, torch.Tensor]:
    """Meta tensors shaped as `stored_codes` stores each quantized layer's weight."""
    symmetric = quantization["spec"]["symmetric"]
    stored = {}
    for layer in quantization["layers"]:
        if not layer.get("weight_bits"):
            continue
        bits, columns = layer["weight_bits"], layer["weight_columns"]
        rows = model.get_submodule(layer["name"]).weight.shape[0]
        groups = -(-columns // layer["weight_group_size"])
        code_dtype = torch.int8 if symmetric else torch.uint8
        stored[f"{layer['name']}.codes"] = torch.empty(
            (rows, (columns + 1) // 2) if packs_two_per_byte(bits) else (rows, columns),
            dtype=torch.uint8 if packs_two_per_byte(bits) else code_dtype, device="meta")
        stored[f"{layer['name']}.scale"] = torch.empty((rows, groups), dtype=torch.float32, device="meta")
        if not symmetric:
            stored[f"{layer['name']}.zero"] = torch.empty((rows, groups), dtype=torch.float32, device="meta")
    return stored


def use_fastest_layouts(model: nn.Module) -> None:
    """Re-hold every packed weight of the "codes" layout in the layout of its fastest kernel (`weight_layout`: the CPU
    weight-only kernels' own layouts for bf16/fp16 activations), after loading a state dict in the portable one."""
    for module in list(model.modules()):
        packed = getattr(module, "packed", None)
        if not isinstance(packed, PackedWeight) or packed.layout != "codes" or isinstance(module, PackedEmbedding):
            continue  # a packed embedding gathers rows of its codes: it has no other layout
        transform = module.down.latent_transform if isinstance(module, PackedLatentUpProjection) else module.input_transform
        quantized = packed.quantized()
        layout = weight_layout(quantized, packed.bits, transform.bits, packed.activation_dtype)
        if layout != "codes":
            module.packed = PackedWeight(quantized, packed.bits, layout, packed.activation_dtype)
