"""Every format against its definition: code tables, nearest-value RTN, scale rules, errors."""

import itertools
import math

import numpy as np
import pytest
import torch

from metal_marlin_torch import formats as F
from tests import reference_formats as R

ALL = sorted(F.FORMATS)


def groups_of(fmt):
    return F.get_format(fmt).group_sizes


CASES = [(f, g) for f in ALL for g in groups_of(f)]


def test_code_tables_match_literal_tables():
    fp4 = F.get_format("fp4")
    codes = torch.arange(16).view(1, 1, 16)
    params = F.GroupParams(torch.ones(1, 1, dtype=torch.float16))
    assert fp4.decode(codes, params).flatten().tolist() == [abs(v) if v == 0 else v for v in R.E2M1]
    nf4 = F.get_format("nf4")
    assert torch.allclose(nf4.decode(codes, params).flatten(), torch.tensor(R.NF4), atol=0, rtol=0)
    nf3 = F.get_format("nf3")
    got = nf3.decode(torch.arange(8).view(1, 1, 8), params).flatten().double()
    assert torch.allclose(got, torch.tensor(R.nf3_table(), dtype=torch.float64), atol=1e-7)
    for name, (e, m) in (("fp8_e4m3", (4, 3)), ("fp8_e5m2", (5, 2))):
        fmt = F.get_format(name)
        vals = fmt.decode(torch.arange(256).view(1, 1, 256), params).flatten().double()
        ref = torch.tensor([R.fp8_value(b, e, m) for b in range(256)], dtype=torch.float64)
        assert torch.equal(torch.isnan(vals), torch.isnan(ref))
        finite = ~torch.isnan(ref)
        assert torch.equal(vals[finite], ref[finite])


@pytest.mark.parametrize("fmt,group", CASES)
def test_dequantize_matches_independent_reference(fmt, group):
    k = 64 if group in (-1, 16, 32, 64) else group * 2
    w = torch.randn(5, k) * 0.05
    qt = F.quantize(w, fmt, group)
    ours = F.dequantize(qt).double().numpy()
    ref = R.dequantize(fmt, qt.weight, qt.scales, qt.biases, qt.global_scale, group, k)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("fmt", ALL)
def test_rtn_picks_the_nearest_grid_value(fmt):
    """Brute force: no other code of the group's grid is closer to the weight."""
    group = F.default_group_size(fmt)
    w = torch.randn(4, 128) * 0.02
    qt = F.quantize(w, fmt, group)
    spec = F.get_format(fmt)
    w_hat = F.dequantize(qt)
    g = group
    params = spec.params_from_tensors(qt.scales, qt.biases, qt.global_scale)
    all_codes = torch.arange(1 << spec.bits).view(1, 1, -1)
    grid = spec.decode(all_codes.expand(4, 128 // g, -1), params)  # [N, n_groups, 2^bits]
    grid = torch.where(torch.isnan(grid), torch.full_like(grid, float("inf")), grid)
    best = (w.view(4, 128 // g, g, 1) - grid.unsqueeze(2)).abs().amin(-1).view(4, 128)
    err = (w - w_hat).abs()
    assert torch.all(err <= best + 1e-6 * w.abs().max())


@pytest.mark.parametrize("fmt", ["fp4", "nf4", "nf3", "fp8_e4m3", "fp8_e5m2"])
def test_absmax_scale_rules(fmt):
    w = torch.randn(3, 64)
    qt = F.quantize(w, fmt, 32, torch.float32)
    divisor = {"fp4": 6.0, "nf4": 1.0, "nf3": 1.0, "fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}[fmt]
    expect = w.view(3, 2, 32).abs().amax(-1) / divisor
    torch.testing.assert_close(qt.scales, expect)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_affine_scale_bias_and_error_bound(bits):
    w = torch.randn(6, 128)
    qt = F.quantize(w, f"int{bits}", 64, torch.float32)
    g = w.view(6, 2, 64)
    torch.testing.assert_close(qt.biases, g.amin(-1))
    torch.testing.assert_close(qt.scales, (g.amax(-1) - g.amin(-1)) / (2**bits - 1))
    err = (F.dequantize(qt).view(6, 2, 64) - g).abs()
    assert torch.all(err <= qt.scales.unsqueeze(-1) / 2 + 1e-6)


def test_mxfp4_follows_ocp_shared_exponent():
    w = torch.randn(2, 64) * 3
    qt = F.quantize(w, "mxfp4", 32)
    for row, grp in itertools.product(range(2), range(2)):
        amax = float(w[row, grp * 32:(grp + 1) * 32].abs().max())
        assert int(qt.scales[row, grp]) == math.floor(math.log2(amax)) - 2 + 127


def test_nvfp4_two_level_scales():
    w = torch.randn(4, 64)
    qt = F.quantize(w, "nvfp4", 16)
    assert qt.scales.dtype == torch.float8_e4m3fn
    assert float(qt.global_scale) == pytest.approx(float(w.abs().max()) / (6 * 448), rel=1e-6)
    block = w.view(4, 4, 16).abs().amax(-1) / (6 * qt.global_scale)
    torch.testing.assert_close(qt.scales.float(), block.to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("fmt", ALL)
def test_zero_groups_dequantize_to_exact_zero(fmt):
    group = F.default_group_size(fmt)
    w = torch.zeros(2, 2 * group)
    w[1, :group] = torch.randn(group)
    w_hat = F.dequantize(F.quantize(w, fmt, group))
    assert torch.equal(w_hat[0], torch.zeros(2 * group))
    assert torch.equal(w_hat[1, group:], torch.zeros(group))
    assert torch.isfinite(w_hat).all()


@pytest.mark.parametrize("fmt", ["int3", "nf3", "int2", "int5", "int6"])
def test_per_channel_with_unaligned_k_pads_the_last_word(fmt):
    w = torch.randn(3, 100)
    qt = F.quantize(w, fmt, -1)
    assert qt.weight.shape == (3, F.packed_words(100, F.get_format(fmt).bits))
    ref = R.dequantize(fmt, qt.weight, qt.scales, qt.biases, None, -1, 100)
    np.testing.assert_allclose(F.dequantize(qt).double().numpy(), ref, rtol=1e-6, atol=1e-9)


def test_errors_name_the_problem():
    w = torch.randn(4, 96)
    with pytest.raises(ValueError, match="not divisible by group_size=64"):
        F.quantize(w, "fp4", 64)
    with pytest.raises(ValueError, match="takes group_size in"):
        F.quantize(w, "mxfp4", 64)
    with pytest.raises(ValueError, match="unknown format 'fp5'"):
        F.quantize(w, "fp5", 32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.quantize(torch.full((2, 32), float("nan")), "fp4", 32)
    with pytest.raises(ValueError, match="overflows the scale dtype"):
        F.quantize(torch.full((2, 32), 1e6), "fp4", 32, torch.float16)
    with pytest.raises(ValueError, match="must be 2-D"):
        F.quantize(torch.randn(32), "fp4", 32)


def test_e2m1_encode_and_round_match_a_search_on_every_midpoint():
    # e2m1_encode / e2m1_round find the nearest magnitude by a table of quarter intervals, not a
    # search: hold them against bucketize (ties toward zero) on a dense sweep, every midpoint,
    # its float32 neighbours, zeros of both signs and values past saturation
    from metal_marlin_torch.formats.fp4 import _E2M1_MIDS, e2m1_decode, e2m1_encode, e2m1_round

    mids = torch.tensor(_E2M1_MIDS)
    x = torch.cat([torch.arange(-8 * 64, 8 * 64 + 1) / 64.0, mids, -mids,
                   torch.nextafter(mids, torch.tensor(0.0)), torch.nextafter(mids, torch.tensor(9.0)),
                   -torch.nextafter(mids, torch.tensor(9.0)), torch.tensor([0.0, -0.0, 1e30, -1e30, 1e-30])])
    idx = torch.bucketize(x.abs(), mids, right=False)
    ref = idx | (((x < 0) & (idx > 0)).long() << 3)
    assert torch.equal(e2m1_encode(x), ref)
    assert torch.equal(e2m1_round(x), e2m1_decode(ref))  # -0.0 == 0.0 here, as the docstring says


@pytest.mark.parametrize("fmt", ["int4", "int3", "fp4", "nf3", "mxfp4", "nvfp4", "fp8_e4m3"])
def test_quantize_in_row_blocks_is_the_same(fmt, monkeypatch):
    """quantize() works through large weights in blocks of rows (bounded temporaries); the result
    must equal the whole-matrix quantization bit for bit, for a block size that does not divide N
    (nvfp4's tensor-wide global scale keeps it whole)."""
    from metal_marlin_torch.formats import base  # noqa: PLC0415

    w = torch.randn(37, 256, dtype=torch.bfloat16)
    group = F.get_format(fmt).group_sizes[0]
    whole = F.quantize(w, fmt, group)
    monkeypatch.setattr(base, "QUANTIZE_BLOCK_ELEMENTS", 5 * 256)  # 5 rows a block: 8 blocks, the last of 2
    blocked = F.quantize(w, fmt, group)
    for name in ("weight", "scales", "biases", "global_scale"):
        a, b = getattr(whole, name), getattr(blocked, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a,
                                                      b.view(torch.uint8) if b.dtype.itemsize == 1 else b), name
