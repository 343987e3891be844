"""Real integer execution: packed layers against a brute-force dequantized matmul, and a packed quantized
checkpoint against the simulated one it was loaded from (same logits up to float summation order, same tokens)."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qsvd.math.packing import pack_codes, unpack_codes
from qsvd.math.quantize import QuantizedWeight, WeightFormat, per_token_codes, quantize_rtn
from qsvd.models.checkpoint import QUANTIZED_WEIGHTS, load_checkpoint
from qsvd.models.input_transform import InputTransform
from qsvd.models.lowrank import LatentUpProjection, SharedDownProjection
from qsvd.models.packed import (
    PackedEmbedding,
    PackedLatentUpProjection,
    PackedLinear,
    PackedSharedDownProjection,
    _activation_codes,
    int_mm_rows,
    pack_model,
)
from qsvd.models.prompts import encode_prompt
from qsvd.models.registry import family_by_name
from qsvd.stages.quantize import QuantSpec, run_quantize
from tests.conftest import build_tiny, noise_images
from tests.stages.test_pipeline_tiny import write_dataset
from tests.stages.test_quantize import _lowrank_checkpoint

pytestmark = pytest.mark.unit

PACKED = (PackedLinear, PackedSharedDownProjection, PackedLatentUpProjection)


def _exact_weight(quantized: QuantizedWeight) -> torch.Tensor:
    """(codes − zero) · scale in float64, group by group: the oracle's weight."""
    rows, columns = quantized.codes.shape
    scale = quantized.scale.double().repeat_interleave(quantized.group_size, dim=1)[:, :columns]
    values = quantized.codes.double()
    if quantized.zero is not None:
        values = values - quantized.zero.double().repeat_interleave(quantized.group_size, dim=1)[:, :columns]
    return values * scale


def _layer(rows, columns, bias, bits, symmetric, group_size, act_bits, rotation, seed=0):
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(columns, rows, bias=bias).requires_grad_(False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(rows, columns, generator=g) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(rows, generator=g))
    quantized = quantize_rtn(linear.weight, WeightFormat(bits, symmetric, group_size, clip_search=False))
    linear.input_transform = InputTransform(columns)
    if rotation:
        linear.input_transform.set_rotation("hadamard", rotation)
    linear.input_transform.set_quantization(act_bits, 0.9)
    return linear, quantized


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("group_size", [None, 16, 24], ids=["row", "g16", "g24"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_integer_path_equals_a_brute_force_dequantized_matmul(bits, symmetric, group_size, dtype):
    """Odd and even shapes, with and without bias, rotated or not, 4- and 8-bit activations: the `_int_mm` result
    is the float64 product of the same activation codes and the exact weight, up to rounding to `dtype`."""
    cases = [(48, 64, True, 8, 16), (19, 37, False, 8, None), (48, 64, False, 4, None), (19, 37, True, 4, None)]
    for index, (rows, columns, bias, act_bits, rotation) in enumerate(cases):
        linear, quantized = _layer(rows, columns, bias, bits, symmetric, group_size, act_bits, rotation, seed=index)
        linear = linear.to(dtype)
        packed = PackedLinear.from_quantized(linear, quantized, bits)
        assert packed.kernel == "int_mm" and "kernel=int_mm" in repr(packed)
        x = torch.randn(2, 5, columns, generator=torch.Generator().manual_seed(index)).to(dtype)
        rotated = x if rotation is None else _rotation_only(columns, rotation)(x)
        codes, scale = per_token_codes(rotated, act_bits, 0.9)
        expected = (codes.double() * scale.double()) @ _exact_weight(quantized).T
        if bias:
            expected = expected + linear.bias.double()
        with torch.no_grad():
            y = packed(x)
        assert y.dtype == dtype and y.shape == (2, 5, rows)
        error = float((y.double() - expected).abs().max() / expected.abs().max())
        assert error < (1e-6 if dtype == torch.float32 else 4e-3), (rows, columns, bias, act_bits, error)


def _rotation_only(columns, size):
    transform = InputTransform(columns)
    transform.set_rotation("hadamard", size)
    return transform


def test_packed_storage_is_integer_buffers_two_codes_per_byte_at_4_bits():
    linear, quantized = _layer(48, 37, True, 4, False, 16, 8, None)
    packed = PackedLinear.from_quantized(linear, quantized, 4)
    assert not list(packed.parameters())
    buffers = dict(packed.named_buffers())
    assert buffers["packed.codes"].dtype == torch.uint8 and buffers["packed.codes"].shape == (48, 19)
    assert buffers["packed.zero"].dtype == torch.int32 and buffers["packed.scale"].shape == (48, 3)
    # the buffers still hold exactly the codes, scales and zeros they were built from
    rebuilt = packed.packed.quantized()
    assert torch.equal(rebuilt.codes, quantized.codes) and torch.equal(rebuilt.zero, quantized.zero)
    wide_linear, wide = _layer(48, 37, False, 8, False, None, 8, None)
    eight = PackedLinear.from_quantized(wide_linear, wide, 8).packed
    assert eight.codes.dtype == torch.int8 and eight.codes.shape == (48, 37) and eight.codes.is_contiguous()
    assert torch.equal(eight.quantized().codes, wide.codes) and torch.equal(eight.quantized().zero, wide.zero)


def test_unpacked_codes_are_the_stored_codes():
    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4):
        for columns in (37, 64):
            signed = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (5, columns), generator=g).to(torch.int8)
            unsigned = torch.randint(0, 2**bits, (5, columns), generator=g).to(torch.uint8)
            assert torch.equal(unpack_codes(pack_codes(signed, bits), bits, columns, signed=True), signed)
            assert torch.equal(unpack_codes(pack_codes(unsigned, bits), bits, columns, signed=False), unsigned)


def test_cuda_padding_of_int_mm_is_exact():
    """The padding `_int_mm` needs on CUDA (M > 16, K and N multiples of 8), exercised on the CPU."""
    g = torch.Generator().manual_seed(0)
    for m, k, n in [(1, 37, 19), (17, 64, 48), (5, 8, 9)]:
        x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
        expected = x.long() @ w.long().T
        assert torch.equal(int_mm_rows(x, w, pad=True).long(), expected)
        assert torch.equal(int_mm_rows(x, w, pad=False).long(), expected)


WEIGHT_ONLY = [  # (bits, symmetric, group size, rows, columns, kernel)
    (8, True, None, 48, 64, "int8pack"),
    (8, True, None, 48, 40, "dequant"),  # K % 16: the CPU int8pack kernel is wrong there
    (8, False, None, 48, 64, "dequant"),
    (8, True, 32, 48, 64, "dequant"),
    (4, True, None, 48, 64, "int4pack"),
    (4, False, None, 48, 96, "int4pack"),
    (4, True, 32, 48, 64, "int4pack"),
    (4, False, 64, 32, 96, "int4pack"),  # a shorter last group
    (3, False, 128, 32, 256, "int4pack"),
    (2, True, None, 32, 64, "int4pack"),
    (4, True, 16, 48, 64, "dequant"),  # a group the kernel does not take
    (4, True, None, 19, 64, "dequant"),  # N % 16
]


@pytest.mark.parametrize(("bits", "symmetric", "group_size", "rows", "columns", "kernel"), WEIGHT_ONLY)
def test_bf16_weight_only_kernels_match_the_dequantized_linear(bits, symmetric, group_size, rows, columns, kernel):
    linear, quantized = _layer(rows, columns, True, bits, symmetric, group_size, None, None)
    linear = linear.to(torch.bfloat16)
    packed = PackedLinear.from_quantized(linear, quantized, bits)
    assert packed.kernel == kernel and f"kernel={kernel}" in repr(packed)
    x = torch.randn(3, columns, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    simulated = nn.functional.linear(x, quantized.dequantize(torch.bfloat16), linear.bias)
    with torch.no_grad():
        y = packed(x)
    assert y.dtype == torch.bfloat16
    if kernel == "dequant":  # the same arithmetic as the simulated layer
        torch.testing.assert_close(y, simulated, rtol=0, atol=0)
    else:  # bf16 scales (and zeros) in the kernels: within bf16 rounding of the output
        exact = x.double() @ _exact_weight(quantized).T + linear.bias.double()
        assert float((y.double() - exact).abs().max() / exact.abs().max()) < 2e-2  # measured up to 0.0097 (3-bit, g128)
        assert float((simulated.double() - exact).abs().max() / exact.abs().max()) < 8e-3
    with pytest.raises(TypeError, match="pack the model in torch.float32") if kernel != "dequant" else _nothing():
        packed(x.float())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_float32_weight_only_dequantizes():
    """In float32 the CPU weight-only kernels are 10-100x slower than F.linear: never chosen."""
    linear, quantized = _layer(48, 64, False, 4, True, None, None, None)
    packed = PackedLinear.from_quantized(linear, quantized, 4)
    assert packed.kernel == "dequant" and packed.packed.layout == "codes"
    x = torch.randn(3, 64)
    torch.testing.assert_close(packed(x), nn.functional.linear(x, quantized.dequantize()), rtol=0, atol=0)


def test_packed_latent_matches_the_simulated_one_through_its_codes():
    """A packed shared down-projection and its up-projections against the simulated modules: the same latent
    codes (and scale), and outputs equal up to float summation order; a float latent takes the weight-only path."""
    g = torch.Generator().manual_seed(0)
    down = SharedDownProjection(64, 24)
    ups = [LatentUpProjection(down, 48, bias=b) for b in (True, False)]
    formats = WeightFormat(4, False, 16, clip_search=False)
    with torch.no_grad():
        down.weight.copy_(torch.randn(24, 64, generator=g) * 0.1)
        quantized_down = quantize_rtn(down.weight, formats)
        down.weight.copy_(quantized_down.dequantize())
        quantized_ups = []
        for up in ups:
            up.weight.copy_(torch.randn(48, 24, generator=g) * 0.1)
            quantized_ups.append(quantize_rtn(up.weight, formats))
            up.weight.copy_(quantized_ups[-1].dequantize())
            if up.bias is not None:
                up.bias.copy_(torch.randn(48, generator=g))
    down.input_transform.set_quantization(8, 0.9)
    down.latent_transform.set_quantization(8, 1.0)
    packed_down = PackedSharedDownProjection.from_down(down, quantized_down, 4)
    packed_ups = []
    for up, quantized in zip(ups, quantized_ups):
        copy = LatentUpProjection(packed_down, 48, bias=up.bias is not None)
        copy.weight, copy.bias = up.weight, up.bias
        packed_ups.append(PackedLatentUpProjection.from_up(copy, quantized, 4))
    x = torch.randn(2, 7, 64, generator=g)
    with torch.no_grad():
        expected = [up(x) for up in ups]
        latent_codes = down.last_codes
        got = [up(x) for up in packed_ups]
    assert packed_down.latent_computations == 1 and all(up.kernel == "int_mm" for up in packed_ups)
    assert torch.equal(packed_down.last_codes[0], latent_codes[0])
    torch.testing.assert_close(packed_down.last_codes[1], latent_codes[1], rtol=1e-6, atol=0)
    for y, reference in zip(got, expected):
        assert float((y - reference).abs().max() / reference.abs().max()) < 1e-5
    packed_down.release()
    packed_down.latent_transform.set_quantization(None)
    down.latent_transform.set_quantization(None)
    down.release()
    with torch.no_grad():
        assert packed_ups[0].kernel == "dequant" and packed_down.last_codes is None
        torch.testing.assert_close(packed_ups[0](x), ups[0](x), rtol=1e-5, atol=1e-5)
    assert not hasattr(packed_down, "weight") and not list(packed_down.parameters())


# ---- a quantized checkpoint of a tiny LLaVA, simulated and packed ------------------------------------------------

SPECS = {  # W8A8, W4A4, W4A8; symmetric and asymmetric; per row and grouped; all with H1/H2 and online rotations
    "W8A8-sym-row": QuantSpec(weight_bits=8, act_bits=8, lm_clip=1.0, vision_clip=1.0, beta=0.2),
    "W4A4-sym-g16": QuantSpec(weight_bits=4, act_bits=4, group_size=16, beta=0.2),
    "W4A8-asym-row": QuantSpec(weight_bits=4, act_bits=8, symmetric=False, beta=0.2),
    "W8A8-asym-g32": QuantSpec(weight_bits=8, act_bits=8, symmetric=False, group_size=32, beta=0.2),
}


@pytest.fixture(scope="module")
def lowrank_llava(tmp_path_factory):
    """(low-rank checkpoint, processor, image) of a tiny LLaVA, built once for this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("packed")
    images = noise_images()
    data = write_dataset(root / "data", images)
    model, processor = build_tiny("llava", kv_heads=4)
    yield _lowrank_checkpoint("llava", model, processor, data, root), processor, images[0], root
    torch.set_num_threads(threads)


def _resident_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _as_float32_bytes(module: nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in tensors)


def _packed_pair(lowrank, spec_name, root, dtype=None):
    out = run_quantize(str(lowrank), "llava", None, SPECS[spec_name], root / spec_name)
    simulated, _, manifest = load_checkpoint(out, dtype=dtype)
    packed, _, _ = load_checkpoint(out, dtype=dtype)
    float_bytes = {layer["name"]: _as_float32_bytes(packed.get_submodule(layer["name"]))
                   for layer in manifest["quantization"]["layers"]}
    pack_model(packed, family_by_name("llava"), manifest["quantization"], load_file(str(out / QUANTIZED_WEIGHTS)))
    return simulated, packed, manifest, float_bytes


def _record(model: nn.Module, names: list[str]) -> tuple[dict, list]:
    """Hooks recording each named module's first (input, output, latent codes or None) of a forward."""
    seen, handles = {}, []
    for name in names:
        def hook(module, args, output, name=name):
            codes = getattr(module, "last_codes", None)
            codes = None if codes is None else tuple(c.clone() for c in codes)
            seen.setdefault(name, (args[0].clone(), output.clone(), codes))

        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return seen, handles


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _layer_by_layer(packed: nn.Module, layers: list[dict], simulated_run: dict) -> tuple[float, int, int]:
    """Each packed layer on the simulated model's recorded input: (largest relative output difference, latent codes
    that moved by ±1 at a rounding tie inside the down-projection, latent codes in all)."""
    names = {id(module): name for name, module in packed.named_modules()}
    worst, moved, total = 0.0, 0, 0
    for layer in layers:
        module = packed.get_submodule(layer["name"])
        x, expected, codes = simulated_run[layer["name"]]
        if layer["kind"] == "latent_down":
            latent, own = module.compute_latent(x)
            step = (own[0].int() - codes[0].int()).abs()
            assert int(step.max()) <= 1
            moved, total = moved + int(step.sum()), total + step.numel()
            torch.testing.assert_close(own[1], codes[1], rtol=1e-5, atol=0)
            same = (step == 0).expand_as(latent)
            worst = max(worst, _relative(latent[same], expected[same]))
            continue
        if layer["kind"] == "latent_up":  # on the simulated latent's codes
            got = module.project_codes(*simulated_run[names[id(module.down)]][2], x.dtype)
        else:
            got = module(x)
        worst = max(worst, _relative(got, expected))
    return worst, moved, total


def _activation_flips(layers: list[dict], simulated_run: dict, packed_run: dict, packed: nn.Module) -> int:
    """Activation and latent codes in which the two models' forward passes differ: a ±1 flip where float32 sums in
    another order land on the other side of a rounding tie, and the codes downstream that it moves."""
    flips = 0
    for layer in layers:
        x_simulated, _, codes_simulated = simulated_run[layer["name"]]
        x_packed, _, codes_packed = packed_run[layer["name"]]
        if layer["kind"] == "latent_down":
            flips += int((codes_simulated[0] != codes_packed[0]).sum())
        if layer["kind"] != "latent_up":
            transform = packed.get_submodule(layer["name"]).input_transform
            codes = [_activation_codes(transform, x)[0] for x in (x_simulated, x_packed)]
            flips += int((codes[0] != codes[1]).sum())
    return flips


@pytest.mark.parametrize("spec_name", list(SPECS))
def test_packed_checkpoint_computes_the_simulated_logits_with_integer_kernels(lowrank_llava, spec_name):
    lowrank, processor, image, root = lowrank_llava
    family = family_by_name("llava")
    simulated, packed, manifest, float_bytes = _packed_pair(lowrank, spec_name, root)
    layers = manifest["quantization"]["layers"]
    modules = {layer["name"]: packed.get_submodule(layer["name"]) for layer in layers}
    assert all(isinstance(m, PACKED) and m.kernel == "int_mm" for m in modules.values())
    assert {layer["kind"] for layer in layers} == {"linear", "latent_down", "latent_up"}
    assert not any(name.rpartition(".")[0] in modules for name, _ in packed.named_parameters())

    # weights resident: integer codes and float32 scales, not float32 weights
    ratio = sum(_resident_bytes(m) for m in modules.values()) / sum(float_bytes.values())
    assert ratio < {8: 0.35, 4: 0.25}[SPECS[spec_name].weight_bits], ratio

    batch = encode_prompt(processor, family, "what color is the shape?", image)
    simulated_run, handles = _record(simulated, list(modules))
    packed_run, packed_handles = _record(packed, list(modules))
    with torch.no_grad():
        expected, got = simulated(**batch).logits, packed(**batch).logits
        for handle in handles + packed_handles:
            handle.remove()
        layer_difference, moved, total = _layer_by_layer(packed, layers, simulated_run)
    flips = _activation_flips(layers, simulated_run, packed_run, packed)
    difference = _relative(got, expected)
    print(f"{spec_name}: layer by layer {layer_difference:.1e}; end to end: largest logit difference {difference:.1e} of "
          f"the largest logit, {flips} activation codes differ; weight bytes {ratio:.3f} of float32")
    # Every layer on the same input: the simulated output up to float32 summation order (a latent code that
    # lands on the other side of a rounding tie moves by ±1 and is left out).
    assert layer_difference < 1e-5 and moved <= max(2, total // 1000), (layer_difference, moved, total)
    # End to end: the same up to summation order while no activation code flips; each flip moves the logits ~1e-3.
    assert difference < (1e-4 if flips == 0 else 1e-2), (difference, flips)
    generate = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        assert torch.equal(packed.generate(**batch, **generate), simulated.generate(**batch, **generate))


def test_packed_bf16_weight_only_checkpoint_uses_the_cpu_kernels(lowrank_llava):
    lowrank, processor, image, root = lowrank_llava
    family = family_by_name("llava")
    SPECS["W4A16-sym-g32"] = QuantSpec(weight_bits=4, act_bits=None, group_size=32, beta=0.2)
    try:
        simulated, packed, manifest, _ = _packed_pair(lowrank, "W4A16-sym-g32", root, dtype=torch.bfloat16)
    finally:
        del SPECS["W4A16-sym-g32"]
    kernels = {packed.get_submodule(layer["name"]).kernel for layer in manifest["quantization"]["layers"]}
    assert "int4pack" in kernels and kernels <= {"int4pack", "dequant"}, kernels
    batch = encode_prompt(processor, family, "what color is the shape?", image)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        expected, got = simulated(**batch).logits.float(), packed(**batch).logits.float()
    difference = float((got - expected).abs().max() / expected.abs().max())
    print(f"W4A16 bf16: largest logit difference {difference:.2e} of the largest logit")
    assert difference < 5e-2, difference  # bf16 weights (simulated) against bf16 scales and zeros (the kernel)


def test_a_dense_rotated_model_packs_too(saved_tiny_model, tmp_path):
    """QuaRot without SVD (no latent): every linear of the LM packed, the same logits and tokens."""
    directory, _, processor = saved_tiny_model("llama", kv_heads=1)
    out = run_quantize(str(directory), "llama", None, QuantSpec(weight_bits=4, act_bits=8, group_size=32), tmp_path / "w4a8")
    simulated, _, manifest = load_checkpoint(out)
    packed, _, _ = load_checkpoint(out)
    layers = manifest["quantization"]["layers"]
    pack_model(packed, family_by_name("llama"), manifest["quantization"], load_file(str(out / QUANTIZED_WEIGHTS)))
    assert all(isinstance(packed.get_submodule(layer["name"]), PackedLinear) for layer in layers)
    batch = encode_prompt(processor, family_by_name("llama"), "the state of the union is", None)
    simulated_run, handles = _record(simulated, [layer["name"] for layer in layers])
    packed_run, packed_handles = _record(packed, [layer["name"] for layer in layers])
    with torch.no_grad():
        difference = _relative(packed(**batch).logits, simulated(**batch).logits)
    for handle in handles + packed_handles:
        handle.remove()
    flips = _activation_flips(layers, simulated_run, packed_run, packed)
    assert difference < (1e-4 if flips == 0 else 1e-2), (difference, flips)
    with torch.no_grad():
        generate = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(packed.generate(**batch, **generate), simulated.generate(**batch, **generate))


@pytest.mark.parametrize(("bits", "rotate"), [(8, True), (4, False)], ids=["int8-rotated", "int4-tied"])
def test_vocabulary_layers_pack_and_compute_the_simulated_logits(saved_tiny_model, tmp_path, bits, rotate):
    """vocabulary_bits: the embedding table and lm_head (untied, also without rotations) held as per-row codes; the
    head's input at 8 bits through `_int_mm`; the simulated logits and tokens."""
    directory, _, processor = saved_tiny_model("llama", kv_heads=1)
    family = family_by_name("llama")
    spec = QuantSpec(weight_bits=8, act_bits=8, vocabulary_bits=bits, rotate=rotate, rotate_latent=rotate)
    out = run_quantize(str(directory), "llama", None, spec, tmp_path / "vocabulary")
    simulated, _, manifest = load_checkpoint(out)
    packed, _, _ = load_checkpoint(out)
    layers = {layer["name"]: layer for layer in manifest["quantization"]["layers"]}
    assert layers[family.embeddings]["kind"] == "embedding" and layers[family.embeddings]["weight_bits"] == bits
    assert layers[family.lm_head]["input_bits"] == 8 and "embeddings" not in manifest["quantization"]["full_precision"]
    assert not simulated.config.tie_word_embeddings
    dense_bytes = _as_float32_bytes(packed)
    pack_model(packed, family, manifest["quantization"], load_file(str(out / QUANTIZED_WEIGHTS)))
    embedding, head = packed.get_submodule(family.embeddings), packed.get_submodule(family.lm_head)
    assert isinstance(embedding, PackedEmbedding) and isinstance(head, PackedLinear) and head.kernel == "int_mm"
    assert not any(p.dtype.is_floating_point and p.numel() >= embedding.num_embeddings for p in packed.parameters())
    ids = torch.arange(embedding.num_embeddings).view(2, -1)
    torch.testing.assert_close(embedding(ids), simulated.get_submodule(family.embeddings)(ids), rtol=0, atol=0)
    print(f"vocabulary {bits} bits: resident {_resident_bytes(packed) / dense_bytes:.3f} of float32")
    assert _resident_bytes(packed) < {8: 0.35, 4: 0.25}[bits] * dense_bytes
    batch = encode_prompt(processor, family, "the state of the union is", None)
    names = list(layers)
    simulated_run, handles = _record(simulated, names)
    packed_run, packed_handles = _record(packed, names)
    with torch.no_grad():
        difference = _relative(packed(**batch).logits, simulated(**batch).logits)
    for handle in handles + packed_handles:
        handle.remove()
    flips = _activation_flips([layers[n] for n in names if layers[n]["kind"] != "embedding"], simulated_run, packed_run, packed)
    assert difference < (1e-4 if flips == 0 else 1e-2), (difference, flips)
    with torch.no_grad():
        generate = dict(max_new_tokens=8, do_sample=False)
        assert torch.equal(packed.generate(**batch, **generate), simulated.generate(**batch, **generate))
