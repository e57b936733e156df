"""The CUDA fast path of ``marlin.gemm`` (Triton) against the pure-torch op on CPU.

The kernels run on a CUDA device; without one they are skipped ("needs CUDA"), except under
Triton's CPU interpreter (``TRITON_INTERPRET=1`` with Triton installed), which runs the same
kernels on CPU tensors (slow; a development aid). The layout helpers (format table, chunk
plan, interleave repack) are plain torch and always run.

The oracle is ``torch.ops.marlin.gemm`` on CPU (fp32 dequantize then fp32 matmul), so the
tests measure kernel error, not quantization error. Inputs are scaled by 1/sqrt(K).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from metal_marlin_torch import formats as F
from metal_marlin_torch import ops
from metal_marlin_torch.ops import cuda as C
from metal_marlin_torch.ops.cuda import dispatch as D
from metal_marlin_torch.ops.cuda import layout as L

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if INTERPRET else None)
if DEVICE == "cuda" and HAS_TRITON:
    C.register()  # torch.ops.marlin.gemm on CUDA tensors -> the Triton kernels
needs_kernels = pytest.mark.skipif(
    DEVICE is None or not HAS_TRITON,
    reason="needs CUDA" if DEVICE is None else "needs Triton",
)
# relative error ||y - ref|| / ||ref|| by activation dtype: the GEMM path rounds the dequantized
# weight to the activation dtype before the tensor-core product.
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2, torch.float32: 1e-5}
# The interpreter emulates bf16 tl.dot wrongly (numpy has no bf16): it uses fp16 activations.
ACT = torch.float16 if DEVICE == "cpu" else torch.bfloat16
ALL_CASES = [(f, g) for f in sorted(F.FORMATS) for g in F.get_format(f).group_sizes]


def make(fmt: str, group: int, n: int, k: int, bias: bool = True, dtype=ACT):
    """Quantized weight (on CPU), layer bias, and the CPU oracle as a closure."""
    w = torch.randn(n, k)
    weight, scales, biases, gscale = ops.quantize(w, fmt, group)
    b = torch.randn(n).to(dtype) if bias else None
    return weight, scales, biases, gscale, b


def to_dev(*ts):
    return [t.to(DEVICE) if t is not None else None for t in ts]


def oracle(x, weight, scales, biases, gscale, bias, fmt, group):
    return ops.gemm(x.cpu(), weight, scales, biases, gscale,
                    None if bias is None else bias.cpu(), fmt, group)


def fast(x, weight, scales, biases, gscale, bias, fmt, group, **kw):
    """The Triton path: through the registered op on CUDA, directly under the interpreter."""
    args = to_dev(x, weight, scales, biases, gscale, bias)
    if DEVICE == "cuda" and not kw:
        return ops.gemm(*args, fmt, group)
    pw = D.prepare_cuda_weight(*args[1:5], fmt, group, x.shape[-1])
    return D.gemm_prepared(args[0], pw, args[5], **kw)


def assert_close(y, ref, dtype):
    assert y.dtype == ref.dtype and y.shape == ref.shape
    y = y.float().cpu()
    ref = ref.float()
    assert torch.isfinite(y).all()
    err = ((y - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[dtype], f"relative error {err:.3g} >= {TOL[dtype]}"


# ---- kernels (CUDA, or the Triton interpreter) -------------------------------------------------


@needs_kernels
@pytest.mark.parametrize("fmt,group", ALL_CASES)
@pytest.mark.parametrize("m", [1, 3, 33, 130])  # gemv (1 row, 4-row block), gemm, gemm 2 tiles
def test_every_format_and_group(fmt, group, m):
    k, n = 256, 72  # N off every block size
    weight, scales, biases, gscale, bias = make(fmt, group, n, k)
    x = (torch.randn(m, k) / k**0.5).to(ACT)
    y = fast(x, weight, scales, biases, gscale, bias, fmt, group)
    assert_close(y, oracle(x, weight, scales, biases, gscale, bias, fmt, group), ACT)


def test_gemv_refuses_groups_that_split_its_items():
    # Regression: int3 with group 16 (GGUF Q3_K imports) ran the gemv kernel with 0 items per
    # group (an item is a 3-word unit of 32 codes): relative error 0.52 at M = 1. The choice by M
    # now takes the gemm kernel (covered by test_every_format_and_group); asking for gemv fails.
    assert not D.gemv_takes_group(16, 256, 3) and D.gemv_takes_group(32, 256, 3)
    assert D.gemv_takes_group(16, 256, 2) and D.gemv_takes_group(16, 256, 4) and D.gemv_takes_group(16, 256, 8)
    assert D.gemv_takes_group(48, 48, 3)  # per-channel: the whole row is one group
    if DEVICE is None:
        return
    weight, scales, biases, gscale, bias = make("int3", 16, 8, 64)
    with pytest.raises(ValueError, match="whole items"):
        fast(torch.randn(1, 64).to(ACT), weight, scales, biases, gscale, bias, "int3", 16, path="gemv",
             config=D.GemvConfig(1, 8, 4, 1, 1))


@needs_kernels
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("fp4", 32), ("nf4", 64)])
@pytest.mark.parametrize("m", [1, 2, 5, 7, 8, 9, 15, 17, 31, 63, 65, 127, 129, 255, 257, 383, 511,
                               512])
def test_every_m(fmt, group, m):
    k, n = 512, 136
    weight, scales, biases, gscale, bias = make(fmt, group, n, k)
    x = (torch.randn(m, k) / k**0.5).to(ACT)
    y = fast(x, weight, scales, biases, gscale, bias, fmt, group)
    assert_close(y, oracle(x, weight, scales, biases, gscale, bias, fmt, group), ACT)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 6, 40])
def test_dtypes_no_bias(dtype, m):
    if DEVICE == "cpu" and dtype == torch.bfloat16 and m > D.GEMV_MAX_M:
        pytest.skip("Triton interpreter: bf16 tl.dot is not emulated (numpy has no bf16)")
    k, n = 384, 40
    weight, scales, biases, gscale, _ = make("int4", 64, n, k, bias=False)
    x = (torch.randn(m, k) / k**0.5).to(dtype)
    y = fast(x, weight, scales, biases, gscale, None, "int4", 64)
    assert_close(y, oracle(x, weight, scales, biases, gscale, None, "int4", 64), dtype)


@needs_kernels
def test_3d_and_non_contiguous_input():
    k, n = 256, 48
    weight, scales, biases, gscale, bias = make("fp4", 128, n, k)
    x = (torch.randn(2, 5, k) / k**0.5).to(ACT)
    y = fast(x, weight, scales, biases, gscale, bias, "fp4", 128)
    assert y.shape == (2, 5, n)
    assert_close(y, oracle(x, weight, scales, biases, gscale, bias, "fp4", 128), ACT)
    xt = (torch.randn(k, 3) / k**0.5).to(ACT).t()  # [3, K] with stride (1, 3)
    y = fast(xt, weight, scales, biases, gscale, bias, "fp4", 128)
    assert_close(y, oracle(xt, weight, scales, biases, gscale, bias, "fp4", 128), ACT)


@needs_kernels
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("int3", 32), ("nf4", -1), ("fp8_e4m3", 64),
                                       ("int2", 256), ("int5", 64), ("int6", -1)])
@pytest.mark.parametrize("path,config", [
    ("gemv", D.GemvConfig(2, 8, 8, 3, 4)),  # split-K through the workspace
    ("gemv", D.GemvConfig(4, 32, 32, 1, 8)),
    ("gemv", D.GemvConfig(1, 16, 64, 1, 4)),
    ("gemv", D.GemvConfig(1, 16, 128, 1, 8, maxnreg=80)),  # the M = 1 default of int4 / E2M1
    ("gemm", D.GemmConfig(16, 32, 64, 3, 4, 2)),  # split-K
    ("gemm", D.GemmConfig(64, 64, 32, 1, 4, 3)),  # BLOCK_K below the group length
    ("gemm", D.GemmConfig(128, 64, 64, 2, 4, 4)),  # int4: two codes per op, split-K
    ("gemm", D.GemmConfig(64, 64, 64, 1, 4, 3, asm=True)),  # int4 pairs, packed bf16x2 PTX
    ("gemm", D.GemmConfig(32, 64, 64, 1, 4, 3, pairs=False)),  # int4: the generic tile decode
    ("dequant", None),
])
def test_forced_paths_and_configs(fmt, group, path, config):
    if DEVICE == "cpu" and getattr(config, "asm", False) and fmt == "int4":
        pytest.skip("Triton interpreter: no inline PTX")
    k, n, m = 1024, 48, 5
    weight, scales, biases, gscale, bias = make(fmt, group, n, k)
    x = (torch.randn(m, k) / k**0.5).to(ACT)
    y = fast(x, weight, scales, biases, gscale, bias, fmt, group, path=path, config=config)
    assert_close(y, oracle(x, weight, scales, biases, gscale, bias, fmt, group), ACT)


@needs_kernels
@pytest.mark.parametrize("path,split,unsplit", [
    ("gemv", D.GemvConfig(4, 16, 16, 4, 4), D.GemvConfig(4, 16, 16, 1, 4)),
    ("gemm", D.GemmConfig(16, 32, 64, 4, 4, 2), D.GemmConfig(16, 32, 64, 1, 4, 2)),
    ("gemm", D.GemmConfig(16, 64, 64, 4, 4, 2), D.GemmConfig(16, 64, 64, 1, 4, 2)),  # pairs
])
def test_split_k_reduces_in_kernel(path, split, unsplit):
    """Split-K partials are summed by the last program of each tile: the same bits on every
    launch (a fixed summation order, whichever program finishes last), close to the unsplit
    kernel, and the tile counters are back at zero for the next launch."""
    k, n, m = 1024, 96, 7
    weight, scales, biases, gscale, bias = make("int4", 128, n, k)
    x = (torch.randn(m, k) / k**0.5).to(ACT)
    pw = D.prepare_cuda_weight(*to_dev(weight, scales, biases, gscale), "int4", 128, k)
    xd, bd = to_dev(x, bias)
    runs = [D.gemm_prepared(xd, pw, bd, path=path, config=split) for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    assert_close(runs[0].cpu(), D.gemm_prepared(xd, pw, bd, path=path, config=unsplit).cpu(), ACT)
    assert_close(runs[0].cpu(), oracle(x, weight, scales, biases, gscale, bias, "int4", 128), ACT)
    for _, cnt in D._SPLIT_BUFFERS.values():
        assert int(cnt.abs().sum()) == 0


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON,
                    reason="needs CUDA (graph capture)" if not torch.cuda.is_available() else "needs Triton")
@pytest.mark.parametrize("path,config", [("gemv", D.GemvConfig(4, 16, 16, 4, 4)),
                                         ("gemm", D.GemmConfig(16, 64, 64, 4, 4, 2))])
def test_split_k_inside_a_cuda_graph(path, config):
    """A split-K launch captured in a CUDA graph (fresh workspace and counters, zeroed by the
    graph) gives the eager result on every replay, and eager launches after it still do."""
    k, n, m = 1024, 96, 3
    weight, scales, biases, gscale, bias = make("int4", 128, n, k)
    pw = D.prepare_cuda_weight(*to_dev(weight, scales, biases, gscale), "int4", 128, k)
    x = (torch.randn(m, k) / k**0.5).to(ACT).cuda()
    b = bias.cuda()
    eager = D.gemm_prepared(x, pw, b, path=path, config=config)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        D.gemm_prepared(x, pw, b, path=path, config=config)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = D.gemm_prepared(x, pw, b, path=path, config=config)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, eager)
    assert torch.equal(D.gemm_prepared(x, pw, b, path=path, config=config), eager)


@needs_kernels
@pytest.mark.parametrize("fmt", ["int3", "nf3", "int4", "int2", "int5", "int6"])
@pytest.mark.parametrize("m", [1, 20])
def test_per_channel_k_not_word_aligned(fmt, m):
    # K = 100: 3-, 5- and 6-bit rows end inside a word (zero padding bits; the last unit is
    # short: the row has 16 of its 4 units' 20 words at 5 bits, 19 of 24 at 6), 4-bit rows in half a word
    k, n = 100, 24
    weight, scales, biases, gscale, bias = make(fmt, -1, n, k)
    x = (torch.randn(m, k) / k**0.5).to(ACT)
    y = fast(x, weight, scales, biases, gscale, bias, fmt, -1)
    assert_close(y, oracle(x, weight, scales, biases, gscale, bias, fmt, -1), ACT)


@needs_kernels
def test_zero_rows_and_bad_k():
    weight, scales, biases, gscale, bias = make("int4", 32, 16, 64)
    y = fast(torch.randn(0, 64).to(ACT), weight, scales, biases, gscale, bias, "int4", 32)
    assert y.shape == (0, 16)
    pw = D.prepare_cuda_weight(*to_dev(weight, scales, biases, gscale), "int4", 32, 64)
    with pytest.raises(ValueError, match="last dim K=64"):
        D.gemm_prepared(torch.randn(2, 32, device=DEVICE), pw)
    with pytest.raises(ValueError, match="path must be one of"):
        D.gemm_prepared(torch.randn(2, 64, device=DEVICE), pw, path="cublas")


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON,
                    reason="needs CUDA" if not torch.cuda.is_available() else "needs Triton")
def test_registered_for_cuda():
    assert C.register()
    assert ops.active_kernels("cuda")["gemm"] == C.KERNEL_NAME
    assert C.info()["registered"]


# ---- layout helpers (plain torch: run everywhere) -----------------------------------------------


def test_kernel_format_table_matches_format_decode():
    """Every format gets a decode path, and E2M1 / LUT values equal the format's own decode."""
    for name in F.FORMATS:
        kf = L.kernel_format(name)
        fmt = F.get_format(name)
        assert kf.bits == fmt.bits and kf.affine == fmt.has_biases
        if kf.decode == L.DECODE_E2M1:
            assert name in ("fp4", "mxfp4", "nvfp4")
        if kf.decode == L.DECODE_LUT:
            assert len(kf.lut) == 1 << fmt.bits
    for name, values in (("nf4", F.NF4_VALUES), ("nf3", F.NF3_VALUES)):
        assert L.kernel_format(name).lut == tuple(torch.tensor(values).tolist())  # float32
    assert L.kernel_format("fp8_e4m3").decode == L.DECODE_E4M3
    assert L.kernel_format("fp8_e5m2").decode == L.DECODE_E5M2
    assert L.kernel_format("fp4").decode == L.DECODE_E2M1
    # the kernels' E2M1 bit placement (docs/CUDA.md §2): magnitude bits into an fp16's exponent
    # and mantissa, the sign to bit 15, times SCALE_MUL = 2^14, gives the format's value table
    q = torch.arange(16, dtype=torch.int32)
    h = ((q & 7) << 9) | ((q & 8) << 12)
    placed = h.to(torch.int16).view(torch.float16).float() * L.kernel_format("fp4").scale_mul
    table = torch.tensor(F.E2M1_VALUES, dtype=torch.float32)
    assert torch.equal(placed, table) and torch.equal(placed.signbit(), table.signbit())  # -0.0 too


def test_e2m1_fp16_bit_placement():
    """The kernels' E2M1 decode, written in torch: fp16 bits -> value / 2^14 equals the table."""
    q = torch.arange(16, dtype=torch.int32)
    h = ((q & 7) << 9) | ((q & 8) << 12)
    v = h.to(torch.int16).view(torch.float16).float() * L.E2M1_SCALE_MUL
    assert v.tolist() == [float(x) for x in F.E2M1_VALUES]


@pytest.mark.parametrize("dtype,mul", [(torch.float8_e4m3fn, L.E4M3_SCALE_MUL),
                                       (torch.float8_e5m2, 1.0)])
def test_fp8_fp16_bit_placement(dtype, mul):
    """The kernels' float8 decode, written in torch, equals torch's float8 (finite codes)."""
    q = torch.arange(256, dtype=torch.int32)
    if dtype == torch.float8_e4m3fn:
        h = ((q & 0x7F) << 7) | ((q & 0x80) << 8)
    else:
        h = q << 8
    v = h.to(torch.int16).view(torch.float16).float() * mul
    ref = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    finite = torch.isfinite(ref)
    assert torch.equal(v[finite], ref[finite])


def test_int_magic_number_decode():
    q = torch.arange(256, dtype=torch.int32)
    v = (q | 0x4B000000).view(torch.float32) - 8388608.0
    assert torch.equal(v, q.float())


@pytest.mark.parametrize("bits", [2, 4])
def test_unit_field_decode(bits):
    """kernels._unit_field's encoding, written out with torch: every slot of every word gives
    ``2^bits + q`` (high class) or ``4^bits + q`` (low class), and the GEMV's fold
    ``x * f - x'`` (x' = 2^bits * x, or 4^bits * x) returns ``q * x`` exactly; the class is the
    one gemv_kernel sums the activation into."""
    cpw = 32 // bits
    codes = torch.randint(0, 1 << bits, (64, cpw))
    words = F.pack(codes.reshape(1, -1), bits).reshape(64).to(torch.int64) & 0xFFFFFFFF
    if bits == 4:  # pair order: the canonical packing of slots 0, 2, 4, 6, 1, 3, 5, 7
        words = F.pack(codes[:, [0, 2, 4, 6, 1, 3, 5, 7]].reshape(1, -1), 4).reshape(64)
        words = words.to(torch.int64) & 0xFFFFFFFF
    x = torch.randn(64).to(torch.bfloat16).float()
    for c in range(cpw):
        sh0 = (c % 2) * 16 + (c // 2) * 4 if bits == 4 else c * bits
        lo = (sh0 // bits) % 2 == 1
        assert lo == ((c // (bits // 2)) % 2 == 1)  # gemv_kernel's class of slot c
        t = 23 - 2 * bits if lo else 23 - bits
        src = (words << (t - sh0)) if t >= sh0 else (words >> (sh0 - t))
        one = 0x3F800000 + (((2 * bits) if lo else bits) << 23)  # gemv_kernel's ONE_LO / ONE_HI
        f = (((src & (((1 << bits) - 1) << t)) | one) & 0xFFFFFFFF).to(torch.int32)
        f = f.view(torch.float32)
        q = codes[:, c].float()
        expected = 4**bits + q if lo else 2**bits + q
        assert torch.equal(f, expected)
        x_part = x * 4**bits if lo else x * 2**bits
        assert torch.equal(x * f - x_part, q * x)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "fp4"])
def test_kernel_scales(fmt):
    group = F.default_group_size(fmt)
    w = torch.randn(8, 256)
    weight, scales, biases, gscale = ops.quantize(w, fmt, group)
    s = L.kernel_scales(fmt, scales, gscale)
    assert s.dtype.is_floating_point and s.shape == scales.shape
    # dequantized code 2 (E2M1 value 1.0) of every group is the effective scale
    codes = torch.full((8, 256), 2, dtype=torch.int64)
    w_one = ops.dequantize(F.pack(codes, 4), scales, biases, gscale, fmt, group, 256)
    assert torch.equal(w_one[:, ::group], s.float())


@pytest.mark.parametrize("fmt,group,k", [("int4", 32, 256), ("int3", -1, 100), ("nf3", 64, 192),
                                         ("mxfp4", 32, 128), ("int8", -1, 40), ("nf4", -1, 60)])
def test_prepared_weight_is_k_major(fmt, group, k):
    """docs/CUDA.md: word w of feature n moves to [n // 16, w, n % 16] (K-major inside blocks
    of 16 features, the last block padded with zero features); 3-bit rows padded to whole
    3-word units; 4-bit words hold their codes in pair order; scales and biases transposed;
    mxfp4 scales become float32 2^(e - 127)."""
    n = 20
    bits = F.get_format(fmt).bits
    weight, scales, biases, gscale = ops.quantize(torch.randn(n, k), fmt, group)
    pw = D.prepare_cuda_weight(weight, scales, biases, gscale, fmt, group, k)
    kw = weight.shape[1]
    expected = weight
    if bits == 4:  # pair order = the canonical packing of each word's codes 0,2,4,6,1,3,5,7
        codes = F.unpack(weight, 4, 8 * kw).reshape(n, kw, 8)[:, :, [0, 2, 4, 6, 1, 3, 5, 7]]
        expected = F.pack(codes.reshape(n, 8 * kw), 4)
    expected = expected.view(torch.int32)
    assert pw.weight.dtype == torch.int32 and pw.weight.is_contiguous()
    rows = 3 * -(-k // 32) if fmt in ("int3", "nf3") else kw
    assert pw.weight.shape == (2, rows, L.N_BLOCK)
    for f in range(2 * L.N_BLOCK):
        col = pw.weight[f // L.N_BLOCK, :, f % L.N_BLOCK]
        if f < n:
            assert torch.equal(col[:kw], expected[f]) and not col[kw:].any()
        else:
            assert not col.any()  # padding features
    assert torch.equal(L.from_k_major(pw.weight, n, k, bits), weight)
    if fmt == "mxfp4":
        assert torch.equal(pw.scales, torch.exp2(scales.float() - 127).t())
    else:
        assert torch.equal(pw.scales, scales.t())
    assert (pw.biases is None) == (biases is None)
    if biases is not None:
        assert torch.equal(pw.biases, biases.t())
    assert (pw.in_features, pw.out_features) == (k, n)


def test_weight_cache_follows_the_tensors():
    weight, scales, biases, gscale = ops.quantize(torch.randn(8, 64), "int4", 32)
    D.clear_weight_cache()
    a = D.cached_prepare(weight, scales, biases, gscale, "int4", 32, 64)
    assert D.cached_prepare(weight, scales, biases, gscale, "int4", 32, 64) is a
    scales.mul_(2)  # in-place update: new version -> new entry, the stale one dropped
    b = D.cached_prepare(weight, scales, biases, gscale, "int4", 32, 64)
    assert b is not a and torch.equal(b.scales, scales.t())
    assert len(D._CACHE) == 1
    D.set_weight_cache(False)
    try:
        assert D.cached_prepare(weight, scales, biases, gscale, "int4", 32, 64) is not b
        assert not D._CACHE
    finally:
        D.set_weight_cache(True)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 16, 17, 64, 65, 512])
@pytest.mark.parametrize("n,k,bits", [(4096, 4096, 4), (24, 100, 3), (14336, 4096, 8)])
def test_dispatch_tables_are_valid(m, n, k, bits):
    kf = L.kernel_format("int4" if bits == 4 else "int3" if bits == 3 else "int8")
    path = D.choose_path(m, n, 132, kf, True)
    # int4 / E2M1 codes: fused up to FUSED_MAX_M rows (docs/CUDA.md)
    fused = m <= D.FUSED_MAX_M and bits == 4
    assert path == ("gemv" if m <= D.GEMV_MAX_M else "gemm" if m < D.DEQUANT_MIN_M or fused
                    else "dequant")
    for decode in (L.DECODE_INT, L.DECODE_E2M1, L.DECODE_LUT):
        gv = D.default_gemv_config(m, n, k, bits, 132, decode)
        assert gv.block_m in (1, 2, 4) and gv.split_k >= 1  # the GEMV kernel takes 1, 2 or 4 rows
        assert gv.chunk & (gv.chunk - 1) == 0 and gv.block_n & (gv.block_n - 1) == 0
    for gm in (D.default_gemm_config(m, n, k, bits, 132), D.default_pairs_config(m, n, k, 132)):
        assert gm.block_m >= 16 and gm.split_k >= 1  # tl.dot needs 16-row tiles
        assert gm.split_k == 1 or k // gm.split_k >= 2 * gm.block_k  # every split gets K tiles
        assert gm.block_m >= min(m, 128) or m > D.FUSED_MAX_M  # one M tile up to 128 rows


def test_pairs_split_fills_the_sms():
    """K is split where the 64-feature tiles are fewer than the SMs (N = 4096 on 132 SMs), not
    on the wide layers at 128 rows (224 tiles already); splits never exceed K / (2 * block_k)."""
    sms = 132
    for m, n, k in [(16, 4096, 4096), (32, 4096, 14336), (64, 4096, 4096), (128, 4096, 14336),
                    (16, 14336, 4096), (128, 14336, 4096), (16, 4096, 512)]:
        cfg = D.default_pairs_config(m, n, k, sms)
        tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
        assert cfg.split_k == 1 or k // cfg.split_k >= 2 * cfg.block_k
        if tiles < sms and tiles * (k // (2 * cfg.block_k)) >= sms:  # room: the programs fill the SMs
            assert tiles * cfg.split_k >= sms, (m, n, k, cfg)
        if m == 128 and tiles >= sms:
            assert cfg.split_k == 1, (m, n, k, cfg)
    assert D.default_pairs_config(16, 4096, 512, sms).split_k == 512 // (2 * 128)  # the K cap


def test_wide_layers_at_128_rows_run_fused():
    int4, fp4, nf4 = (L.kernel_format(f) for f in ("int4", "fp4", "nf4"))
    # int4 and E2M1: the A-operand kernel up to 128 rows (docs/CUDA.md)
    assert D.choose_path(128, 14336, 132, int4, True, 4096) == "gemm"
    assert D.choose_path(128, 4096, 132, int4, True, 14336) == "gemm"
    assert D.choose_path(128, 4096, 132, int4, True, 4096) == "gemm"  # split-K in the kernel
    assert D.choose_path(128, 4096, 132, L.kernel_format("nf4"), True, 4096) == "dequant"
    assert D.choose_path(128, 14336, 132, int4, False, 4096) == "dequant"  # groups below 64
    assert D.choose_path(129, 14336, 132, int4, True, 4096) == "dequant"
    assert D.choose_path(512, 14336, 132, int4, True, 4096) == "dequant"
    # 3-4 rows on the wide layers: the pairs kernel's 16-row tile; 1-2 rows and N = 4096: GEMV
    assert D.choose_path(4, 14336, 132, int4, True, 4096) == "gemm"
    assert D.choose_path(3, 14336, 132, fp4, True, 4096) == "gemm"
    assert D.choose_path(2, 14336, 132, int4, True, 4096) == "gemv"
    assert D.choose_path(4, 4096, 132, int4, True, 14336) == "gemv"
    assert D.choose_path(4, 14336, 132, nf4, True, 4096) == "gemv"
    assert D.choose_path(100, 14336, 132, fp4, True, 4096) == "gemm"
    assert D.choose_path(128, 4096, 132, fp4, True, 14336) == "gemm"
    assert D.choose_path(128, 4096, 132, fp4, True, 4096) == "gemm"
    assert D.choose_path(128, 14336, 132, fp4, False, 4096) == "dequant"  # groups of 16 / 32
    assert D.choose_path(128, 14336, 132, nf4, True, 4096) == "dequant"  # table decode: slow fused
    assert D.choose_path(64, 4096, 132, nf4, True, 4096) == "dequant"
    assert D.choose_path(32, 4096, 132, nf4, True, 4096) == "gemm"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("asm", [False, True])
@pytest.mark.parametrize("group,k", [(64, 384), (-1, 200)])
def test_int4_pair_kernel(dtype, asm, group, k):
    """The int4 A-operand GEMM in both decode modes, both 16-bit dtypes, grouped and
    per-channel (K = 200: the last word half empty, the last K tile partial)."""
    if DEVICE == "cpu" and (asm or dtype == torch.bfloat16):
        pytest.skip("Triton interpreter: no inline PTX, no bf16 tl.dot")
    n, m = 72, 37
    weight, scales, biases, gscale, bias = make("int4", group, n, k, dtype=dtype)
    x = (torch.randn(m, k) / k**0.5).to(dtype)
    cfg = D.GemmConfig(32, 32, 32 if group == 64 else 64, 1, 4, 3, asm=asm)
    assert D.pairs_eligible(L.kernel_format("int4"), dtype, k if group == -1 else group, k,
                            cfg.block_k)
    y = fast(x, weight, scales, biases, gscale, bias, "int4", group, path="gemm", config=cfg)
    assert_close(y, oracle(x, weight, scales, biases, gscale, bias, "int4", group), dtype)


def test_info_reports_availability():
    info = C.info()
    assert set(info) >= {"available", "reason", "triton", "registered", "mma_gemv"}
    assert set(info["mma_gemv"]) == {"available", "reason", "tma"}
    assert info["mma_gemv"]["available"] == (not info["mma_gemv"]["reason"])
    tma = info["mma_gemv"]["tma"]
    assert set(tma) == {"available", "reason"} and tma["available"] == (not tma["reason"])
    assert info["mma_gemv"]["available"] or not tma["available"]
    if not torch.cuda.is_available() and not INTERPRET:
        assert not info["available"] and info["reason"]
        assert not info["mma_gemv"]["available"] and info["mma_gemv"]["reason"]
        assert C.register() is False
        assert ops.active_kernels("cuda")["gemm"] == "torch"


@needs_kernels
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("m", [5, 16, 31, 64, 100])
@pytest.mark.parametrize("bias", [False, True])
def test_pairs_default_tiles(fmt, m, bias):
    """``gemm_pairs_kernel`` with the default tiles of every M range (N = 192: the last
    128-feature tile partial), affine int4 and E2M1."""
    k, n = 512, 192
    weight, scales, biases, gscale, b = make(fmt, 128, n, k, bias=bias)
    cfg = D.default_pairs_config(m, n, k, 132)
    assert D.pairs_eligible(L.kernel_format(fmt), ACT, 128, k, cfg.block_k)
    x = (torch.randn(m, k) / k**0.5).to(ACT)
    y = fast(x, weight, scales, biases, gscale, b, fmt, 128, path="gemm")
    assert_close(y, oracle(x, weight, scales, biases, gscale, b, fmt, 128), ACT)


@needs_kernels
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
@pytest.mark.parametrize("m", [65, 128])
def test_pairs_wide_layer_tile(fmt, m):
    """The pairs kernel's M = 65-128 wide-layer tile (128 rows x 64 features x 128 inputs over
    all of K), forced on a small layer (N = 192: the last tile partial)."""
    k, n = 512, 192
    weight, scales, biases, gscale, b = make(fmt, 128, n, k)
    x = (torch.randn(m, k) / k**0.5).to(ACT)
    cfg = D.GemmConfig(128, 64, 128, 1, 4, 3)
    y = fast(x, weight, scales, biases, gscale, b, fmt, 128, path="gemm", config=cfg)
    assert_close(y, oracle(x, weight, scales, biases, gscale, b, fmt, 128), ACT)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt,group,k", [("fp4", -1, 200), ("mxfp4", 32, 256), ("nvfp4", 16, 256)])
def test_pairs_kernel_e2m1(dtype, fmt, group, k):
    """The E2M1 decode of ``gemm_pairs_kernel``: per-channel (K = 200, partial last word and
    tile), E8M0 group scales (mxfp4, 32-input tiles), E4M3 scales times a tensor scale
    (nvfp4, 16-input tiles)."""
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton interpreter: no bf16 tl.dot")
    n, m = 72, 37
    weight, scales, biases, gscale, bias = make(fmt, group, n, k, dtype=dtype)
    x = (torch.randn(m, k) / k**0.5).to(dtype)
    block_k = {32: 32, 16: 16}.get(group, 64)
    cfg = D.GemmConfig(32, 64, block_k, 1, 4, 3)
    assert D.pairs_eligible(L.kernel_format(fmt), dtype, k if group == -1 else group, k, block_k)
    y = fast(x, weight, scales, biases, gscale, bias, fmt, group, path="gemm", config=cfg)
    assert_close(y, oracle(x, weight, scales, biases, gscale, bias, fmt, group), dtype)


# ---- the Gluon tensor-core GEMV (2-8 rows of affine int4, docs/CUDA.md §3.2) -----------------

MMA_REASON = ("needs CUDA" if not torch.cuda.is_available() else "needs Triton" if not HAS_TRITON
              else D.mma_gemv_unavailable_reason(torch.device("cuda")))
needs_mma_gemv = pytest.mark.skipif(bool(MMA_REASON), reason=MMA_REASON or "runs")


@needs_mma_gemv
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [2, 3, 5, 8])
@pytest.mark.parametrize("n,k,group,config", [
    (128, 512, 128, None),                           # default: 4 warps, K split over 4 groups
    (192, 1024, 256, None),                          # N % 128 != 0: 2 warps; 2 steps a group
    (256, 640, 128, D.MmaGemvConfig(2, 2, 2)),       # 5 groups in 2 uneven splits, prefetch 2
    (64, 384, 128, D.MmaGemvConfig(2, 1, 1)),        # one program, no split
])  # the registered op takes this path too for 3-8 rows (2 rows only on large layers)
@pytest.mark.parametrize("bias", [False, True])
def test_mma_gemv_matches_oracle(dtype, m, n, k, group, config, bias):
    weight, scales, biases, gscale, b = make("int4", group, n, k, bias=bias, dtype=dtype)
    x = (torch.randn(m, k) / k**0.5).to(dtype)
    y = fast(x, weight, scales, biases, gscale, b, "int4", group, path="mma_gemv", config=config)
    assert_close(y, oracle(x, weight, scales, biases, gscale, b, "int4", group), dtype)
    # the registered op (default dispatch) gives the same result
    y2 = ops.gemm(*to_dev(x, weight, scales, biases, gscale, b), "int4", group)
    assert_close(y2, oracle(x, weight, scales, biases, gscale, b, "int4", group), dtype)


@needs_mma_gemv
def test_mma_gemv_3d_strided_input_and_repeatable_splits():
    k, n, group = 1024, 256, 128
    weight, scales, biases, gscale, b = make("int4", group, n, k)
    x = (torch.randn(2, 3, k) / k**0.5).to(torch.bfloat16)
    y = fast(x, weight, scales, biases, gscale, b, "int4", group, path="mma_gemv")
    assert y.shape == (2, 3, n)
    assert_close(y, oracle(x, weight, scales, biases, gscale, b, "int4", group), torch.bfloat16)
    xt = (torch.randn(k, 4) / k**0.5).to(torch.bfloat16).t()  # [4, K] with stride (1, 4)
    ys = [fast(xt, weight, scales, biases, gscale, b, "int4", group, path="mma_gemv",
               config=D.MmaGemvConfig(4, 8)) for _ in range(3)]
    assert_close(ys[0], oracle(xt, weight, scales, biases, gscale, b, "int4", group),
                 torch.bfloat16)
    assert all(torch.equal(ys[0], yi) for yi in ys[1:])  # split sums in a fixed order


TMA_REASON = MMA_REASON or D.mma_gemv_tma_unavailable_reason(torch.device("cuda"))
needs_tma = pytest.mark.skipif(bool(TMA_REASON), reason=TMA_REASON or "runs")


@needs_tma
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("n,k,group,config", [
    (128, 512, 128, D.MmaGemvConfig(4, 2, stages=4)),   # 2 steps a split, the ring not refilled
    (384, 1024, 256, D.MmaGemvConfig(4, 1, stages=2)),  # 2 steps a group; refilled 3 times
    (256, 640, 128, D.MmaGemvConfig(4, 3, stages=3)),   # 5 steps in 3 uneven splits
    (512, 768, 256, D.MmaGemvConfig(8, 1, stages=4)),   # 8 compute warps
    (256, 1280, 128, None),                             # the default configuration
])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("scale_dtype", ["float32", "activation"])
@pytest.mark.parametrize("fmt", ["int4", "fp4"])
def test_mma_gemv_tma_matches_oracle(dtype, m, n, k, group, config, bias, scale_dtype, fmt):
    """The TMA-fed kernel (sm_90): affine int4 and E2M1 (fp4: every code appears among the
    random weights), splits at any 128-input step, scale groups of 1-2 steps, scales and
    biases stored as float32 or (as checkpoints hold them) in the activation dtype."""
    weight, scales, biases, gscale, b = make(fmt, group, n, k, bias=bias, dtype=dtype)
    if scale_dtype == "activation":
        scales = scales.to(dtype)
        biases = None if biases is None else biases.to(dtype)
    x = (torch.randn(m, k) / k**0.5).to(dtype)
    y = fast(x, weight, scales, biases, gscale, b, fmt, group, path="mma_gemv", config=config)
    assert_close(y, oracle(x, weight, scales, biases, gscale, b, fmt, group), dtype)


@needs_tma
def test_mma_gemv_tma_unaligned_input_and_one_row_dispatch():
    """x whose base is not 16-byte aligned (TMA needs it: copied first), and one row on a layer
    of MMA_GEMV_M1_MIN_WEIGHTS weights through the registered op (the TMA-fed kernel)."""
    k, n, group = 1024, 256, 128
    weight, scales, biases, gscale, b = make("int4", group, n, k)
    big = (torch.randn(3, k + 1) / k**0.5).to(torch.bfloat16)
    x = big[:, 1:]  # 2-byte offset, row stride K + 1
    y = fast(x, weight, scales, biases, gscale, b, "int4", group, path="mma_gemv",
             config=D.MmaGemvConfig(4, 2, stages=2))
    assert_close(y, oracle(x, weight, scales, biases, gscale, b, "int4", group), torch.bfloat16)
    n, k = 8192, 4096  # 2^25 weights
    assert D.choose_path(1, n, 132, L.kernel_format("int4"), True, k, True, True) == "mma_gemv"
    weight, scales, biases, gscale, b = make("int4", group, n, k)
    x = (torch.randn(1, k) / k**0.5).to(torch.bfloat16)
    y = ops.gemm(*to_dev(x, weight, scales, biases, gscale, b), "int4", group)
    assert_close(y, oracle(x, weight, scales, biases, gscale, b, "int4", group), torch.bfloat16)


@needs_kernels
def test_mma_gemv_refuses_what_it_cannot_run():
    x = to_dev(torch.randn(3, 256).to(ACT))[0]
    for fmt, cfg in [("nf4", None), ("fp4", D.MmaGemvConfig(2, 1))]:  # fp4: not register-fed
        w, s, bi, gs, _ = make(fmt, 128, 128, 256)
        pw = D.prepare_cuda_weight(*to_dev(w, s, bi, gs), fmt, 128, 256)
        with pytest.raises((ValueError, RuntimeError), match="mma_gemv"):
            D.gemm_prepared(x, pw, path="mma_gemv", config=cfg)
    w, s, bi, gs, _ = make("int4", 128, 128, 256)
    pw = D.prepare_cuda_weight(*to_dev(w, s, bi, gs), "int4", 128, 256)
    with pytest.raises((ValueError, RuntimeError), match="mma_gemv"):
        D.gemm_prepared(to_dev(torch.randn(9, 256).to(ACT))[0], pw, path="mma_gemv")
    with pytest.raises((ValueError, RuntimeError), match="mma_gemv|MmaGemvConfig"):
        D.gemm_prepared(x, pw, path="mma_gemv", config=D.MmaGemvConfig(2, 1, stages=4))


def test_mma_gemv_dispatch_rules():
    """Which layers and M take the tensor-core GEMV (when it can run): 2-8 rows of affine int4
    with 16-bit activations, groups a multiple of 128 (not per-channel), N a multiple of 64."""
    int4, fp4, nf4, int8 = (L.kernel_format(f) for f in ("int4", "fp4", "nf4", "int8"))
    bf16 = torch.bfloat16
    assert D.mma_gemv_eligible(int4, bf16, 128, 4096, 14336)
    assert D.mma_gemv_eligible(int4, torch.float16, 256, 4096, 4096)
    assert not D.mma_gemv_eligible(int4, torch.float32, 128, 4096, 4096)
    assert not D.mma_gemv_eligible(int4, bf16, 64, 4096, 4096)  # groups of 64
    assert not D.mma_gemv_eligible(int4, bf16, -1, 4096, 4096)  # per-channel
    assert not D.mma_gemv_eligible(int4, bf16, 128, 4096, 4104)  # N % 64 != 0
    assert not D.mma_gemv_eligible(int4, bf16, 128, 4000, 4096)  # K not whole groups
    for kf in (fp4, nf4, int8):
        assert not D.mma_gemv_eligible(kf, bf16, 128, 4096, 4096)
    # the TMA-fed kernel also takes E2M1 with a plain scale (fp4), not tables or 8 bits
    assert D.mma_gemv_eligible(fp4, bf16, 128, 4096, 4096, tma=True)
    assert not D.mma_gemv_eligible(fp4, bf16, 64, 4096, 4096, tma=True)  # mxfp4-like groups
    for kf in (nf4, int8):
        assert not D.mma_gemv_eligible(kf, bf16, 128, 4096, 4096, tma=True)
    for m in range(1, 12):
        path = D.choose_path(m, 14336, 132, int4, True, 4096, mma_gemv=True)
        assert (path == "mma_gemv") == (D.MMA_GEMV_MIN_M <= m <= D.MMA_GEMV_MAX_M), (m, path)
        small = D.choose_path(m, 4096, 132, int4, True, 4096, mma_gemv=True)  # 2 rows: GEMV
        assert (small == "mma_gemv") == (3 <= m <= D.MMA_GEMV_MAX_M), (m, small)
    assert D.choose_path(4, 14336, 132, int4, True, 4096, mma_gemv=False) == "gemm"
    # one row: the TMA-fed kernel on layers of 2^25 weights or more with 8192+ features, else
    # the GEMV
    for n, k in [(14336, 4096), (8192, 4096)]:
        assert D.choose_path(1, n, 132, int4, True, k, mma_gemv=True, tma=True) == "mma_gemv"
        assert D.choose_path(1, n, 132, int4, True, k, mma_gemv=True, tma=False) == "gemv"
        assert D.choose_path(1, n, 132, int4, True, k, mma_gemv=False, tma=False) == "gemv"
    for n, k in [(4096, 4096), (4096, 14336), (8192, 2048)]:
        assert D.choose_path(1, n, 132, int4, True, k, mma_gemv=True, tma=True) == "gemv"
    # the TMA-fed default: 4 compute warps, 4 stages, K split in powers of two while the grid
    # stays within one program an SM, never more splits than 128-input steps
    for n, k in [(4096, 4096), (14336, 4096), (4096, 14336), (384, 512), (4096, 256)]:
        cfg = D.default_mma_gemv_config(n, k, 128, 132, tma=True)
        assert cfg.stages == 4 and cfg.warps == 4
        programs = n // 128 * cfg.split_k
        assert 1 <= cfg.split_k <= k // 128 and (programs <= 132 or cfg.split_k == 1)
        assert programs * 2 > 132 or cfg.split_k * 2 > k // 128, (n, k, cfg)
    assert D.default_mma_gemv_config(14336, 4096, 128, 132, tma=True).split_k == 1
    assert D.default_mma_gemv_config(4096, 14336, 128, 132, tma=True).split_k == 4
    # the TMA-fed kernel needs N % 128 == 0; the register-fed one N % 64 == 0
    assert not D.mma_gemv_eligible(int4, bf16, 128, 4096, 4160, tma=True)
    assert D.mma_gemv_eligible(int4, bf16, 128, 4096, 4160)
    # the default grid: about three programs an SM where the groups allow, never more splits
    # than scale groups, 2 warps when N is not a multiple of 128
    for n, k, group in [(4096, 4096, 128), (14336, 4096, 128), (4096, 14336, 128),
                        (192, 512, 256), (4096, 256, 128)]:
        cfg = D.default_mma_gemv_config(n, k, group, 132)
        assert n % (32 * cfg.warps) == 0 and 1 <= cfg.split_k <= k // group
        programs = n // (32 * cfg.warps) * cfg.split_k
        assert programs >= 3 * 132 or cfg.split_k * 2 > k // group, (n, k, cfg)


@pytest.mark.parametrize("m", [8, 33])
@pytest.mark.parametrize("group,k", [(32, 1024), (64, 1024), (128, 1024), (1024, 1024)])
def test_straddle_gemm_config_fits_shared_memory(m, group, k):
    # int5 g64 / int6 g32 at N = 384, K = 1024, M = 8 asked Triton for 316 KB of shared memory
    # on the H200 with the default 16 x 64 x 128 x 4-stage tile (the K tile spanned groups:
    # a scale and a bias gathered per input, two words per code); the 5/6-bit tile stays
    # inside one group, at most 64 inputs and 3 stages
    cfg = D.straddle_gemm_config(D.default_gemm_config(m, 384, k, 5, 132), group, k)
    assert cfg.block_k <= 64 and (group == k or group % cfg.block_k == 0)
    assert cfg.num_stages <= 3 and 1 <= cfg.split_k and cfg.split_k * cfg.block_k <= k


# ---- the dequantize path in slices (issue 24: prefill) -----------------------------------------


@needs_kernels
@pytest.mark.parametrize("fmt,group", [("int4", 64), ("nf4", 32), ("int3", -1), ("fp8_e4m3", 64)])
@pytest.mark.parametrize("slice_cols", [None, 64, 128])  # whole; 5 slices; 2 slices + a partial one
@pytest.mark.parametrize("nk", [False, True])  # W_hat^T [K, N] or W_hat [N, K]
def test_dequant_path_in_slices(fmt, group, slice_cols, nk):
    # 320 features: the last 128-wide slice holds 64 (its buffer view is narrower than the
    # buffer); a slice's scales start at column n0 of the layer's (a wrong stride or offset
    # would read another feature's scales)
    x = torch.randn(70, 192, dtype=ACT) / 192 ** 0.5
    args = make(fmt, group, 320, 192)
    y = fast(x, *args, fmt, group, path="dequant", slice_cols=slice_cols, dequant_nk=nk)
    assert_close(y, oracle(x, *args, fmt, group), ACT)


def test_dequant_slice_cols(monkeypatch):
    monkeypatch.setattr(D, "DEQUANT_SLICE_BYTES", 0)
    assert D.dequant_slice_cols(14336, 4096, 2) == 14336  # off: the whole W_hat^T at once
    monkeypatch.setattr(D, "DEQUANT_SLICE_BYTES", 16 << 20)
    assert D.dequant_slice_cols(14336, 4096, 2) == 2048  # 16 MB of bf16 at K = 4096
    assert D.dequant_slice_cols(4096, 14336, 2) == 576  # a multiple of 64 under 16 MB
    assert D.dequant_slice_cols(3000, 4096, 2) == 3000  # fewer than two slices: not sliced
    assert D.dequant_slice_cols(4096, 1 << 17, 2) == D.DEQUANT_SLICE_MIN_COLS  # never thinner


def test_dequant_slice_checks_its_arguments():
    pw = D.prepare_cuda_weight(*make("int4", 64, 64, 128)[:4], "int4", 64, 128)
    with pytest.raises(ValueError, match="n0 a multiple of 16"):
        D.dequant_slice(pw, 8, 32, torch.empty(128, 24))
    with pytest.raises(ValueError, match=r"out must be \[128, 32\]"):
        D.dequant_slice(pw, 0, 32, torch.empty(32, 128))
    with pytest.raises(ValueError, match=r"out must be \[32, 128\]"):
        D.dequant_slice(pw, 0, 32, torch.empty(128, 32), nk=True)
