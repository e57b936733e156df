"""marlin_emu attention's flash prefill kernel and split decode (shaders/attention.h, emulated)
against the pure-torch op (ops/attention.py), which tests/ops/test_attention.py holds against
``scaled_dot_product_attention``. tests/metal/test_layer.py covers the row kernel without a split.

Which kernel a shape reaches is asked from the host dispatcher itself (``_attention_plan``), so
each case asserts that it exercises the path it names. Sizes are off the prefill tiles (32 query
rows, 16 keys, head dims in chunks of 8) and off the decode slices.

Tolerance: the kernels and the torch op both accumulate in float, in other orders (the prefill
kernel sums 8-element products in the simdgroup matrices and rescales by tiles), so results may
differ by a float rounding or two before the rounding to the output dtype: one ulp of that dtype.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from .conftest import needs_emulator

pytestmark = needs_emulator

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-5}
ROWS, PREFILL = 0, 1  # variant codes of _attention_plan (csrc/ops/layer.cpp)


def close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)


def inputs(b: int, hq: int, hk: int, sq: int, sk: int, d: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, sk, d, generator=g).to(dtype)
    return q, k, v


def run(emu, q, k, v, causal, window, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return emu.attention(q, k, v, scale, causal, window), torch.ops.marlin.attention(q, k, v, scale, causal, window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "hq", "hk", "sq", "sk", "d", "causal", "window"), [
    (1, 2, 1, 33, 33, 40, True, 0),     # prefill one row past a tile, head dim off 8s... of 16
    (2, 3, 3, 20, 45, 64, True, 0),     # queries after 25 cached keys, key tiles partial
    (1, 4, 2, 50, 50, 24, True, 7),     # sliding window: the first key tiles are skipped
    (1, 1, 1, 17, 29, 72, False, 0),    # not causal, head dim 72 (9 chunks)
    (1, 2, 2, 12, 12, 128, True, 0),    # the widest head dim of the prefill kernel
])
def test_prefill(emu, dtype, b, hq, hk, sq, sk, d, causal, window):
    assert emu._attention_plan(b * hq, sq, sk, d, causal, window)[0] == PREFILL
    q, k, v = inputs(b, hq, hk, sq, sk, d, dtype)
    got, want = run(emu, q, k, v, causal, window)
    close(got, want, dtype)


def test_prefill_every_schedule(emu, thread_order):
    """The K/V tile is shared by the 4 simdgroups: a missing barrier between tiles shows here
    (the race check reports it under any schedule; skew orders also read stale tiles)."""
    q, k, v = inputs(1, 2, 1, 40, 40, 16, torch.float16, seed=1)
    got, want = run(emu, q, k, v, True, 0)
    close(got, want, torch.float16)


def test_prefill_head_dim_over_128_uses_rows(emu):
    """Head dims past the prefill kernel's 128 run on the row kernel (same results)."""
    assert emu._attention_plan(1, 20, 20, 136, True, 0)[0] == ROWS
    q, k, v = inputs(1, 1, 1, 20, 20, 136, torch.float32)
    got, want = run(emu, q, k, v, True, 0)
    close(got, want, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "hq", "hk", "sq", "sk", "d", "causal", "window", "splits"), [
    (1, 2, 1, 1, 700, 64, True, 0, 3),     # decode over 700 keys: 3 slices of 234
    (1, 1, 1, 1, 600, 40, True, 300, 2),   # sliding window of 300: slices cover the window only
    (2, 2, 2, 3, 530, 32, True, 0, 3),     # three query rows (rows' ranges differ: last slice short)
    (1, 1, 1, 1, 520, 16, False, 0, 3),    # not causal
    (1, 8, 1, 1, 600, 32, True, 0, 3),     # GQA 8: two threadgroups of 4 query heads per K/V head
    (2, 6, 1, 2, 300, 16, True, 0, 2),     # GQA 6: threadgroups of 3 heads, two query rows
])
def test_decode_split(emu, dtype, b, hq, hk, sq, sk, d, causal, window, splits):
    # (the host asks the plan for B * Hq * Sq / heads per threadgroup rows; these sizes split alike)
    variant, n, per = emu._attention_plan(b * hq, sq, sk, d, causal, window)
    assert (variant, n) == (ROWS, splits) and n * per >= (window or sk)
    q, k, v = inputs(b, hq, hk, sq, sk, d, dtype)
    got, want = run(emu, q, k, v, causal, window)
    close(got, want, dtype)


def test_decode_split_every_schedule(emu, thread_order):
    q, k, v = inputs(1, 1, 1, 1, 600, 32, torch.bfloat16, seed=2)
    got, want = run(emu, q, k, v, True, 0)
    close(got, want, torch.bfloat16)


def test_plan_splits_from_cache_length(emu):
    """The host splits a decode row by the cache length (256 keys or more per slice), fewer
    slices when there are many rows already, never past 64."""
    plan = emu._attention_plan
    assert plan(32, 1, 100, 128, True, 0)[:2] == [ROWS, 1]
    assert plan(32, 1, 4096, 128, True, 0)[:2] == [ROWS, 8]    # 256 target groups / 32 rows
    assert plan(1, 1, 32768, 128, True, 0)[:2] == [ROWS, 64]   # the cap
    assert plan(1, 1, 32768, 128, True, 1024)[:2] == [ROWS, 4]  # only the window counts
    assert plan(512, 1, 8192, 128, True, 0)[:2] == [ROWS, 1]   # enough rows to fill the GPU
    assert plan(1, 9, 9, 64, True, 0)[0] == PREFILL
    assert plan(1, 8, 9, 64, True, 0)[0] == ROWS


@pytest.mark.parametrize(("sq", "sk"), [(1, 600), (36, 36)])  # split decode, prefill
def test_specials(emu, sq, sk):
    """NaN/Inf policy (shaders/attention.h): a NaN in q spreads to its row only, a NaN in k to
    the rows that attend that key, an all -inf row is NaN, a -inf score weighs 0; as the torch op."""
    q, k, v = inputs(1, 2, 1, sq, sk, 16, torch.float32, seed=3)
    q[0, 0, 0, 5] = float("nan")                  # head 0, row 0
    k[0, 0, sk - 3, 2] = float("nan")             # key sk - 3: rows at positions >= sk - 3 (causal)
    q[0, 1, sq - 1] = 0.0
    q[0, 1, sq - 1, 0] = float("inf")             # head 1's last row: scores +-inf by sign of k[., 0]
    got, want = run(emu, q, k, v, True, 0)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=2e-5, atol=2e-5)
    assert torch.isnan(got[0, 0, 0]).all()
    if sq > 4:
        assert torch.isfinite(got[0, 0, 1:sq - 3]).all() and torch.isnan(got[0, 0, sq - 3:]).all()
    # -inf scores only: the row's keys with k[., 0] < 0 give -inf, the others +inf (NaN), so
    # make them all negative: every score -inf, the row is NaN (0 / 0)
    k2 = k.clone()
    k2[..., 0] = -k2[..., 0].abs() - 0.1
    k2[0, 0, sk - 3, 2] = 0.0
    got2, want2 = run(emu, q, k2, v, True, 0)
    torch.testing.assert_close(got2, want2, equal_nan=True, rtol=2e-5, atol=2e-5)
    assert torch.isnan(got2[0, 1, sq - 1]).all() and torch.isfinite(got2[0, 1, :sq - 1]).all()


def test_sdpa_bound(emu):
    """Prefill and split decode against scaled_dot_product_attention (float32 math on the
    fp16 inputs, GQA by repeated K/V): within one fp16 ulp (1e-3 relative + absolute)."""
    q, k, v = inputs(1, 4, 2, 40, 600, 64, torch.float16, seed=4)
    kr, vr = k.float().repeat_interleave(2, 1), v.float().repeat_interleave(2, 1)
    mask = torch.ones(40, 600, dtype=torch.bool).tril(560)
    want = F.scaled_dot_product_attention(q.float(), kr, vr, attn_mask=mask).half()
    torch.testing.assert_close(emu.attention(q, k, v, 64 ** -0.5, True, 0), want, rtol=1e-3, atol=1e-3)
    want1 = F.scaled_dot_product_attention(q[:, :, -1:].float(), kr, vr).half()
    torch.testing.assert_close(emu.attention(q[:, :, -1:], k, v, 64 ** -0.5, True, 0), want1, rtol=1e-3, atol=1e-3)


def fp8_inputs(b: int, hq: int, hk: int, sq: int, sk: int, d: int, dtype: torch.dtype, seed: int = 0):
    """q and an FP8 E4M3 K/V cache in kv.stores.FP8Store's layout (bytes + per-token scales)."""
    from metal_marlin_torch.kv.stores import FP8Store  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, sk, d, generator=g) * (1 + 5 * torch.rand(b, hk, sk, 1, generator=g))
    v = torch.randn(b, hk, sk, d, generator=g)
    (kc, ks), (vc, vs) = FP8Store.quantize(k), FP8Store.quantize(v)
    return q, kc, ks[..., 0], vc, vs[..., 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "hq", "hk", "sq", "sk", "d", "causal", "window", "variant", "splits"), [
    (1, 2, 1, 33, 40, 40, True, 0, PREFILL, 1),    # prefill tiles, GQA 2
    (1, 1, 1, 20, 20, 24, True, 5, PREFILL, 1),    # prefill with a window
    (1, 2, 2, 1, 37, 64, True, 0, ROWS, 1),        # decode, one slice
    (1, 2, 1, 1, 600, 32, True, 0, ROWS, 3),       # decode split over 600 keys
    (1, 1, 1, 3, 11, 16, False, 0, ROWS, 1),       # short rows, not causal
])
def test_fp8(emu, dtype, b, hq, hk, sq, sk, d, causal, window, variant, splits):
    """attention_fp8's kernels read the E4M3 bytes and scales and dequantize in the tile loads
    (to q's dtype, as the torch op's dequantize): the torch op within one ulp of the dtype."""
    assert emu._attention_plan(b * hq, sq, sk, d, causal, window)[:2] == [variant, splits]
    q, kc, ks, vc, vs = fp8_inputs(b, hq, hk, sq, sk, d, dtype)
    got = emu.attention_fp8(q, kc, ks, vc, vs, d ** -0.5, causal, window)
    want = torch.ops.marlin.attention_fp8(q, kc, ks, vc, vs, d ** -0.5, causal, window)
    close(got, want, dtype)


def test_fp8_every_schedule(emu, thread_order):
    q, kc, ks, vc, vs = fp8_inputs(1, 1, 1, 35, 35, 16, torch.float16, seed=5)
    close(emu.attention_fp8(q, kc, ks, vc, vs, 0.25, True, 0), torch.ops.marlin.attention_fp8(q, kc, ks, vc, vs, 0.25,
                                                                                              True, 0), torch.float16)


def test_fp8_errors(emu):
    q, kc, ks, vc, vs = fp8_inputs(1, 2, 1, 2, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="k and v must be Byte"):
        emu.attention_fp8(q, kc.float(), ks, vc, vs, 0.25, True, 0)
    with pytest.raises(ValueError, match=r"k_scales and v_scales must be float32 \[B, Hk, Sk\]"):
        emu.attention_fp8(q, kc, ks[..., None], vc, vs, 0.25, True, 0)


def paged(k: torch.Tensor, v: torch.Tensor, page: int, seed: int = 0):
    """Contiguous K/V [B, Hk, Sk, D] -> pages [num_pages, Hk, P, D] in a shuffled order plus a
    spare page, and the block table; table columns past the used pages hold a page id far out of
    range (the kernels must never read them)."""
    b, hk, sk, d = k.shape
    used = -(-sk // page)
    cols = used + 1
    n = b * used + 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    kp = torch.randn(n, hk, page, d).to(k.dtype)  # garbage in unused slots
    vp = torch.randn(n, hk, page, d).to(k.dtype)
    table = torch.full((b, cols), 1 << 30, dtype=torch.int32)
    for bi in range(b):
        for i in range(used):
            pid = int(perm[bi * used + i])
            table[bi, i] = pid
            lo, hi = i * page, min(sk, (i + 1) * page)
            kp[pid, :, : hi - lo] = k[bi, :, lo:hi]
            vp[pid, :, : hi - lo] = v[bi, :, lo:hi]
    return kp, vp, table


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("b", "hq", "hk", "sq", "sk", "d", "page", "causal", "window", "variant", "splits"), [
    (2, 2, 1, 33, 45, 40, 16, True, 0, PREFILL, 1),   # prefill over pages of 16, last page partial
    (1, 2, 2, 12, 12, 24, 5, True, 6, PREFILL, 1),    # pages of 5 (not a tile divisor), window
    (2, 4, 2, 1, 37, 64, 8, True, 0, ROWS, 1),        # decode, one slice
    (1, 1, 1, 1, 600, 32, 64, True, 0, ROWS, 3),      # decode split over paged keys
])
def test_paged(emu, dtype, b, hq, hk, sq, sk, d, page, causal, window, variant, splits):
    """attention_paged's kernels map each token through the block table: equal to the contiguous
    op on the same K/V (torch op) within one ulp of the dtype."""
    assert emu._attention_plan(b * hq, sq, sk, d, causal, window)[:2] == [variant, splits]
    q, k, v = inputs(b, hq, hk, sq, sk, d, dtype)
    kp, vp, table = paged(k, v, page)
    got = emu.attention_paged(q, kp, vp, table, sk, d ** -0.5, causal, window)
    close(got, torch.ops.marlin.attention(q, k, v, d ** -0.5, causal, window), dtype)


def test_paged_every_schedule(emu, thread_order):
    q, k, v = inputs(1, 1, 1, 34, 34, 16, torch.float16, seed=6)
    kp, vp, table = paged(k, v, 7)
    close(emu.attention_paged(q, kp, vp, table, 34, 0.25, True, 0), torch.ops.marlin.attention(q, k, v, 0.25, True, 0),
          torch.float16)


def test_paged_errors(emu):
    q, k, v = inputs(1, 2, 1, 2, 10, 16, torch.float32)
    kp, vp, table = paged(k, v, 4)
    with pytest.raises(ValueError, match="block_table must be int32"):
        emu.attention_paged(q, kp, vp, table.long(), 10, 0.25, True, 0)
    with pytest.raises(ValueError, match=r"seq_k must be in \[0, 16\]"):
        emu.attention_paged(q, kp, vp, table, 17, 0.25, True, 0)
