"""Properties of the quantizers and bit packing (the math of `kvsurgery.reference.quant_codes`), measured in float64."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given

from kvsurgery.reference.quant_codes import (
    QuantSpec,
    dequantize_tokens,
    fit_range,
    pack,
    quantize_range,
    quantize_tokens,
    squeeze_logits,
    unpack,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
seeds = st.integers(0, 2**31 - 1)


@given(st.sampled_from([1, 2, 4]), st.integers(1, 4), st.integers(1, 6), seeds)
def test_pack_unpack_round_trip(bits, rows, bytes_per_row, seed):
    g = torch.Generator().manual_seed(seed)
    width = bytes_per_row * 8 // bits
    codes = torch.randint(0, 2**bits, (rows, 3, width), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, 3, bytes_per_row), "bits * D / 8 bytes per token"
    assert torch.equal(unpack(packed, bits), codes)


def test_packing_puts_the_first_code_in_the_low_bits():
    assert pack(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1]], dtype=torch.uint8), 1).tolist() == [[0b10000001]]
    assert pack(torch.tensor([[3, 0, 1, 2]], dtype=torch.uint8), 2).tolist() == [[0b10010011]]
    assert pack(torch.tensor([[0xA, 0x5]], dtype=torch.uint8), 4).tolist() == [[0x5A]]


def _data(seed: int, shape, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.rand(shape[-1], generator=g) * 4  # channels of different scales
    return (x + torch.randn(shape[-1], generator=g)).to(dtype)


@given(st.sampled_from([1, 2, 4]), st.sampled_from(DTYPES), st.integers(2, 40), seeds)
def test_minmax_error_is_at_most_half_a_step(bits, dtype, n, seed):
    """Every value lies in its group's stored range, and |x - x̂| <= scale / 2 (float64 measurement)."""
    x = _data(seed, (2, n, 8), dtype)
    spec = QuantSpec(bits, "channel", 0)
    codes, scale, low = quantize_tokens(x, torch.ones(2, n, dtype=torch.bool), spec, dtype)
    assert int(codes.max()) <= 2**bits - 1
    x_hat = dequantize_tokens(codes, scale, low, spec, torch.float64)
    err = (x.double() - x_hat).abs()
    step = scale.double().expand_as(err)
    top = low.double() + (2**bits - 1) * scale.double()
    inside = (x.double() >= low.double() - 1e-12) & (x.double() <= top + 1e-12)
    # the ends are rounded to the stats dtype, so a value at the group's max may sit just past the stored range
    slack = 1e-6 if dtype == torch.float32 else 2e-2
    assert bool((err[inside] <= step[inside] / 2 + 1e-6 * (x.double().abs()[inside] + 1)).all())
    assert bool((err <= step / 2 + slack * (x.double().abs() + 1)).all())


@given(st.sampled_from([1, 2, 4]), st.sampled_from([0.3, 0.5, 0.9]), st.sampled_from([0.0, 0.1]), seeds)
def test_shrunk_and_quantile_ranges_clip_to_the_nearest_end(bits, shrink, alpha, seed):
    """Inside the shrunk (or quantile) range the error is at most scale / 2; outside, x̂ is the range's nearest end."""
    x = _data(seed, (3, 30, 8), torch.float32)
    spec = QuantSpec(bits, "channel", 0, "quantile" if alpha else "minmax", alpha, shrink)
    codes, scale, low = quantize_tokens(x, torch.ones(3, 30, dtype=torch.bool), spec, torch.float32)
    x_hat = dequantize_tokens(codes, scale, low, spec, torch.float64)
    xd, lo, s = x.double(), low.double().expand(3, 30, 8), scale.double().expand(3, 30, 8)
    hi = lo + (2**bits - 1) * s
    below, above = xd < lo, xd > hi
    inside = ~below & ~above
    assert bool(((xd - x_hat).abs()[inside] <= s[inside] / 2 + 1e-6 * (xd.abs()[inside] + 1)).all())
    torch.testing.assert_close(x_hat[below], lo[below], rtol=0, atol=1e-9)
    torch.testing.assert_close(x_hat[above], hi[above], rtol=0, atol=1e-9)
    if shrink < 1 and alpha == 0:
        assert bool((below | above).any()), "a range shrunk by a factor < 1 clips the extremes"


def test_shrink_scales_the_range_ends_like_calibquant():
    x = torch.tensor([[-4.0], [1.0], [6.0]])
    lo, hi = fit_range(x, torch.ones(3, 1, dtype=torch.bool), 0, QuantSpec(1, shrink=0.5))
    assert lo.item() == -2.0 and hi.item() == 3.0


@given(st.sampled_from([1, 2, 4]), st.sampled_from([8, 16]), st.integers(1, 4), seeds)
def test_groups_have_their_own_ranges(bits, group, n_groups, seed):
    """Channel axis: one (scale, lo) per channel per `group` tokens; token axis: per token per `group` channels."""
    x = _data(seed, (n_groups * group, 32), torch.float32)
    valid = torch.ones(x.shape[0], dtype=torch.bool)
    by_channel = QuantSpec(bits, "channel", group)
    codes, scale, low = quantize_tokens(x, valid, by_channel, torch.float32)
    assert scale.shape == (n_groups, 32)
    blocks = x.reshape(n_groups, group, 32)
    torch.testing.assert_close(low, blocks.amin(1))
    torch.testing.assert_close(scale, (blocks.amax(1) - blocks.amin(1)) / (2**bits - 1))
    by_token = QuantSpec(bits, "token", group)
    codes, scale, low = quantize_tokens(x, valid, by_token, torch.float32)
    assert scale.shape == (x.shape[0], 32 // group)
    torch.testing.assert_close(low, x.reshape(-1, 32 // group, group).amin(-1))
    err = (dequantize_tokens(codes, scale, low, by_token, torch.float64) - x.double()).abs()
    assert bool((err <= scale.double().repeat_interleave(group, -1) / 2 + 1e-6 * (x.double().abs() + 1)).all())


def test_invalid_tokens_do_not_widen_the_range():
    x = torch.tensor([[0.0], [1.0], [100.0]])
    lo, hi = fit_range(x, torch.tensor([[True], [True], [False]]), 0, QuantSpec(2))
    assert (lo.item(), hi.item()) == (0.0, 1.0)


def test_a_constant_group_is_exact():
    x = torch.full((5, 4), 0.7)
    codes, scale, low = quantize_range(x, x.amin(0, keepdim=True), x.amax(0, keepdim=True), 1, torch.float32)
    assert bool((scale == 0).all()) and bool((codes == 0).all())
    assert torch.equal(codes.float() * scale + low, x)


@given(st.floats(0.5, 6.0), seeds)
def test_logit_squeeze_lowers_the_max_by_the_squeeze_and_keeps_the_min(squeeze, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 10, generator=g, dtype=torch.float64) * 4
    valid = torch.ones(2, 3, 10, dtype=torch.bool)
    valid[0, 0, 7:] = False
    out = squeeze_logits(logits, valid, squeeze)
    for row in range(2):
        for h in range(3):
            ok = valid[row, h]
            lo, hi = logits[row, h, ok].min(), logits[row, h, ok].max()
            new = out[row, h, ok]
            assert torch.isclose(new.min(), lo)
            assert torch.isclose(new.max(), torch.maximum(hi - squeeze, lo), atol=1e-7)
            assert bool((torch.argsort(new, stable=True) == torch.argsort(logits[row, h, ok], stable=True)).all())
    assert torch.equal(out[~valid], logits[~valid]), "entries outside the span are untouched"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": 3}, r"bits must be one of \(1, 2, 4\)"),
        ({"bits": 2, "axis": "token", "group": 0}, "group must be > 0"),
        ({"bits": 2, "range": "median"}, "range must be one of"),
        ({"bits": 2, "alpha": 0.5}, r"alpha .* must be in \[0, 0.5\)"),
        ({"bits": 2, "shrink": 0.0}, r"shrink factor must be in \(0, 1\]"),
    ],
)
def test_invalid_specs_say_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**kwargs)


def test_group_must_divide_the_head_dim():
    with pytest.raises(ValueError, match="group size 24 does not divide value head_dim 64"):
        QuantSpec(2, "token", 24).check_dim(64, "value")
