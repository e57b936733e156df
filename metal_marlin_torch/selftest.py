"""Self-test: every Metal op against its pure-torch kernel, on sizes that reach every kernel variant.

On a Mac with the Metal extension loaded the ops run on MPS (``torch.ops.marlin.*``: Metal, or the
per-family fallback, which the report says); elsewhere they run through the MSL emulator on CPU
(``torch.ops.marlin_emu.*``: the same kernels and host code). The reference is always the pure-torch
kernel on CPU (the test oracle of tests/metal). ``marlin selftest`` prints a summary and writes the
report as JSON, so a Mac user's bug report is one command.

Comparison: dequantize, fake_quantize, hadamard and the KV-cache quantize/dequantize compute in the
torch op's order and are expected bitwise equal (a tolerance of one unit of the last place is still
allowed on a GPU, whose compiler may contract or flush differently; ``bitwise`` says which);
gemm/gemv and KV attention sum in another order and are held to an error bound derived from the
arithmetic (see :func:`gemm_bound`); the decoder-layer ops (norms, gated activations, RoPE,
attention) to a few units of their dtype's last place.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import formats as F
from ._files import write_atomic

# Unit roundoff of each activation type (half an ulp of 1.0).
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# --quick: one format per decoder kind (E2M1, E8M0 and E4M3 scales, magic-bias int, 3-bit straddle,
# 5-bit pieces over two words, codebook, fp8), fp16 everywhere plus bf16 and fp32 on one format per op.
QUICK_FORMATS = ("fp4", "mxfp4", "nvfp4", "int4", "int3", "int5", "nf3", "fp8_e4m3")
KV_HEADS, KV_CAPACITY = 2, 40  # KV-cache cases: heads, cache positions


@dataclass
class CaseResult:
    """One comparison: which op and kernel family, its parameters, and how it went."""

    op: str
    family: str
    params: dict[str, Any]
    ok: bool
    bitwise: bool | None = None
    max_abs_err: float | None = None
    allowed: str = ""
    error: str | None = None
    seconds: float = 0.0
    kernel: str = "metal"  # or "torch fallback": the family was rejected (or bf16 without bfloat)


@dataclass
class Report:
    """The whole self-test: where it ran, what was compared, the summary."""

    backend: str
    machine: dict[str, str]
    torch: str
    quick: bool
    cases: list[CaseResult] = field(default_factory=list)
    families: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def failed(self) -> list[CaseResult]:
        return [c for c in self.cases if not c.ok]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["summary"] = {"cases": len(self.cases), "passed": len(self.cases) - len(self.failed),
                        "failed": len(self.failed),
                        "ran_fallback": sum(1 for c in self.cases if c.kernel != "metal"),
                        "by_family": {f: sum(1 for c in self.cases if c.family == f)
                                      for f in sorted({c.family for c in self.cases})}}
        return d


def machine() -> dict[str, str]:
    """The machine, in words (for reports and benchmark outputs)."""
    return {"platform": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
            "python": platform.python_version(), "macos": platform.mac_ver()[0]}


# ---- inputs ----------------------------------------------------------------------------------


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_weights(fmt: F.WeightFormat, n: int, k: int, g: int, seed: int) -> tuple:
    """Packed words of random bits (every code occurs, NaN/Inf codes included) and group parameters."""
    gen = _gen(seed)
    weight = torch.randint(-(2**31), 2**31, (n, F.packed_words(k, fmt.bits)), generator=gen,
                           dtype=torch.int64).to(torch.int32)
    groups = k // (g if g > 0 else k)
    if fmt.name == "mxfp4":
        scales = torch.randint(0, 255, (n, groups), generator=gen, dtype=torch.uint8)
    elif fmt.name == "nvfp4":
        scales = (torch.rand(n, groups, generator=gen) * 400).to(torch.float8_e4m3fn)
    else:
        scales = (torch.rand(n, groups, generator=gen) * 2 - 0.5).half()
    biases = torch.randn(n, groups, generator=gen).half() if fmt.has_biases else None
    gscale = torch.rand(1, generator=gen) + 0.01 if fmt.has_global_scale else None
    return weight, scales, biases, gscale


def quantized_layer(fmt_name: str, g: int, n: int, k: int, seed: int) -> F.QuantizedTensor:
    """RTN-quantized random weights: real codes and scales (gemm needs finite weights)."""
    return F.quantize(torch.randn(n, k, generator=_gen(seed)), fmt_name, g, torch.float16)


def gemm_bound(x: torch.Tensor, qt: F.QuantizedTensor, ref: torch.Tensor, k: int) -> torch.Tensor:
    """Largest |kernel - reference| the arithmetic allows, per output: both sides accumulate K
    products in fp32 (K * 2^-24 of sum |x||w| each), the gemm path rounds each dequantized weight to
    the activation type (UNIT * |w|), and both round the result (UNIT * |y| each). The magnitude
    |s*q| + |b| bounds the terms even where s*q and b cancel. Same derivation as
    tests/metal/test_gemm_emu.py."""
    w = torch.ops.marlin_torch.dequantize(qt.weight, qt.scales, qt.biases, qt.global_scale, qt.format,
                                          qt.group_size, k, torch.float32).double()
    if qt.biases is not None:
        gs = k if qt.group_size == -1 else qt.group_size
        b = qt.biases.double().repeat_interleave(gs, dim=1)
        w = (w - b).abs() + b.abs()
    u = UNIT[x.dtype]
    terms = x.reshape(-1, k).double().abs() @ w.abs().T
    return ((2 * k * 2.0**-24 + u) * terms + 2 * u * ref.reshape(terms.shape).double().abs()).reshape(ref.shape)


# ---- cases -----------------------------------------------------------------------------------

Run = Callable[[Any, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


@dataclass
class Case:
    op: str
    family: str
    params: dict[str, Any]
    run: Run  # (ops, device) -> (output, reference, allowed error per element or None = exact)


def _cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def _to(args: tuple, device: torch.device) -> tuple:
    return tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)


def _ref(op: str, *args):
    return getattr(torch.ops.marlin_torch, op)(*args)


def _dequantize_cases(quick: bool) -> Iterator[Case]:
    names = QUICK_FORMATS if quick else tuple(F.FORMATS)
    for i, name in enumerate(names):
        fmt = F.get_format(name)
        groups = fmt.group_sizes if not quick else sorted({fmt.group_sizes[0], fmt.group_sizes[-1]})
        for g in groups:
            dtypes = DTYPES if (not quick or i == 0) else (torch.float16,)
            for dtype in dtypes:
                k = 3 * g if g > 0 else 100  # odd group count; per-channel K not a multiple of 32

                def run(ops, dev, fmt=fmt, g=g, k=k, dtype=dtype):
                    w, s, b, gs = random_weights(fmt, 3, k, g, seed=k)
                    out = ops.dequantize(*_to((w, s, b, gs), dev), fmt.name, g, k, dtype)
                    return out, _ref("dequantize", w, s, b, gs, fmt.name, g, k, dtype), None

                yield Case("dequantize", "dequantize", {"format": name, "group_size": g, "dtype": str(dtype)}, run)


def _gemm_cases(quick: bool) -> Iterator[Case]:
    names = QUICK_FORMATS if quick else tuple(F.FORMATS)
    # M = 1: gemv; 3: gemv_rows; 9: gemm tiles (csrc/ops/gemm.cpp); split-K below.
    for i, name in enumerate(names):
        fmt = F.get_format(name)
        groups = fmt.group_sizes if not quick else (fmt.group_sizes[0],)
        for g in groups:
            for m in (1, 3, 9):
                dtypes = DTYPES if (i == 0 or (not quick and m != 3)) else (torch.float16,)
                for dtype in dtypes:
                    yield _gemm_case(name, g, m, 24, 2 * g if g > 0 else 100, dtype)
    yield _gemm_case("fp4", 32, 9, 16, 2048, torch.float16)  # few tiles, long K: split-K + reduce


def _gemm_case(name: str, g: int, m: int, n: int, k: int, dtype: torch.dtype) -> Case:
    def run(ops, dev):
        qt = quantized_layer(name, g, n, k, seed=m)
        x = (torch.randn(m, k, generator=_gen(1)) / math.sqrt(k)).to(dtype)
        bias = torch.randn(n, generator=_gen(2)).to(dtype)
        args = (x, qt.weight, qt.scales, qt.biases, qt.global_scale, bias, name, g)
        ref = _ref("gemm", *args)
        return ops.gemm(*_to(args, dev)), ref, gemm_bound(x, qt, ref, k) + bias.double().abs() * UNIT[dtype]

    family = "gemv" if m <= 8 else "gemm"
    return Case("gemm", family, {"format": name, "group_size": g, "M": m, "N": n, "K": k, "dtype": str(dtype)}, run)


def _elementwise_cases(quick: bool, fake_quantize_variant: Callable) -> Iterator[Case]:
    for dtype in (DTYPES if not quick else (torch.float16, torch.bfloat16)):
        for block in ((1, 2, 32, 256, 4096) if not quick else (2, 128)):

            def run_h(ops, dev, block=block, dtype=dtype):
                x = torch.randn(3, 2 * block, generator=_gen(block)).to(dtype)
                return ops.hadamard(x.to(dev), block), _ref("hadamard", x, block), None

            yield Case("hadamard", "hadamard", {"block": block, "dtype": str(dtype)}, run_h)
        for variant in ("vec", "block"):
            for bits in ((1, 3, 4, 8) if not quick else (4,)):

                def run_f(ops, dev, variant=variant, bits=bits, dtype=dtype):
                    x = (torch.randn(1001, generator=_gen(bits)) * 0.7).to(dtype)
                    x[::97] = float("nan")
                    return fake_quantize_variant(x.to(dev), bits, variant), _ref("fake_quantize", x, bits), None

                yield Case("fake_quantize", "fake_quantize", {"variant": variant, "bits": bits, "dtype": str(dtype)},
                           run_f)


def _kv_cases(quick: bool) -> Iterator[Case]:
    from .kv.codebook import lloyd_max_codebook  # noqa: PLC0415

    for bits in ((4, 5, 6, 8) if not quick else (4, 8)):
        for d in ((64, 128) if not quick else (64,)):
            h, cap = KV_HEADS, KV_CAPACITY
            cb = lloyd_max_codebook(bits, d)
            last = d // 2 if bits == 4 else d

            def cache(seed, bits=bits, d=d, last=last, h=h, cap=cap):
                gen = _gen(seed)
                packed = torch.randint(0, 256 if bits == 4 else 2**bits, (h, cap, last), generator=gen).to(torch.uint8)
                return packed, 0.5 + torch.rand(h, cap, max(d // 256, 1), generator=gen) * 4

            def run_q(ops, dev, bits=bits, d=d, last=last, cb=cb, h=h, cap=cap):
                x = torch.randn(h, 3, d, generator=_gen(d)).half()
                pos = torch.tensor([0, 7, 39])
                packed, norms = torch.zeros(h, cap, last, dtype=torch.uint8), torch.zeros(h, cap, max(d // 256, 1))
                rp, rn = packed.clone(), norms.clone()
                dp, dn = packed.to(dev), norms.to(dev)
                ops.kv_quantize(*_to((x, pos), dev), dp, dn, cb.to(dev), bits)
                _ref("kv_quantize", x, pos, rp, rn, cb, bits)
                return torch.cat([dp.cpu().flatten().float(), dn.cpu().flatten()]), torch.cat(
                    [rp.flatten().float(), rn.flatten()]), None

            def run_d(ops, dev, cache=cache, bits=bits, cb=cb):
                packed, norms = cache(bits)
                out = ops.kv_dequantize_seq(*_to((packed, norms, cb), dev), 3, 5, bits)
                return out, _ref("kv_dequantize_seq", packed, norms, cb, 3, 5, bits), None

            def run_a(ops, dev, cache=cache, bits=bits, d=d, cb=cb, h=h, cap=cap):
                (kp, kn), (vp, vn) = cache(1), cache(2)
                q = torch.randn(h, 3, d, generator=_gen(3)) / math.sqrt(d) * 4
                ref = _ref("kv_attention", q, kp, kn, vp, vn, cb, 37, bits, 0.7)
                out = ops.kv_attention(*_to((q, kp, kn, vp, vn, cb), dev), 37, bits, 0.7)
                return out, ref, 2e-6 + 2e-5 * ref.double().abs()  # tests/metal/test_kv.py's tolerance

            p = {"bits": bits, "head_dim": d}
            yield Case("kv_quantize", "kv", p, run_q)
            yield Case("kv_dequantize_seq", "kv", p, run_d)
            yield Case("kv_attention", "kv", p, run_a)


def _moe_cases(quick: bool) -> Iterator[Case]:
    """moe_gemm on both paths (6 rows: moe_gemv; 40: moe_sort + grouped moe_gemm) over 4 experts,
    and moe_route in its softmax and group-limited sigmoid modes (issue 21)."""
    e, n = 4, 24
    for name in (QUICK_FORMATS if quick else tuple(F.FORMATS)):
        g = F.get_format(name).group_sizes[0]
        k = 2 * g if g > 0 else 100
        for m in (6, 40):

            def run(ops, dev, name=name, g=g, k=k, m=m):
                layers = [quantized_layer(name, g, n, k, seed=10 + i) for i in range(e)]
                stack = [None if getattr(layers[0], a) is None else
                         torch.stack([getattr(q, a).reshape(getattr(layers[0], a).shape or (1,)) for q in layers])
                         for a in ("weight", "scales", "biases", "global_scale")]
                if stack[3] is not None:
                    stack[3] = stack[3].reshape(e, 1)
                x = (torch.randn(m, k, generator=_gen(1)) / math.sqrt(k)).half()
                ids = torch.randint(0, e, (m,), generator=_gen(m))
                bias = torch.randn(e, n, generator=_gen(2)).half()
                args = (x, ids, *stack, bias, name, g)
                ref = _ref("moe_gemm", *args)
                bound = torch.zeros_like(ref, dtype=torch.float64)
                for i, q in enumerate(layers):  # each row's bound is its expert's
                    rows = ids == i
                    if rows.any():
                        bound[rows] = gemm_bound(x[rows], q, ref[rows], k)
                return ops.moe_gemm(*_to(args, dev)), ref, bound + bias.double().abs().max() * UNIT[torch.float16]

            yield Case("moe_gemm", "moe", {"format": name, "group_size": g, "M": m, "E": e, "N": n, "K": k}, run)
    for mode, n_group, topk_group in (("softmax_topk", 1, 1), ("sigmoid", 4, 2)):

        def run_r(ops, dev, mode=mode, n_group=n_group, topk_group=topk_group):
            logits = torch.randn(70, 64, generator=_gen(5)).half()
            bias = torch.randn(64, generator=_gen(6)) * 0.1 if mode == "sigmoid" else None
            args = (logits, bias, 8, mode, True, n_group, topk_group, 2.5)
            rw, ri = _ref("moe_route", *args)
            w, i = ops.moe_route(*_to(args, dev))
            allowed = torch.cat([(2e-6 * rw.double().abs() + 1e-7).flatten(),
                                 torch.zeros(ri.numel(), dtype=torch.float64)])
            return (torch.cat([w.cpu().flatten().double(), i.cpu().flatten().double()]),
                    torch.cat([rw.flatten().double(), ri.flatten().double()]), allowed)

        yield Case("moe_route", "moe", {"mode": mode, "n_group": n_group, "top_k": 8, "E": 64}, run_r)
def _layer_cases(quick: bool) -> Iterator[Case]:
    """Decoder-layer ops (norms, gated activations, RoPE, attention): they sum in another order
    or call another libm than torch, so each output may differ by about an ulp of its dtype."""
    def near(ref: torch.Tensor) -> torch.Tensor:
        # a few ulps of the dtype, and 1e-5 for float32 (a sum of 300 floats in another order)
        return max(4 * UNIT[ref.dtype], 1e-5) * (ref.double().abs() + 1)

    for dtype in ((torch.float16, torch.float32) if quick else DTYPES):

        def run_rms(ops, dev, dtype=dtype):
            x, r = (torch.randn(3, 300, generator=_gen(s)).to(dtype) for s in (1, 2))
            w = torch.randn(300, generator=_gen(3)).to(dtype)
            ref = _ref("rms_norm", x, w, r, 1e-6)[0]
            return ops.rms_norm(*_to((x, w, r), dev), 1e-6)[0], ref, near(ref)

        def run_ln(ops, dev, dtype=dtype):
            x = (torch.randn(2, 67, generator=_gen(4)) * 3 + 5).to(dtype)
            w, b = (torch.randn(67, generator=_gen(s)).to(dtype) for s in (5, 6))
            ref = _ref("layer_norm", x, w, b, None, 1e-5)[0]
            return ops.layer_norm(*_to((x, w, b), dev), None, 1e-5)[0], ref, near(ref)

        def run_act(ops, dev, dtype=dtype, op="silu_mul"):
            g = (torch.randn(3, 2 * 100, generator=_gen(7)) * 4).to(dtype)  # fused [.., 2I] input
            ref = _ref(op, g, None)
            return getattr(ops, op)(g.to(dev), None), ref, near(ref)

        def run_rope(ops, dev, dtype=dtype):
            q = torch.randn(1, 4, 3, 64, generator=_gen(8)).to(dtype)
            k = torch.randn(1, 2, 3, 64, generator=_gen(9)).to(dtype)
            pos = torch.tensor([[7, 900, 3000]])
            inv = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
            rq, rk = _ref("rope", q, k, pos, inv, 1.0, False)
            oq, ok = ops.rope(*_to((q, k, pos, inv), dev), 1.0, False)
            ref = torch.cat([rq.flatten(), rk.flatten()])
            return torch.cat([oq.flatten(), ok.flatten()]), ref, near(ref)

        def run_attn(ops, dev, dtype=dtype):
            q = torch.randn(1, 4, 3, 64, generator=_gen(10)).to(dtype)
            k, v = (torch.randn(1, 2, 37, 64, generator=_gen(s)).to(dtype) for s in (11, 12))
            ref = _ref("attention", q, k, v, 0.125, True, 0)
            return ops.attention(*_to((q, k, v), dev), 0.125, True, 0), ref, near(ref)

        p = {"dtype": str(dtype)}
        yield Case("rms_norm", "norm", p, run_rms)
        yield Case("layer_norm", "norm", p, run_ln)
        yield Case("silu_mul", "act", p, run_act)
        yield Case("gelu_mul", "act", p, functools.partial(run_act, op="gelu_mul"))
        yield Case("rope", "rope", p, run_rope)
        yield Case("attention", "attention", p, run_attn)

        # the flash prefill kernel (Sq >= 9), the decode split over 600 keys, FP8 and paged K/V
        def run_attn_prefill(ops, dev, dtype=dtype):
            q = torch.randn(1, 2, 20, 64, generator=_gen(13)).to(dtype)
            k, v = (torch.randn(1, 1, 20, 64, generator=_gen(s)).to(dtype) for s in (14, 15))
            ref = _ref("attention", q, k, v, 0.125, True, 0)
            return ops.attention(*_to((q, k, v), dev), 0.125, True, 0), ref, near(ref)

        def run_attn_split(ops, dev, dtype=dtype):
            q = torch.randn(1, 2, 1, 64, generator=_gen(16)).to(dtype)
            k, v = (torch.randn(1, 1, 600, 64, generator=_gen(s)).to(dtype) for s in (17, 18))
            ref = _ref("attention", q, k, v, 0.125, True, 0)
            return ops.attention(*_to((q, k, v), dev), 0.125, True, 0), ref, near(ref)

        def run_attn_fp8(ops, dev, dtype=dtype):
            q = torch.randn(1, 2, 3, 64, generator=_gen(19)).to(dtype)
            kc, vc = (torch.randint(0, 126, (1, 1, 37, 64), generator=_gen(s), dtype=torch.uint8) for s in (20, 21))
            ks, vs = (torch.rand(1, 1, 37, generator=_gen(s)) * 0.01 for s in (22, 23))
            args = (q, kc, ks, vc, vs, 0.125, True, 0)
            ref = _ref("attention_fp8", *args)
            return ops.attention_fp8(*_to(args, dev)), ref, near(ref)

        def run_attn_paged(ops, dev, dtype=dtype):
            q = torch.randn(2, 2, 12, 32, generator=_gen(24)).to(dtype)
            kp, vp = (torch.randn(6, 1, 5, 32, generator=_gen(s)).to(dtype) for s in (25, 26))
            table = torch.tensor([[4, 1, 3], [0, 5, 2]], dtype=torch.int32)
            args = (q, kp, vp, table, 13, 0.125, True, 0)
            ref = _ref("attention_paged", *args)
            return ops.attention_paged(*_to(args, dev)), ref, near(ref)

        yield Case("attention", "attention", {**p, "variant": "prefill"}, run_attn_prefill)
        yield Case("attention", "attention", {**p, "variant": "split decode"}, run_attn_split)
        yield Case("attention_fp8", "attention", p, run_attn_fp8)
        yield Case("attention_paged", "attention", p, run_attn_paged)


def _sample_cases(quick: bool) -> Iterator[Case]:
    """marlin::sample: the kernel's token equals the torch kernel's exactly (integer weights,
    ops/sampling.py), greedy and with every filter on, vocab off the threadgroup size."""
    for dtype in ((torch.float16,) if quick else DTYPES):
        for settings in ((1.0, 0.0, 0, 1.0, 0.0), (1.2, 0.8, 40, 0.9, 0.05)):

            def run(ops, dev, dtype=dtype, settings=settings):
                logits = (torch.randn(3, 1000, generator=_gen(13)) * 3).to(dtype)
                u = torch.rand(3, generator=_gen(14))
                prev = torch.randint(0, 1000, (3, 9), generator=_gen(15))
                ref = _ref("sample", logits, u, prev, *settings)
                return ops.sample(*_to((logits, u, prev), dev), *settings), ref, None

            yield Case("sample", "sample", {"dtype": str(dtype), "temperature": settings[1]}, run)


def cases(quick: bool, fake_quantize_variant: Callable) -> list[Case]:
    """Every case, in family order."""
    return [*_dequantize_cases(quick), *_gemm_cases(quick), *_elementwise_cases(quick, fake_quantize_variant),
            *_kv_cases(quick), *_moe_cases(quick), *_layer_cases(quick), *_sample_cases(quick)]


# ---- running ---------------------------------------------------------------------------------


def compare(out: torch.Tensor, ref: torch.Tensor, allowed: torch.Tensor | None) -> tuple[bool, bool, float, str]:
    """(ok, bitwise, max |out - ref|, the rule). Equal values (infinities included) and NaN where the
    reference has NaN count as no error; a NaN elsewhere is an infinite error."""
    out, ref = _cpu(out), _cpu(ref)
    if out.shape != ref.shape or out.dtype != ref.dtype:
        return False, False, math.inf, f"shape/dtype {tuple(out.shape)} {out.dtype} != {tuple(ref.shape)} {ref.dtype}"
    o, r = out.double(), ref.double()
    same = (o == r) | (o.isnan() & r.isnan())
    diff = torch.where(same, torch.zeros_like(o), (o - r).abs().nan_to_num(nan=math.inf))
    err = float(diff.max()) if diff.numel() else 0.0
    bitwise = err == 0.0
    if allowed is None:
        # exact ops: bitwise, or within one unit of the last place on a GPU
        tol = UNIT.get(out.dtype, 2.0**-24) * 2 * r.abs().nan_to_num(nan=0.0, posinf=0.0)
        return bool((diff <= tol).all()), bitwise, err, "bitwise (1 ulp allowed)"
    return bool((diff <= allowed.double().cpu()).all()), bitwise, err, "arithmetic error bound"


def run(quick: bool = True, device: str | None = None, on_case: Callable[[CaseResult], None] | None = None) -> Report:
    """Run every case on MPS (Metal extension loaded) or through the emulator; returns the report."""
    from . import _native  # noqa: PLC0415

    t0 = time.perf_counter()
    use_mps = device == "mps" or (device is None and _native.STATE["loaded"])
    if use_mps:
        if not _native.STATE["loaded"]:
            raise ValueError(f"selftest: device 'mps' needs the Metal extension, which is {_native.STATE['error']}")
        ops, dev, name = torch.ops.marlin, torch.device("mps"), "metal (mps)"
        variant = torch.ops.marlin_metal.fake_quantize_variant
    else:
        from . import emulator  # noqa: PLC0415

        lib = emulator.load()  # raises EmulatorError (with what to install) without clang 19
        ops, dev, name = lib.ops, torch.device("cpu"), "metal emulator (cpu)"
        variant = lib.ops.fake_quantize_variant
    report = Report(name, machine(), torch.__version__, quick)
    for case in cases(quick, variant):
        c0 = time.perf_counter()
        res = CaseResult(case.op, case.family, case.params, ok=False)
        try:
            out, ref, allowed = case.run(ops, dev)
            res.ok, res.bitwise, res.max_abs_err, res.allowed = compare(out, ref, allowed)
        except Exception as e:  # noqa: BLE001 (a failing case is reported, the others still run)
            res.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        res.seconds = round(time.perf_counter() - c0, 4)
        report.cases.append(res)
        if on_case:
            on_case(res)
    # The family states after the run say which cases ran the pure-torch fallback instead of Metal
    # (a pass there verifies the fallback, not the kernel).
    report.families = _native.family_status() if use_mps else _native.parse_family_rows(list(ops._families()))
    for c in report.cases:
        st = report.families.get(c.family, {})
        if st.get("state") == "rejected":
            c.kernel = "torch fallback"
        elif st.get("bf16") == "fallback" and c.params.get("dtype") == str(torch.bfloat16):
            c.kernel = "torch fallback (no bfloat)"
    report.seconds = round(time.perf_counter() - t0, 2)
    return report


def write(report: Report, path: str | Path) -> Path:
    """Write the report as JSON (atomically)."""
    path = Path(path)
    write_atomic(path, json.dumps(report.to_json(), indent=1, default=str) + "\n")
    return path
