"""Weight and activation quantizers against hand-worked cases and error orderings."""

import pytest
import torch

from qsvd.math.quantize import (
    CLIP_NORM,
    WeightFormat,
    code_range,
    fit_grid,
    quantize_gptq,
    quantize_per_token,
    quantize_rtn,
)


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
