"""marlin_emu decoder-layer ops (shaders/norm.h, act.h, rope.h, emulated) against the pure-torch
ops (ops/layer.py), which tests/ops/test_layer.py holds against the transformers modules.

Tolerances: the kernels sum a row in another order than torch (norms) and use the C library's
exp/tanh/cos/sin instead of torch's vectorized ones, so results may differ by an ulp of float
before the rounding to the output dtype, i.e. by at most one ulp of that dtype."""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch.ops import layer as oracle  # the pure-torch oracle (CPU dispatch runs ops/layer_cpu.py)

from .conftest import needs_emulator

pytestmark = needs_emulator

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# one ulp of the output dtype, relative (1e-5 for fp32 covers a float ulp of a long sum)
TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "residual"), [
    ((1, 67), False),       # one decode row, fewer elements than threads
    ((3, 300), True),       # rows longer than the 256-thread group: a strided loop, last lap partial
    ((2, 2, 33), True),     # leading dims flattened
])
def test_rms_norm(emu, dtype, shape, residual):
    x = torch.randn(shape).to(dtype)
    w = torch.randn(shape[-1]).to(dtype)
    r = torch.randn(shape).to(dtype) if residual else None
    got, want = emu.rms_norm(x, w, r, 1e-6), oracle.rms_norm(x, w, r, 1e-6)
    assert len(got) == len(want) == (2 if residual else 1)
    close(got[0], want[0], dtype)
    if residual:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # x + residual: one rounding, exact


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "affine", "residual"), [
    ((1, 67), True, False),
    ((3, 300), True, True),
    ((2, 45), False, True),   # no weight, no bias
])
def test_layer_norm(emu, dtype, shape, affine, residual):
    x = (torch.randn(shape) * 3 + 5).to(dtype)  # an offset mean: the two-pass variance matters
    w = torch.randn(shape[-1]).to(dtype) if affine else None
    b = torch.randn(shape[-1]).to(dtype) if affine else None
    r = torch.randn(shape).to(dtype) if residual else None
    got, want = emu.layer_norm(x, w, b, r, 1e-5), oracle.layer_norm(x, w, b, r, 1e-5)
    assert len(got) == len(want)
    close(got[0], want[0], dtype)
    if residual:
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)


def test_norm_specials(emu):
    # NaN/Inf policy: a row holding NaN or Inf normalizes to NaN (as torch); other rows unaffected
    x = torch.randn(3, 40)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    w = torch.randn(40)
    for name in ("rms_norm", "layer_norm"):
        args = (x, w, None, 1e-6) if name == "rms_norm" else (x, w, w, None, 1e-6)
        got, want = getattr(emu, name)(*args)[0], getattr(oracle, name)(*args)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, equal_nan=True)
        assert torch.isnan(got[0]).all() and torch.isfinite(got[2]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["silu_mul", "gelu_mul"])
@pytest.mark.parametrize(("shape", "fused"), [((1, 33), False), ((3, 300), True), ((2, 2, 20), True)])
def test_gated_act(emu, dtype, op, shape, fused):
    g = (torch.randn(shape) * 4).to(dtype)
    u = torch.randn(shape).to(dtype)
    args = (torch.cat([g, u], -1), None) if fused else (g, u)
    close(getattr(emu, op)(*args), getattr(oracle, op)(*args), dtype)


def test_gated_act_specials(emu):
    # silu(-inf) = gelu(-inf) = NaN, +inf stays inf, NaN propagates; large |x| saturates
    g = torch.tensor([[float("-inf"), float("inf"), float("nan"), -100.0, 100.0, 0.0]])
    u = torch.ones_like(g)
    for op in ("silu_mul", "gelu_mul"):
        torch.testing.assert_close(getattr(emu, op)(g, u), getattr(oracle, op)(g, u), equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "hq", "hk", "s", "d", "rot", "interleaved", "pos_rows"), [
    (1, 4, 2, 1, 16, 16, False, 1),     # decode step, GQA
    (2, 3, 1, 5, 12, 8, True, 2),       # partial rotary, interleaved, per-batch positions
    (1, 2, 2, 3, 128, 128, False, 1),   # 64 pairs: a full threadgroup row
    (2, 2, 1, 2, 10, 6, False, 1),      # odd pair counts, positions shared by the batch
])
def test_rope(emu, dtype, b, hq, hk, s, d, rot, interleaved, pos_rows):
    q, k = torch.randn(b, hq, s, d).to(dtype), torch.randn(b, hk, s, d).to(dtype)
    pos = torch.randint(0, 4000, (pos_rows, s))  # large angles: precise cos/sin needed
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    got = emu.rope(q, k, pos, inv_freq, 1.25, interleaved)
    want = oracle.rope(q, k, pos, inv_freq, 1.25, interleaved)
    close(got[0], want[0], dtype)
    close(got[1], want[1], dtype)
    torch.testing.assert_close(got[0][..., rot:], q[..., rot:], rtol=0, atol=0)


def test_rope_int32_positions(emu):
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    inv_freq = torch.rand(4)
    pos = torch.tensor([[5, 9, 100]])
    a = emu.rope(q, k, pos.int(), inv_freq, 1.0, False)
    b = emu.rope(q, k, pos, inv_freq, 1.0, False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize(("call", "match"), [
    (lambda e: e.rms_norm(torch.randn(2, 8).double(), torch.randn(8).double(), None, 1e-6),
     "float16, bfloat16 or float32"),
    (lambda e: e.rms_norm(torch.randn(2, 8), torch.randn(7), None, 1e-6), "weight must have shape"),
    (lambda e: e.layer_norm(torch.randn(2, 8), None, None, torch.randn(2, 8).half(), 1e-6),
     "residual must have x's dtype"),
    (lambda e: e.silu_mul(torch.randn(2, 7), None), "last dim must be even"),
    (lambda e: e.gelu_mul(torch.randn(2, 8), torch.randn(2, 9)), "up must have gate's shape"),
    (lambda e: e.rope(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.arange(4)[None], torch.rand(4),
                      1.0, False), "positions must be"),
    (lambda e: e.rope(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.arange(3)[None], torch.rand(5),
                      1.0, False), "inv_freq's length"),
])
def test_bad_arguments(emu, call, match):
    with pytest.raises(ValueError, match=match):
        call(emu)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "hq", "hk", "sq", "sk", "d", "causal", "window"), [
    (1, 4, 2, 1, 37, 64, True, 0),     # decode step over 37 cached keys, GQA 2
    (2, 2, 2, 5, 5, 40, True, 0),      # prefill, head dim off 32
    (1, 3, 1, 4, 11, 16, True, 3),     # sliding window, GQA 3, queries after a cache
    (1, 2, 1, 3, 6, 96, False, 0),     # not causal
])
def test_attention(emu, dtype, b, hq, hk, sq, sk, d, causal, window):
    q = torch.randn(b, hq, sq, d).to(dtype)
    k, v = torch.randn(b, hk, sk, d).to(dtype), torch.randn(b, hk, sk, d).to(dtype)
    got = emu.attention(q, k, v, d ** -0.5, causal, window)
    want = torch.ops.marlin.attention(q, k, v, d ** -0.5, causal, window)
    # both accumulate in float (another order): within a rounding of the output dtype
    close(got, want, dtype)


def test_attention_specials_and_errors(emu):
    q, k, v = torch.randn(1, 2, 2, 32), torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32)
    v[0, 0, 1, 3] = float("nan")  # key 1 of head 0: rows attending it get NaN, head 1 does not
    got = emu.attention(q, k, v, 0.2, True, 0)
    torch.testing.assert_close(got, torch.ops.marlin.attention(q, k, v, 0.2, True, 0), equal_nan=True)
    assert torch.isnan(got[0, 0]).any() and torch.isfinite(got[0, 1]).all()
    with pytest.raises(ValueError, match="head_dim must be <= 256"):
        emu.attention(torch.randn(1, 1, 1, 288), torch.randn(1, 1, 2, 288), torch.randn(1, 1, 2, 288), 1.0, True, 0)
    with pytest.raises(ValueError, match="more rows"):
        emu.attention(torch.randn(1, 1, 3, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8), 1.0, True, 0)
