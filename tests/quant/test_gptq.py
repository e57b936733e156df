"""GPTQ against independent references: output error vs RTN, a plain OBS reference on tiny sizes,
the packed layout (act-order with static groups), damping, scale search, bad input."""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch import formats as F
from metal_marlin_torch.nn import MarlinLinear
from metal_marlin_torch.quant.gptq import HessianAccumulator, damped_inverse_cholesky, gptq_quantize
from metal_marlin_torch.quant.scale_search import search_group_params

FORMATS = ("fp4", "mxfp4", "nvfp4", "int4", "nf4", "int3", "nf3", "int2", "int5", "int6")


def correlated_inputs(t: int, k: int, seed: int) -> torch.Tensor:
    """Inputs with correlated channels of unequal scale (what makes GPTQ matter)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=gen) * 0.4 + torch.eye(k)
    scale = torch.linspace(0.3, 3.0, k)[torch.randperm(k, generator=gen)]
    return (torch.randn(t, k, generator=gen) @ mix) * scale


def group_for(fmt: str, k: int) -> int:
    return {"mxfp4": 32, "nvfp4": 16}.get(fmt, 32 if k < 128 else 128)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gptq_beats_rtn_output_error(fmt):
    n, k = 48, 128
    x = correlated_inputs(1024, k, seed=1)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(2))
    h = x.T @ x / x.shape[0]
    g = group_for(fmt, k)
    res = gptq_quantize(w, h, fmt, g, torch.float32)
    rtn = F.dequantize(F.quantize(w, fmt, g, torch.float32))
    err_gptq = (x @ (w - res.w_hat).T).pow(2).mean()
    err_rtn = (x @ (w - rtn).T).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))


def obs_reference(w: torch.Tensor, h: torch.Tensor, fmt: str, g: int, damp: float, order: torch.Tensor):
    """The optimal-brain-surgeon update written plainly, in float64: quantize the columns in
    ``order`` one at a time with static group parameters, and after each, move the columns
    not yet quantized by the exact optimum, computed from an explicit inverse of the Hessian
    restricted to the columns still free (no Cholesky, no lazy blocks)."""
    spec = F.get_format(fmt)
    n, k = w.shape
    params = spec.group_params(w.float().view(n, k // g, g), torch.float32)
    h = h.double() + damp * torch.diagonal(h.double()).mean() * torch.eye(k, dtype=torch.float64)
    work = w.double().clone()
    codes = torch.zeros(n, k, dtype=torch.int64)
    free = list(order.tolist())
    while free:
        i = free[0]
        hinv = torch.linalg.inv(h[free][:, free])
        p = F.GroupParams(params.scales[:, i // g:i // g + 1],
                          None if params.biases is None else params.biases[:, i // g:i // g + 1],
                          params.global_scale)
        c = spec.encode(work[:, i].float().view(n, 1, 1), p).view(n)
        q = spec.decode(c.view(n, 1, 1), p).view(n).double()
        codes[:, i] = c
        delta = -((work[:, i] - q) / hinv[0, 0]).unsqueeze(1) * hinv[0].unsqueeze(0)  # [n, |free|]
        work[:, free] += delta
        work[:, i] = q
        free = free[1:]
    return codes


@pytest.mark.parametrize("fmt,act_order,block_size", [
    ("int4", False, 3), ("int3", True, 4), ("fp4", True, 8), ("nf3", False, 16), ("int2", True, 5),
    ("int5", True, 7), ("int6", False, 4),
])
def test_gptq_matches_plain_obs_reference(fmt, act_order, block_size):
    n, k, g = 6, 64, 32
    x = correlated_inputs(64, k, seed=3).double()
    h = (x.T @ x / 64).float()
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(4))
    res = gptq_quantize(w, h, fmt, g, torch.float32, damp=0.05, block_size=block_size,
                        act_order=act_order, scale_search=False)
    order = torch.argsort(torch.diagonal(h), descending=True, stable=True) if act_order else torch.arange(k)
    ref_codes = obs_reference(w, h, fmt, g, 0.05, order)
    got = F.unpack(res.qt.weight, F.get_format(fmt).bits, k)
    assert torch.equal(got.long(), ref_codes)


@pytest.mark.parametrize("fmt", FORMATS)
def test_static_groups_give_canonical_layout(fmt):
    """Act-order permutes the processing order only: the packed tensors are in the original
    column order, dequantized by the standard op they equal GPTQ's reconstruction, and the
    group parameters are those of the original weight's groups."""
    n, k = 16, 128
    g = group_for(fmt, k)
    x = correlated_inputs(512, k, seed=5)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(6))
    w[3] = 0.0  # all-zero groups (scale 0): the codes recovered after the column loop must still decode to w_hat
    res = gptq_quantize(w, x.T @ x / 512, fmt, g, torch.float16, act_order=True, scale_search=False)
    qt = res.qt
    deq = torch.ops.marlin.dequantize(qt.weight, qt.scales, qt.biases, qt.global_scale, fmt, g, k, torch.float32)
    assert torch.equal(deq, res.w_hat)
    rtn = F.quantize(w, fmt, g, torch.float16)  # same static parameters as round to nearest
    assert torch.equal(qt.scales.view(torch.uint8) if qt.scales.dtype == torch.float8_e4m3fn else qt.scales,
                       rtn.scales.view(torch.uint8) if rtn.scales.dtype == torch.float8_e4m3fn else rtn.scales)
    layer = MarlinLinear(k, n, bias=False, format=fmt, group_size=g)
    layer.load_quantized(qt)
    xin = torch.randn(3, k)
    torch.testing.assert_close(layer(xin), xin @ res.w_hat.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp4", "nvfp4", "int3", "nf3", "mxfp4"])
def test_scale_search_never_worse_than_absmax(fmt):
    n, k = 32, 256
    g = group_for(fmt, k)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7)) ** 3  # heavy tails
    spec = F.get_format(fmt)
    groups = w.view(n, k // g, g)

    def err(p):
        return (spec.decode(spec.encode(groups, p), p) - groups).pow(2).sum(-1)

    base = spec.group_params(groups, torch.float16)
    best = search_group_params(spec, groups, torch.float16)
    assert bool((err(best) <= err(base)).all())
    assert float(err(best).sum()) < 0.95 * float(err(base).sum())


def test_damping_retries_on_singular_hessian():
    k = 32
    x = torch.randn(8, k, generator=torch.Generator().manual_seed(8))  # rank 8 < 32
    h = x.T @ x / 8
    _, used = damped_inverse_cholesky(h, 0.0)
    assert used > 0
    res = gptq_quantize(torch.randn(4, k), h, "int4", 32, damp=0.0)
    assert res.damp > 0 and torch.isfinite(res.w_hat).all()


def test_dead_inputs_are_zeroed_and_finite():
    k = 64
    x = torch.randn(256, k)
    x[:, 5] = 0
    res = gptq_quantize(torch.randn(8, k), x.T @ x / 256, "fp4", 32)
    assert torch.isfinite(res.w_hat).all()


def test_hessian_accumulator_equals_mean_outer_product():
    acc = HessianAccumulator(12)
    chunks = [torch.randn(3, 5, 12, dtype=torch.bfloat16) for _ in range(3)]
    for c in chunks:
        acc.add(c)
    xs = torch.cat([c.float().reshape(-1, 12) for c in chunks]).double()
    torch.testing.assert_close(acc.hessian().double(), xs.T @ xs / xs.shape[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no inputs"):
        HessianAccumulator(4).hessian()


def test_bad_inputs():
    h = torch.eye(64)
    with pytest.raises(ValueError, match="hessian must be"):
        gptq_quantize(torch.randn(4, 64), torch.eye(32), "int4", 32)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(torch.full((4, 64), float("nan")), h, "int4", 32)
    with pytest.raises(ValueError, match="group_size"):
        gptq_quantize(torch.randn(4, 64), h, "mxfp4", 64)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(torch.randn(4, 64), h * float("inf"), "int4", 32)


@pytest.mark.parametrize("fmt", [*FORMATS, "nf4", "fp8_e4m3", "int8"])
def test_column_coder_is_bitwise_the_formats_encode_decode(fmt):
    # the GPTQ column loop's coder precomputes per-group divisors; its codes and values must be
    # those of fmt.encode / fmt.decode exactly, including all-zero groups (scale 0) and values
    # exactly on a rounding midpoint (ties go toward zero, docs/FORMAT.md)
    from metal_marlin_torch.quant.gptq import _ColumnCoder

    n, k = 48, 256
    g = group_for(fmt, k)
    spec = F.get_format(fmt)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(11)) ** 3
    w[5] = 0.0  # all-zero rows: every group of row 5 has scale 0
    params = search_group_params(spec, w.view(n, k // g, g), torch.float16)
    # put some values exactly on midpoints of the decoded grid of their group
    rows = torch.arange(0, n, 3)
    q = spec.decode(spec.encode(w.view(n, k // g, g), params), params).view(n, k)
    w[rows, 1] = (q[rows, 1] + q[rows, 2]) / 2
    coder = _ColumnCoder(spec, params, n)
    for j in range(k):
        col = w[:, j].contiguous()
        p = F.GroupParams(params.scales[:, j // g:j // g + 1],
                          None if params.biases is None else params.biases[:, j // g:j // g + 1],
                          params.global_scale)
        ref_c = spec.encode(col.view(n, 1, 1), p)
        ref_q = spec.decode(ref_c, p).view(n)
        c, qv = coder(col, j // g)
        assert torch.equal(c, ref_c.view(n)), (fmt, j)
        assert torch.equal(qv, ref_q), (fmt, j)


@pytest.mark.parametrize("fmt", ["fp4", "mxfp4", "nvfp4", "int4", "int2", "nf3", "fp8_e4m3"])
def test_scale_search_equals_brute_force_over_whole_groups(fmt):
    # the search builds candidates from each group's [min, max] only; the reference builds each
    # candidate from the whole group times alpha (the plain definition) and keeps the best
    from metal_marlin_torch.quant.scale_search import candidate_params

    n, k = 24, 256
    g = group_for(fmt, k)
    spec = F.get_format(fmt)
    groups = (torch.randn(n, k, generator=torch.Generator().manual_seed(5)) ** 3).view(n, k // g, g)
    weights = torch.rand(k // g, g, generator=torch.Generator().manual_seed(6))
    sdt = spec.scale_dtype(torch.float16)

    def err(p):
        return ((spec.decode(spec.encode(groups, p), p) - groups) ** 2 * weights).sum(-1)

    base = spec.group_params(groups, sdt)
    best_err, best_scale = err(base), base.scales.float() if base.scales.dtype != torch.uint8 else base.scales
    alphas = torch.linspace(1.0, 0.6, 16)[1:].tolist() + [1.05]
    if spec.fixed_scale_dtype == torch.uint8:
        alphas.append(2.0)
    for a in alphas:
        cand = candidate_params(spec, groups, sdt, a, base)  # the whole groups, times a
        e = err(cand)
        cs = cand.scales.float() if cand.scales.dtype != torch.uint8 else cand.scales
        best_scale = torch.where(e < best_err, cs, best_scale)
        best_err = torch.minimum(e, best_err)
    got = search_group_params(spec, groups, torch.float16, weights)
    got_scale = got.scales.float() if got.scales.dtype != torch.uint8 else got.scales
    assert torch.equal(got_scale, best_scale)
    torch.testing.assert_close(err(got), best_err, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["fp4", "int4", "nf3"])
def test_static_block_loop_equals_the_eager_loop(fmt, monkeypatch):
    # CUDA captures the column loop of each full block as a graph over static buffers (refilled
    # per block, group parameters gathered per column); its code runs eagerly on CPU here and
    # must give the eager loop's codes and reconstruction (the capture itself needs a GPU:
    # benchmarks/gptq_time.py checks it there)
    from metal_marlin_torch.quant import gptq as G

    n, k = 24, 512
    x = correlated_inputs(1024, k, seed=7)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(8))
    w[2] = 0.0
    h = x.T @ x / 1024
    eager = gptq_quantize(w, h, fmt, 128, block_size=64)
    monkeypatch.setattr(G, "_STATIC_LOOP_ON_CPU", True)
    static = gptq_quantize(w, h, fmt, 128, block_size=64)
    assert torch.equal(static.qt.weight, eager.qt.weight)
    assert torch.equal(static.w_hat, eager.w_hat)
