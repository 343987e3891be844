"""Weight and activation quantizers against hand-worked cases and error orderings."""

import pytest
import torch

import qsvd.math.quantize as quantize_module
from qsvd.math.quantize import (
    CLIP_NORM,
    WeightFormat,
    code_range,
    fit_grid,
    quantize_gptq,
    quantize_per_token,
    quantize_rtn,
)

pytestmark = pytest.mark.unit


def _sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return float(10 * torch.log10(reference.pow(2).sum() / (reference - approximation).pow(2).sum()))


def _weight(rows=64, columns=128, seed=0):
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def _correlated_inputs(tokens=512, columns=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) / columns**0.5 + torch.eye(columns)
    scales = torch.linspace(0.1, 3.0, columns)  # uneven channels, like real activations
    return (torch.randn(tokens, columns, generator=g) @ mixing) * scales


def test_symmetric_rtn_on_a_hand_worked_row():
    weight = torch.tensor([[1.0, -0.5, 0.25, 0.0]])
    quantized = quantize_rtn(weight, WeightFormat(bits=3, clip_search=False))
    # scale = max|w| / 3; w / scale = [3, -1.5, 0.75, 0] -> round half to even -> [3, -2, 1, 0]
    assert quantized.codes.tolist() == [[3, -2, 1, 0]] and quantized.codes.dtype == torch.int8
    torch.testing.assert_close(quantized.dequantize(), torch.tensor([[1.0, -2 / 3, 1 / 3, 0.0]]))


def test_asymmetric_rtn_has_a_zero_point_and_unsigned_codes():
    weight = torch.tensor([[0.0, 1.0, 2.0, 3.0]]) + 1.0  # all positive: the range starts at 0
    quantized = quantize_rtn(weight, WeightFormat(bits=2, symmetric=False, clip_search=False))
    assert quantized.codes.dtype == torch.uint8 and quantized.zero.tolist() == [[0.0]]
    torch.testing.assert_close(quantized.dequantize(), torch.tensor([[4 / 3, 8 / 3, 8 / 3, 4.0]]))  # w/scale: .75 1.5 2.25 3


@pytest.mark.parametrize("bits,floor_db", [(8, 40.0), (4, 17.0)])
def test_rtn_error_and_code_range(bits, floor_db):
    weight = _weight()
    quantized = quantize_rtn(weight, WeightFormat(bits=bits, clip_search=False))
    low, high = code_range(bits, symmetric=True)
    assert low <= quantized.codes.min() and quantized.codes.max() <= high
    assert (quantized.dequantize() - weight).abs().max(dim=1).values.le(quantized.scale[:, 0] / 2 + 1e-6).all()
    assert _sqnr_db(weight, quantized.dequantize()) > floor_db


def test_coarse_to_fine_clip_search_matches_the_full_grid():
    """A third of the trials; the searched error stays within 0.1% of the exhaustive grid's (measured 0.003%)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 192, generator=generator) * torch.rand(192, generator=generator).pow(3)

    def searched_error(**options):
        scale, _ = fit_grid(weight, 4, True, True, **options)
        low, high = code_range(4, True)
        dequantized = torch.clamp(torch.round(weight / scale[:, None]), low, high) * scale[:, None]
        return (dequantized - weight).abs().pow(CLIP_NORM).sum()

    fast, full = searched_error(), searched_error(coarse=1)
    assert full <= fast <= 1.001 * full, (float(fast), float(full))


def test_clip_search_never_increases_the_searched_error():
    weight = _weight()
    weight[:, 0] *= 8  # one outlier column: clipping helps the other entries
    fmt = dict(bits=4)
    plain = quantize_rtn(weight, WeightFormat(**fmt, clip_search=False)).dequantize()
    clipped = quantize_rtn(weight, WeightFormat(**fmt, clip_search=True)).dequantize()
    plain_error = (plain - weight).abs().pow(CLIP_NORM).sum(dim=1)
    clipped_error = (clipped - weight).abs().pow(CLIP_NORM).sum(dim=1)
    assert (clipped_error <= plain_error + 1e-4).all() and (clipped_error < plain_error).any()


def test_groups_beat_one_scale_per_row_when_columns_differ():
    weight = _weight() * torch.linspace(0.05, 4.0, 128)
    per_row = quantize_rtn(weight, WeightFormat(bits=4, clip_search=False))
    grouped = quantize_rtn(weight, WeightFormat(bits=4, group_size=32, clip_search=False))
    assert grouped.scale.shape == (64, 4) and per_row.scale.shape == (64, 1)
    assert _sqnr_db(weight, grouped.dequantize()) > _sqnr_db(weight, per_row.dequantize()) + 3


def test_gptq_with_a_diagonal_hessian_is_rtn():
    weight = _weight()
    fmt = WeightFormat(bits=4)
    hessian = torch.diag(torch.linspace(1.0, 2.0, 128))
    assert torch.equal(quantize_gptq(weight, hessian, fmt).codes, quantize_rtn(weight, fmt).codes)


@pytest.mark.parametrize("options", [dict(), dict(act_order=True), dict(block_size=16)])
@pytest.mark.parametrize("fmt", [WeightFormat(bits=4), WeightFormat(bits=3, group_size=32), WeightFormat(bits=4, symmetric=False)])
def test_gptq_output_error_is_below_rtn_on_calibration_inputs(fmt, options):
    weight, inputs = _weight(), _correlated_inputs()
    hessian = inputs.T.double() @ inputs.double()
    output = inputs @ weight.T
    rtn_error = (inputs @ quantize_rtn(weight, fmt).dequantize().T - output).pow(2).sum()
    gptq = quantize_gptq(weight, hessian, fmt, **options)
    gptq_error = (inputs @ gptq.dequantize().T - output).pow(2).sum()
    low, high = code_range(fmt.bits, fmt.symmetric)
    assert low <= gptq.codes.min() and gptq.codes.max() <= high
    assert gptq_error < 0.9 * rtn_error, (float(gptq_error), float(rtn_error))


def test_gptq_rejects_a_hessian_of_the_wrong_size():
    with pytest.raises(ValueError, match="Hessian"):
        quantize_gptq(_weight(), torch.eye(64), WeightFormat(bits=4))


def test_per_token_activation_quantization():
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(2))
    x[0, 0] = 0  # an all-zero token stays zero, no NaN
    quantized = quantize_per_token(x, bits=8)
    assert torch.equal(quantized[0, 0], torch.zeros(64))
    step = x.abs().amax(dim=-1, keepdim=True) / 127
    assert ((quantized - x).abs() <= step / 2 + 1e-7).all()
    torch.testing.assert_close(quantized.abs().amax(-1), x.abs().amax(-1))  # the largest entry is exact
    clipped = quantize_per_token(x, bits=4, clip_ratio=0.5)
    assert (clipped.abs().amax(-1) <= 0.5 * x.abs().amax(-1) * 8 / 7 + 1e-6).all()
    with pytest.raises(ValueError, match="clip ratio"):
        quantize_per_token(x, bits=4, clip_ratio=1.5)


def test_weight_format_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="weight bits"):
        WeightFormat(bits=16)
    with pytest.raises(ValueError, match="group_size"):
        WeightFormat(bits=4, group_size=0)


def _sequential_search(block, bits, symmetric, steps=100, max_shrink=0.8, coarse=4):
    """The clipping search one trial at a time over whole rows (the brute-force oracle of `fit_grid`)."""
    low, high = code_range(bits, symmetric)
    tiny = torch.finfo(torch.float32).tiny

    def grid(shrink):
        if symmetric:
            return (block.abs().amax(dim=1) * shrink / high).clamp_min(tiny), None
        top, bottom = block.amax(dim=1).clamp_min(0) * shrink, block.amin(dim=1).clamp_max(0) * shrink
        scale = ((top - bottom) / (high - low)).clamp_min(tiny)
        return scale, torch.round(-bottom / scale)

    def error(scale, zero):
        shift = 0 if zero is None else zero[:, None]
        codes = torch.clamp(torch.round(block / scale[:, None] + shift), low, high)
        return ((codes - shift) * scale[:, None] - block).abs().pow(CLIP_NORM).sum(dim=1)

    ones = torch.ones(block.shape[0])
    scale, zero = grid(ones)
    best, best_step = torch.full_like(ones, float("inf")), torch.zeros_like(ones)
    last = int(max_shrink * steps)

    def trial(step):
        nonlocal scale, zero, best, best_step
        trial_scale, trial_zero = grid(1 - step / steps)
        trial_error = error(trial_scale, trial_zero)
        better = trial_error < best
        best, best_step = torch.where(better, trial_error, best), torch.where(better, step, best_step)
        scale = torch.where(better, trial_scale, scale)
        zero = None if zero is None else torch.where(better, trial_zero, zero)

    for step in range(0, last + 1, coarse):
        trial(ones * step)
    centre = best_step.clone()
    for offset in range(1 - coarse, coarse):
        if offset:
            trial((centre + offset).clamp(0, last))
    return scale, zero


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("chunk", [1 << 12, 1 << 20], ids=["many-chunks", "one-chunk"])
def test_vectorised_clip_search_picks_what_the_sequential_search_picks(symmetric, chunk, monkeypatch):
    """Bit for bit, chunk boundaries, ties (an all-zero row: the first trial) and outliers included."""
    monkeypatch.setattr(quantize_module, "SEARCH_CHUNK_ELEMENTS", chunk)
    generator = torch.Generator().manual_seed(3)
    block = torch.randn(61, 97, generator=generator) * torch.rand(97, generator=generator).pow(3)
    block[5] = 0
    block[7, 3] *= 40
    block[9] = block[9].abs()  # an all-positive row: the asymmetric range starts at 0
    scale, zero = fit_grid(block, 3, symmetric, True)
    expected_scale, expected_zero = _sequential_search(block, 3, symmetric)
    assert torch.equal(scale, expected_scale)
    assert (zero is None and expected_zero is None) or torch.equal(zero, expected_zero)


@pytest.mark.parametrize("fmt", [WeightFormat(bits=4, group_size=32), WeightFormat(bits=3, symmetric=False, group_size=32)])
def test_groups_and_a_shorter_last_group_are_fitted_like_separate_blocks(fmt):
    weight = _weight(columns=130)  # four groups of 32 and one of 2
    quantized = quantize_rtn(weight, fmt)
    assert quantized.scale.shape == (64, 5) and quantized.group_size == 32
    for g, start in enumerate(range(0, 130, 32)):
        block = weight[:, start : start + 32]
        scale, zero = fit_grid(block, fmt.bits, fmt.symmetric, fmt.clip_search)
        assert torch.equal(quantized.scale[:, g], scale)
        shift = 0 if zero is None else zero[:, None]
        low, high = code_range(fmt.bits, fmt.symmetric)
        codes = torch.clamp(torch.round(block / scale[:, None] + shift), low, high)
        assert torch.equal(quantized.codes[:, start : start + 32].float(), codes)
        expected = (codes - shift) * scale[:, None]
        assert torch.equal(quantized.dequantize()[:, start : start + 32], expected)


def test_bfloat16_weights_are_quantized_in_float32():
    weight = _weight().to(torch.bfloat16)
    quantized, reference = quantize_rtn(weight, WeightFormat(bits=4)), quantize_rtn(weight.float(), WeightFormat(bits=4))
    assert torch.equal(quantized.codes, reference.codes) and torch.equal(quantized.scale, reference.scale)
    assert quantized.dequantize(torch.bfloat16).dtype == torch.bfloat16


def test_rtn_creates_every_tensor_on_the_weight_device():
    """On the meta device any tensor made on the CPU would fail to mix in."""
    for fmt in (WeightFormat(bits=4, group_size=32), WeightFormat(bits=4, symmetric=False)):
        quantized = quantize_rtn(torch.empty(50, 130, device="meta"), fmt)
        assert quantized.codes.device.type == quantized.scale.device.type == quantized.dequantize().device.type == "meta"


def _column_by_column_gptq(weight, hessian, fmt, damping=0.01):
    """GPTQ without lazy batches: every column's error goes to all later columns at once (the oracle)."""
    weight = weight.double().clone()
    _, scale, zero = quantize_module._group_grids(weight.float(), fmt)
    hessian = hessian.double() + damping * torch.diagonal(hessian.double()).mean() * torch.eye(len(hessian), dtype=torch.float64)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    low, high = code_range(fmt.bits, fmt.symmetric)
    codes = torch.zeros_like(weight)
    group = fmt.group_size or weight.shape[1]
    for i in range(weight.shape[1]):
        s = scale[:, i // group].double()
        shift = 0 if zero is None else zero[:, i // group].double()
        codes[:, i] = torch.clamp(torch.round(weight[:, i] / s + shift), low, high)
        error = (weight[:, i] - (codes[:, i] - shift) * s) / upper[i, i]
        weight[:, i:] -= error[:, None] * upper[i, i:][None, :]
    return codes


@pytest.mark.parametrize("fmt", [WeightFormat(bits=4), WeightFormat(bits=3, symmetric=False, group_size=32)])
def test_blocked_gptq_matches_the_column_by_column_oracle(fmt):
    weight, inputs = _weight(), _correlated_inputs()
    hessian = inputs.T.double() @ inputs.double()
    codes = quantize_gptq(weight, hessian, fmt, block_size=16).codes.double()
    expected = _column_by_column_gptq(weight, hessian, fmt)
    assert (codes == expected).double().mean() >= 0.999  # the same up to float64 rounding at .5 boundaries


def test_per_token_quantization_is_the_same_with_and_without_autograd():
    x = torch.randn(4, 33, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        in_place = quantize_per_token(x, bits=4, clip_ratio=0.9)
    tracked = quantize_per_token(x.clone().requires_grad_(), bits=4, clip_ratio=0.9)
    assert tracked.requires_grad and torch.equal(in_place, tracked.detach())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rtn_and_gptq_run_on_cuda():
    weight, inputs = _weight(), _correlated_inputs()
    hessian = inputs.T.double() @ inputs.double()
    for quantized in (quantize_rtn(weight.cuda(), WeightFormat(bits=4, group_size=32)),
                      quantize_gptq(weight.cuda(), hessian.cuda(), WeightFormat(bits=4, symmetric=False))):
        assert quantized.codes.is_cuda and quantized.scale.is_cuda and quantized.dequantize().is_cuda
        assert _sqnr_db(weight, quantized.dequantize().cpu()) > 15
