"""marlin_emu.moe_gemm (host code + Metal kernels of shaders/moe.h, emulated) against the
pure-torch marlin.moe_gemm (ops/moe.py: each used expert dequantized by the format modules, one
fp32 GEMM per expert).

Error bounds are those of test_gemm_emu.py, per row with that row's expert: fp32 accumulation on
both sides, the weight rounding to the activation type of the grouped (simdgroup-matrix) path,
and the final rounding. Which path a shape reaches is asked from the host dispatcher
(`_moe_gemm_plan`), so the tests assert both the decode path (moe_gemv) and the prefill path
(moe_sort + grouped moe_gemm) run. Sizes are small (N = 20, K = 2 groups): the emulator runs
every GPU thread as a fiber.
"""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch import emulator
from metal_marlin_torch import formats as F

from .conftest import needs_emulator
from .test_gemm_emu import CASES, UNIT, k_for, magnitude

pytestmark = needs_emulator

GEMV, GEMM = 0, 1  # variant codes of _moe_gemm_plan (csrc/ops/moe.cpp)


class Experts:
    """E experts RTN-quantized one by one (real codes, scales, biases) and stacked as the op
    takes them: weight [E, N, words], scales/biases [E, N, K/G], global_scale [E, 1]."""

    def __init__(self, fmt_name: str, g: int, e: int, n: int, k: int, with_bias: bool, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.layers = [F.quantize(torch.randn(n, k, generator=gen), fmt_name, g, torch.float16) for _ in range(e)]
        first = self.layers[0]
        self.weight = torch.stack([q.weight for q in self.layers])
        self.scales = torch.stack([q.scales for q in self.layers])
        self.biases = None if first.biases is None else torch.stack([q.biases for q in self.layers])
        self.global_scale = (None if first.global_scale is None
                             else torch.stack([q.global_scale.reshape(1) for q in self.layers]))
        self.bias = torch.randn(e, n, generator=gen) if with_bias else None
        self.fmt_name, self.g, self.k = fmt_name, g, k
        # |s*q| + |b| per weight of each expert: what bounds the kernels' rounding
        self.mag = torch.stack([magnitude(q, k) for q in self.layers])

    def args(self, bias_dtype: torch.dtype) -> tuple:
        bias = None if self.bias is None else self.bias.to(bias_dtype)
        return (self.weight, self.scales, self.biases, self.global_scale, bias, self.fmt_name, self.g)


def check(emu, ex: Experts, x: torch.Tensor, ids: torch.Tensor, expect_variant: int | None = None) -> torch.Tensor:
    """marlin_emu.moe_gemm against marlin.moe_gemm within the arithmetic's bound; returns the output."""
    k = x.shape[-1]
    args = ex.args(x.dtype)
    ref = torch.ops.marlin.moe_gemm(x, ids, *args)
    out = emu.moe_gemm(x, ids, *args)
    assert out.dtype == x.dtype and out.shape == ref.shape == (*x.shape[:-1], ex.weight.shape[1])
    m = x.numel() // k
    variant = emu._moe_gemm_plan(m, ex.weight.shape[0])[0]
    if expect_variant is not None:
        assert variant == expect_variant
    u = UNIT[x.dtype]
    x2, ids2 = x.reshape(m, k).double(), ids.reshape(m).long()
    terms = torch.einsum("mk,mnk->mn", x2.abs(), ex.mag[ids2])
    rel = 2 * k * 2.0**-24 + (u if variant == GEMM else 0.0)
    lim = rel * terms + 2 * u * ref.reshape(m, -1).double().abs()
    err = (out.reshape(m, -1).double() - ref.reshape(m, -1).double()).abs()
    worst = (err - lim).max().item()
    assert worst <= 0, (
        f"{ex.fmt_name} G={ex.g} M={m} K={k} {x.dtype}: error exceeds the bound by {worst:.3g} "
        f"(max err {err.max().item():.3g}, variant {variant})"
    )
    return out


def rows(m: int, k: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen) / k**0.5).to(dtype)


def ids_for(m: int, e: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, e, (m,), generator=torch.Generator().manual_seed(seed))


# Every format and group on the decode path; on the grouped path every format once (its
# per-channel case where it has one, else its only group): the decoders and group handling are
# gemm.h's, shared with the dense kernels and tested there over every group; what is new here
# is the per-expert slicing of weights, scales (every scale kind) and biases.
GROUPED = [(name, -1 if -1 in fmt.group_sizes else fmt.group_sizes[0]) for name, fmt in F.FORMATS.items()]
PATH_CASES = [(f, g, 8) for f, g in CASES] + [(f, g, 40) for f, g in GROUPED]


@pytest.mark.parametrize(("fmt_name", "g", "m"), PATH_CASES)  # m = 8: moe_gemv (one token, top-8), 40: grouped
def test_every_format_and_group(emu, fmt_name, g, m):
    # E = 8, N = 20 (not a multiple of a gemv threadgroup's 8 rows nor of the 32-wide tile);
    # dtype and bias rotate with the case so every combination of path and dtype appears.
    i = PATH_CASES.index((fmt_name, g, m))
    dtype = (torch.float16, torch.bfloat16, torch.float32)[i % 3]
    ex = Experts(fmt_name, g, 8, 20, k_for(g), with_bias=i % 2 == 0)
    check(emu, ex, rows(m, k_for(g), dtype), ids_for(m, 8), GEMV if m == 8 else GEMM)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [8, 40])
def test_dtypes_with_bias(emu, dtype, m):
    ex = Experts("int4", 32, 8, 20, 64, with_bias=True)
    check(emu, ex, rows(m, 64, dtype), ids_for(m, 8), GEMV if m == 8 else GEMM)


@pytest.mark.parametrize("e", [8, 64, 128])
@pytest.mark.parametrize(("tokens", "top_k"), [(3, 1), (3, 2), (1, 8), (5, 8)])
def test_top_k_and_experts(emu, e, tokens, top_k):
    # 3-D input as a router produces it: x [tokens, top_k, K], ids [tokens, top_k] (distinct
    # experts per token). 3, 6, 8 rows take moe_gemv; 40 rows the grouped path. With E = 64 or
    # 128 most experts receive no row.
    k = 64
    ex = Experts("fp4", 32, e, 12, k, with_bias=False)
    gen = torch.Generator().manual_seed(e + top_k)
    ids = torch.stack([torch.randperm(e, generator=gen)[:top_k] for _ in range(tokens)])
    x = rows(tokens * top_k, k, torch.float16).reshape(tokens, top_k, k)
    check(emu, ex, x, ids, GEMV if tokens * top_k <= 16 else GEMM)


@pytest.mark.parametrize("m", [5, 70])
def test_one_expert_takes_every_row(emu, m):
    # Every other expert receives nothing; at M = 70 the expert's rows span three 32-row tiles
    # (the last one partial).
    ex = Experts("nf3", -1, 64, 20, 100, with_bias=True)
    ids = torch.full((m,), 37, dtype=torch.int32)
    check(emu, ex, rows(m, 100, torch.bfloat16), ids, GEMV if m == 5 else GEMM)


@pytest.mark.parametrize("m", [6, 50])
def test_out_of_range_ids_give_nan_rows(emu, m):
    # Kernels cannot raise: a row whose id lies outside [0, E) comes out NaN; the others are
    # computed as usual (the grouped path puts such rows in their own bucket).
    e = 8
    ex = Experts("int8", 64, e, 20, 128, with_bias=True)
    ids = ids_for(m, e)
    bad = torch.zeros(m, dtype=torch.bool)
    bad[1], bad[m - 2] = True, True
    bad_ids = ids.clone()
    bad_ids[1], bad_ids[m - 2] = e, -3
    x = rows(m, 128, torch.float16)
    out = emu.moe_gemm(x, bad_ids, *ex.args(x.dtype))
    assert out[bad].isnan().all()
    good = check(emu, ex, x, ids)
    assert torch.equal(out[~bad], good[~bad])


def test_empty_and_odd_inputs(emu):
    ex = Experts("int4", 64, 8, 20, 128, with_bias=False)
    x = rows(0, 128, torch.float16)
    out = emu.moe_gemm(x, torch.zeros(0, dtype=torch.int64), *ex.args(x.dtype))
    assert out.shape == (0, 20)
    # a transposed (non-contiguous) x and int64 ids on the grouped path
    xt = rows(128, 33, torch.float16).t()
    check(emu, ex, xt, ids_for(33, 8), GEMM)


def test_bad_arguments_name_the_argument(emu):
    ex = Experts("int4", 64, 8, 20, 128, with_bias=False)
    x = rows(4, 128, torch.float16)
    with pytest.raises(ValueError, match="expert_ids must have x's leading shape"):
        emu.moe_gemm(x, torch.zeros(5, dtype=torch.int64), *ex.args(x.dtype))
    with pytest.raises(ValueError, match="expert_ids must be int32 or int64"):
        emu.moe_gemm(x, torch.zeros(4), *ex.args(x.dtype))
    w, s, b, gs, bias, f, g = ex.args(x.dtype)
    with pytest.raises(ValueError, match="scales must be 3-D"):
        emu.moe_gemm(x, ids_for(4, 8), w, s[:4], b, gs, bias, f, g)
    with pytest.raises(ValueError, match=r"bias must have shape \(8, 20\)"):
        emu.moe_gemm(x, ids_for(4, 8), w, s, b, gs, torch.zeros(20), f, g)


def test_grouped_path_under_every_schedule(emu, thread_order):
    # moe_sort and moe_gemm exchange data through threadgroup memory (bucket starts, tiles):
    # every schedule, so a missing barrier cannot hide.
    ex = Experts("int4", 32, 8, 20, 64, with_bias=True)
    check(emu, ex, rows(45, 64, torch.float16), ids_for(45, 8), GEMM)


def test_emulator_use_routes_moe_gemm():
    ex = Experts("fp4", 32, 8, 12, 64, with_bias=False)
    x, ids = rows(3, 64, torch.float16), ids_for(3, 8)
    with emulator.use() as session:
        assert "moe_gemm" in session.ops
        torch.ops.marlin.moe_gemm(x, ids, *ex.args(x.dtype))
    assert session.calls == ["moe_gemm"]


# ---- moe_route ----------------------------------------------------------------------------------

ROUTES = [  # (mode, renormalize, n_group, topk_group, scaling, with_bias)
    ("softmax_topk", True, 1, 1, 1.0, False),   # Qwen3-MoE (norm_topk_prob), Mixtral
    ("softmax_topk", False, 1, 1, 1.0, False),  # OLMoE, Qwen without norm_topk_prob
    ("topk_softmax", False, 1, 1, 1.0, False),
    ("sigmoid", True, 4, 2, 2.5, True),         # DeepSeek-V3 / GLM-4.x: bias, group-limited
    ("sigmoid", False, 1, 1, 1.0, True),
]


@pytest.mark.parametrize("e", [8, 64, 128])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r[0]}-renorm{int(r[1])}-g{r[2]}")
def test_moe_route(emu, route, top_k, e):
    # logits [2, 35, E] (leading dims; 70 rows: two threadgroups of 64 threads, the second partial);
    # dtype rotates with E. Ids must equal the torch op's exactly (random logits: no ties),
    # weights within fp32 rounding of exp/sigmoid and the sums.
    mode, renorm, n_group, topk_group, scaling, with_bias = route
    if top_k > topk_group * (e // n_group):  # E = 8, top-8: the kept groups must hold 8 experts
        topk_group = n_group
    dtype = {8: torch.float16, 64: torch.bfloat16, 128: torch.float32}[e]
    gen = torch.Generator().manual_seed(e * 10 + top_k)
    logits = (torch.randn(2, 35, e, generator=gen) * 2).to(dtype)
    bias = torch.randn(e, generator=gen) * 0.1 if with_bias else None
    args = (bias, top_k, mode, renorm, n_group, topk_group, scaling)
    ref_w, ref_ids = torch.ops.marlin.moe_route(logits, *args)
    w, ids = emu.moe_route(logits, *args)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and w.shape == ref_w.shape == (2, 35, top_k)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(w, ref_w, rtol=2e-6, atol=1e-7)


def test_moe_route_ties_and_errors(emu):
    w, ids = emu.moe_route(torch.zeros(3, 8), None, 3, "topk_softmax", False, 1, 1, 1.0)
    assert ids.tolist() == [[0, 1, 2]] * 3  # ties go to the lower id, as in the torch op
    torch.testing.assert_close(w, torch.full((3, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 8\]"):
        emu.moe_route(torch.zeros(3, 8), None, 9, "softmax_topk", True, 1, 1, 1.0)
    with pytest.raises(ValueError, match="mode must be one of"):
        emu.moe_route(torch.zeros(3, 8), None, 2, "relu", True, 1, 1, 1.0)
    with pytest.raises(ValueError, match="only used by mode 'sigmoid'"):
        emu.moe_route(torch.zeros(3, 8), torch.zeros(8), 2, "softmax_topk", True, 1, 1, 1.0)


# ---- a whole MoE model ----------------------------------------------------------------------------

@pytest.mark.parametrize("tokens", [5, 12])  # 10 expert rows per projection: moe_gemv; 24: grouped
def test_tiny_qwen3_moe_end_to_end(tokens):
    # A tiny Qwen3-MoE (random weights, transformers' own modules), int8-quantized by
    # quantize_model: its logits under emulator.use() (every marlin op on the emulated Metal
    # kernels: gemm for the linear layers, moe_route for the routers, moe_gemm and silu_mul for
    # the experts) equal the pure-torch kernels' to fp32 rounding, and both stay within
    # quantization error of the dense model.
    from metal_marlin_torch import QuantConfig, quantize_model

    from ..nn.test_experts import tiny_qwen3_moe

    model = tiny_qwen3_moe(hidden=64)
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        dense = model(ids).logits.double()
        quantize_model(model, QuantConfig(format="int8", group_size=32))
        torch_q = model(ids).logits.double()
        with emulator.use() as session:
            emu_q = model(ids).logits.double()
    assert {"gemm", "moe_gemm", "moe_route", "silu_mul"} <= set(session.calls)
    torch.testing.assert_close(emu_q, torch_q, rtol=1e-4, atol=1e-4 * torch_q.abs().max().item())
    sqnr = 10 * torch.log10(dense.pow(2).sum() / (torch_q - dense).pow(2).sum()).item()
    assert sqnr > 30, f"int8 model vs dense: SQNR {sqnr:.1f} dB"
