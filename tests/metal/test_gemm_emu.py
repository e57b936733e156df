"""marlin_emu.gemm (host code + Metal kernels, emulated) against the pure-torch
metal_marlin_torch.ops.reference.gemm (not torch.ops.marlin.gemm: on CPU that is our C++ kernel,
and the oracle must be independent of every kernel of ours).

The kernels sum in another order than the torch op and the prefill kernel rounds dequantized
weights to the activation type before the simdgroup MMA, so results are not bitwise equal.
Each output is instead held to an error bound derived from the arithmetic (see `bound`):
fp32 accumulation error of both sides, the weight rounding of the gemm path, and the final
rounding to the activation type. A wrong scale, group, code or edge element breaks it by
orders of magnitude.

Which kernel a shape reaches is asked from the host dispatcher itself (`_gemm_plan`), so the
tests can assert that every variant (gemv, gemv_rows, gemm, gemm + split-K) is exercised.
The emulator runs every GPU thread as a CPU fiber: shapes are small and the full format x
group x dtype grid runs only at M = 1 (gemv) and M = 9 (gemm).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from metal_marlin_torch import emulator
from metal_marlin_torch import formats as F
from metal_marlin_torch.ops import reference

from .conftest import needs_emulator

pytestmark = needs_emulator

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Unit roundoff of each activation type (half an ulp of 1.0).
UNIT = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
GEMV, GEMV_ROWS, GEMM = 0, 1, 2  # variant codes of _gemm_plan (csrc/ops/gemm.cpp)
CASES = [(name, g) for name, fmt in F.FORMATS.items() for g in fmt.group_sizes]


def k_for(g: int) -> int:
    """Two groups of G, or for per-channel a K that is not a multiple of the 32-code chunk."""
    return 2 * g if g > 0 else 100


def make_layer(fmt_name: str, g: int, n: int, k: int, seed: int = 0) -> F.QuantizedTensor:
    """RTN-quantized random weights (real codes, scales and biases of every format)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    return F.quantize(w, fmt_name, g, torch.float16)


def magnitude(qt: F.QuantizedTensor, k: int) -> torch.Tensor:
    """|s*q| + |b| per weight (= |W| for codebook formats): the size of the terms the kernels
    add, which bounds their rounding errors even where s*q and b cancel."""
    w = reference.dequantize(qt.weight, qt.scales, qt.biases, qt.global_scale, qt.format,
                                    qt.group_size, k, torch.float32).double()
    if qt.biases is None:
        return w.abs()
    g = k if qt.group_size == -1 else qt.group_size
    b = qt.biases.double().repeat_interleave(g, dim=1)
    return (w - b).abs() + b.abs()


def bound(x: torch.Tensor, qt: F.QuantizedTensor, ref: torch.Tensor, weights_rounded: bool) -> torch.Tensor:
    """Largest |kernel - reference| the arithmetic allows, per output.

    Both sides accumulate K products in fp32 (each within K * 2^-24 of sum |x| |w|); the gemm
    path also rounds each dequantized weight to the activation type (UNIT[dtype] * |w|); both
    round the result to the activation type (UNIT[dtype] * |y| each).
    """
    k = x.shape[-1]
    u = UNIT[x.dtype]
    terms = x.reshape(-1, k).double().abs() @ magnitude(qt, k).T
    rel = 2 * k * 2.0**-24 + (u if weights_rounded else 0.0)
    return (rel * terms + 2 * u * ref.reshape(terms.shape).double().abs()).reshape(ref.shape)


def run_case(emu, fmt_name: str, g: int, m: int, n: int, k: int, dtype: torch.dtype, with_bias: bool,
             x: torch.Tensor | None = None) -> int:
    """One marlin_emu.gemm call checked against marlin.gemm; returns the variant used."""
    qt = make_layer(fmt_name, g, n, k)
    gen = torch.Generator().manual_seed(1)
    if x is None:
        x = (torch.randn(m, k, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    args = (qt.weight, qt.scales, qt.biases, qt.global_scale, bias, fmt_name, g)
    ref = reference.gemm(x, *args)
    out = emu.gemm(x, *args)
    assert out.dtype == dtype and out.shape == ref.shape
    variant = emu._gemm_plan(x.numel() // k, n, k)[0]
    err = (out.double() - ref.double()).abs()
    lim = bound(x, qt, ref, weights_rounded=variant == GEMM)
    worst = (err - lim).max().item()
    assert worst <= 0, (
        f"{fmt_name} G={g} M={m} N={n} K={k} {dtype} bias={with_bias}: error exceeds the bound by "
        f"{worst:.3g} (max err {err.max().item():.3g})"
    )
    return variant


@pytest.mark.parametrize("m", [1, 9])  # gemv, gemm
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("fmt_name", "g"), CASES)
def test_every_format_group_and_dtype(emu, fmt_name, g, dtype, m):
    # N = 20: not a multiple of the 8 outputs of a gemv threadgroup nor of the 32-wide tile.
    # Layer bias on the gemm path here; test_m_sweep covers both paths with and without it.
    variant = run_case(emu, fmt_name, g, m, 20, k_for(g), dtype, with_bias=m == 9)
    assert variant == (GEMV if m == 1 else GEMM)


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 9, 17, 64, 100, 257])
@pytest.mark.parametrize(
    ("fmt_name", "g", "n", "dtype"),
    [
        ("fp4", 32, 40, torch.float16),        # E2M1 bit trick, 4 words per chunk (vector loads)
        ("int4", 64, 33, torch.bfloat16),      # affine: factored s*sum(xq) + b*sum(x) in gemv
        ("int3", -1, 17, torch.float16),       # K = 100: short last chunk, straddling codes
        ("nvfp4", 16, 9, torch.float32),       # two groups per chunk, E4M3 scales, global scale
    ],
)
def test_m_sweep(emu, fmt_name, g, n, dtype, m, with_bias):
    variant = run_case(emu, fmt_name, g, m, n, k_for(g), dtype, with_bias)
    assert variant == (GEMV if m == 1 else GEMV_ROWS if m <= 8 else GEMM)


@pytest.mark.parametrize("m", [1, 3, 9, 33])  # gemv, gemv_rows, gemm, gemm over 2 x 2 tiles
@pytest.mark.parametrize(("g", "k"), [(32, 96), (-1, 100), (-1, 37)])
@pytest.mark.parametrize("fmt_name", ["int5", "int6"])
def test_int5_int6_odd_sizes(emu, fmt_name, g, k, m):
    # 5- and 6-bit pieces span two words (formats/decode.h Decode8Wide, gemm.h PieceLoad<5/6>):
    # 5-bit pieces start at any byte, 6-bit at even bytes; K = 37 ends inside a piece and inside
    # a word, K = 100 inside a 32-code chunk; N = 45 is off the gemv and gemm tiles.
    variant = run_case(emu, fmt_name, g, m, 45, k, torch.float16, with_bias=m % 2 == 1)
    assert variant == (GEMV if m == 1 else GEMV_ROWS if m <= 8 else GEMM)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("fmt_name", "g", "m", "n", "k"),
    [
        ("int4", 128, 17, 40, 1024),    # 2 x 2 tiles, K = 1024: split in two
        ("fp8_e4m3", 32, 9, 8, 2048),   # one tile: split in four
        ("nf3", -1, 33, 24, 1100),      # per-channel K not a multiple of the split or the tile
        ("int5", 64, 12, 20, 1024),     # 5-bit pieces across split boundaries
    ],
)
def test_split_k(emu, fmt_name, g, m, n, k, dtype):
    _, per, splits, lanes = emu._gemm_plan(m, n, k)
    assert lanes == 0  # gemm: no gemv lane split
    assert splits > 1 and per % 32 == 0 and (splits - 1) * per < k <= splits * per
    run_case(emu, fmt_name, g, m, n, k, dtype, with_bias=True)


@pytest.mark.parametrize("m", [1, 5])  # gemv, gemv_rows
@pytest.mark.parametrize(
    ("fmt_name", "g", "k"),
    [
        ("int4", 128, 2304),     # 72 chunks: lanes take 2 or 3 chunks each (the K loop wraps)
        ("nf3", -1, 1100),       # 35 chunks, the last one short (12 codes, straddling words)
        ("fp8_e5m2", 64, 2112),  # 8 words per chunk: two vector loads
    ],
)
def test_long_k_decode(emu, fmt_name, g, k, m):
    run_case(emu, fmt_name, g, m, 12, k, torch.float16, with_bias=True)


@pytest.mark.parametrize("m", [1, 5])  # gemv, gemv_rows
@pytest.mark.parametrize(
    ("fmt_name", "g", "n", "k", "lanes"),
    [
        ("fp4", 32, 20, 512, 32),     # 64 pieces: one row spans the simdgroup, two steps
        ("int4", -1, 37, 100, 16),    # 13 pieces: two rows side by side, 3 lanes past K
        ("fp8_e4m3", -1, 70, 20, 4),  # 3 pieces, 8-bit: the last piece runs past the row's words
        ("nf3", -1, 150, 8, 1),       # 1 piece: 32 rows per simdgroup instruction
        ("int2", 64, 45, 192, 32),    # 24 pieces < 32 lanes: 8 idle lanes, not a whole row
    ],
)
def test_gemv_lane_split(emu, fmt_name, g, n, k, lanes, m):
    # gemv / gemv_rows give ceil(K/8) rounded up to a power of two lanes to a weight row and run
    # 32 / lanes rows side by side (shaders/gemm.h, GemvShape); N is never a multiple of the
    # rows a threadgroup covers (2 simdgroups x 4 x 32 / lanes), so the last group is partial.
    assert n % (2 * 4 * 32 // lanes) != 0
    assert emu._gemm_plan(m, n, k)[3] == lanes
    for dtype in (torch.float16, torch.float32):
        run_case(emu, fmt_name, g, m, n, k, dtype, with_bias=True)


@pytest.mark.parametrize("shape", [(2, 3), (2, 9)])  # M = 6 (gemv_rows), 18 (gemm)
def test_leading_batch_dims(emu, shape):
    k, n = 64, 24
    x = (torch.randn(*shape, k) / 8).to(torch.float16)
    run_case(emu, "int4", 32, x.numel() // k, n, k, torch.float16, with_bias=True, x=x)


@pytest.mark.parametrize("m", [1, 5, 12])
def test_non_contiguous_input(emu, m):
    # A transposed view (of every other column, so it is non-contiguous even for M = 1; the
    # host copies it once) and a strided slice of a wider tensor.
    k = 64
    xt = (torch.randn(k, 2 * m) / 8).to(torch.bfloat16)[:, ::2].T
    assert not xt.is_contiguous()
    run_case(emu, "fp4", 32, m, 24, k, torch.bfloat16, with_bias=False, x=xt)
    xs = (torch.randn(m, 2 * k) / 8).to(torch.bfloat16)[:, ::2]
    run_case(emu, "fp4", 32, m, 24, k, torch.bfloat16, with_bias=True, x=xs)


@pytest.mark.parametrize("m", [1, 4, 12])  # gemv, gemv_rows, gemm
def test_storage_offsets(emu, m):
    # Tensors that start inside their storage at an offset that breaks the vector alignment
    # (x by 3 elements, weight by 1 word): the host must fall back to scalar loads, and the
    # Launcher must bind from the storage offset.
    n, k, g = 16, 64, 32
    qt = make_layer("int4", g, n, k)
    words = qt.weight.shape[1]
    w_store = torch.zeros(1 + n * words, dtype=qt.weight.dtype)
    w_store[1:] = qt.weight.reshape(-1)
    weight = w_store[1:].view(n, words)
    x_store = torch.randn(3 + m * k).to(torch.float16)
    x = x_store[3:].view(m, k)
    assert weight.storage_offset() == 1 and x.storage_offset() == 3
    ref = reference.gemm(x, qt.weight, qt.scales, qt.biases, None, None, "int4", g)
    out = emu.gemm(x, weight, qt.scales, qt.biases, None, None, "int4", g)
    lim = bound(x, qt, ref, weights_rounded=m > 8)
    assert ((out.double() - ref.double()).abs() <= lim).all()


@pytest.mark.parametrize("offset", [0, 1, 2])  # words: uint2 pieces aligned, not, aligned again
@pytest.mark.parametrize("m", [1, 4, 12])  # gemv, gemv_rows, gemm
def test_8bit_pieces_at_storage_offsets(emu, m, offset):
    # An 8-bit piece (8 codes, 8 bytes) is one uint2 load only when every row and the binding
    # start 8-byte aligned (GemmArgs.wide_loads); a weight bound one word in must take the
    # two-word path. Rows of 17 words (K = 68, per-channel) are never aligned.
    for k, g in ((64, 32), (68, -1)):
        qt = make_layer("int8", g, 12, k)
        words = qt.weight.shape[1]
        store = torch.zeros(offset + qt.weight.numel(), dtype=qt.weight.dtype)
        store[offset:] = qt.weight.reshape(-1)
        weight = store[offset:].view(-1, words)
        x = (torch.randn(m, k) / k**0.5).to(torch.float16)
        ref = reference.gemm(x, qt.weight, qt.scales, qt.biases, None, None, "int8", g)
        out = emu.gemm(x, weight, qt.scales, qt.biases, None, None, "int8", g)
        lim = bound(x, qt, ref, weights_rounded=m > 8)
        assert ((out.double() - ref.double()).abs() <= lim).all(), (k, g, offset, m)


def test_empty_batch_and_single_output(emu):
    qt = make_layer("int8", 32, 1, 64)
    x = torch.zeros(0, 64, dtype=torch.float16)
    out = emu.gemm(x, qt.weight, qt.scales, qt.biases, None, None, "int8", 32)
    assert out.shape == (0, 1)
    run_case(emu, "int8", 32, 3, 1, 64, torch.float16, with_bias=True)  # N = 1


def test_nan_activation_propagates(emu):
    # A NaN input reaches the outputs of its row only (no masking hides it, no row leaks it).
    qt = make_layer("fp4", 32, 16, 64)
    for m in (1, 4, 12):
        x = torch.randn(m, 64, dtype=torch.float16)
        x[0, 5] = float("nan")
        out = emu.gemm(x, qt.weight, qt.scales, None, None, None, "fp4", 32)
        assert torch.isnan(out[0]).all() and not torch.isnan(out[1:]).any()


def test_dispatch_rule(emu):
    # csrc/ops/gemm.cpp: M = 1 gemv, M <= 8 gemv_rows, else gemm; split-K only for few tiles
    # and long K.
    plan = emu._gemm_plan
    assert [plan(m, 4096, 4096)[0] for m in (1, 2, 8, 9, 512)] == [GEMV, GEMV_ROWS, GEMV_ROWS, GEMM, GEMM]
    assert plan(512, 4096, 4096)[2] == 1          # 2048 tiles: enough parallelism
    assert plan(16, 4096, 4096)[2] == 1           # 128 tiles
    assert plan(16, 256, 14336)[2] > 1            # 8 tiles, long K
    assert plan(16, 256, 512)[2] == 1             # short K is never split


def test_every_gemm_kernel_name_is_instantiated(emu):
    # The names the dispatcher can produce, spelled independently from the Python format table.
    expect = {
        f"marlin_{op}_{name}_{dt}_gs{'K' if g == -1 else g}"
        for op, (name, fmt), dt in itertools.product(
            ("gemv", "gemv_rows", "gemm"), F.FORMATS.items(), ("float16", "bfloat16", "float32")
        )
        for g in fmt.group_sizes
    } | {f"marlin_gemm_reduce_{dt}" for dt in ("float16", "bfloat16", "float32")}
    host = {n for n in emulator.host_kernel_names() if n.startswith(("marlin_gemm", "marlin_gemv"))}
    assert host == expect
    missing = sorted(expect - set(emulator.kernel_names()))
    assert not missing, f"not instantiated: {missing[:10]}"


def test_emulator_use_routes_marlin_gemm(emu):
    qt = make_layer("int4", 32, 8, 64)
    x = torch.randn(3, 64)
    args = (qt.weight, qt.scales, qt.biases, None, None, "int4", 32)
    with emulator.use() as session:
        y = torch.ops.marlin.gemm(x, *args)
    assert session.calls == ["gemm"]
    torch.testing.assert_close(y, emu.gemm(x, *args), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"group_size": 48}, "group_size"),
        ({"x": torch.zeros(2, 100)}, "divisible|words per row"),
        ({"x": torch.zeros(2, 128, dtype=torch.float64)}, "x must be float16, bfloat16 or float32"),
        ({"format": "int7"}, "unknown format"),
        ({"biases": None}, "biases must have shape"),
        ({"bias": torch.zeros(5)}, "bias must have shape"),
    ],
)
def test_bad_arguments_raise(emu, change, match):
    qt = make_layer("int4", 64, 4, 128)
    args = {"x": torch.zeros(2, 128), "weight": qt.weight, "scales": qt.scales, "biases": qt.biases,
            "global_scale": None, "bias": None, "format": "int4", "group_size": 64}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        emu.gemm(*args.values())


# ---------------------------------------------------------------------------------------------
# Data the other tests never produce (issue 17, item 4): scales and biases of different storage
# dtypes, nonzero padding bits, a long-K reduction, and bindings at unaligned storage offsets.

# (scales, biases) storage dtypes: the checkpoint decides each independently (docs/FORMAT.md §3),
# and the host passes one MarlinScaleKind for each (GemmArgs.scale_kind, bias_kind).
MIXED_KINDS = [
    (torch.float16, torch.float32),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.float16),
    (torch.float16, torch.bfloat16),
]


def with_kinds(qt: F.QuantizedTensor, scale_dtype: torch.dtype, bias_dtype: torch.dtype) -> F.QuantizedTensor:
    """qt with its scales and biases stored as the given dtypes (values rounded once; the
    reference uses the same tensors)."""
    biases = None if qt.biases is None else qt.biases.to(bias_dtype)
    return F.QuantizedTensor(qt.weight, qt.scales.to(scale_dtype), biases, qt.global_scale, qt.format,
                             qt.group_size, qt.shape)


def check_against_torch(emu, qt: F.QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None = None,
                        weight: torch.Tensor | None = None) -> int:
    """marlin_emu.gemm(x, qt) within `bound` of marlin.gemm(x, qt); `weight` (default qt.weight)
    is what the kernel is given, e.g. the same codes with other padding bits. Returns the variant."""
    k = x.shape[-1]
    args = (qt.scales, qt.biases, qt.global_scale, bias, qt.format, qt.group_size)
    ref = reference.gemm(x, qt.weight, *args)
    out = emu.gemm(x, qt.weight if weight is None else weight, *args)
    variant = emu._gemm_plan(x.numel() // k, qt.shape[0], k)[0]
    err = (out.double() - ref.double()).abs()
    worst = (err - bound(x, qt, ref, weights_rounded=variant == GEMM)).max().item()
    assert worst <= 0, f"{qt.format} K={k} M={x.numel() // k}: error exceeds the bound by {worst:.3g}"
    return variant


@pytest.mark.parametrize(("scale_dtype", "bias_dtype"), MIXED_KINDS)
@pytest.mark.parametrize(("fmt_name", "g", "m"), [("int4", 32, 1), ("int4", -1, 1), ("int3", -1, 5),
                                                   ("int2", 64, 12), ("int8", 128, 3)])
def test_scales_and_biases_of_different_dtypes(emu, fmt_name, g, m, scale_dtype, bias_dtype):
    # A kernel that read the biases with the scales' storage type would decode fp32 biases as
    # pairs of halves (or read past an fp16 buffer): caught here on every variant, grouped and
    # per-channel (the per-channel gemv applies its row's bias after the reduction, apart).
    k = k_for(g)
    qt = with_kinds(make_layer(fmt_name, g, 12, k, seed=3), scale_dtype, bias_dtype)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(4)) / k**0.5).to(torch.float16)
    check_against_torch(emu, qt, x)


def random_padding(weight: torch.Tensor, k: int, bits: int, seed: int, ones: bool = False) -> torch.Tensor:
    """weight with the bits past code K-1 of every row's last word (the padding that docs/FORMAT.md
    §2 leaves undefined) set at random, or all set (`ones`: for fp8 codes 0xFF decode as NaN)."""
    used = k * bits % 32
    assert used, "K * bits is a multiple of 32: no padding bits"
    gen = torch.Generator().manual_seed(seed)
    w = weight.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    pad_mask = (0xFFFFFFFF << used) & 0xFFFFFFFF
    noise = torch.full((w.shape[0],), pad_mask) if ones else \
        torch.randint(0, 2**32, (w.shape[0],), generator=gen) & pad_mask
    assert bool((noise != 0).all())
    out = w.clone()
    out[:, -1] = (out[:, -1] & ~pad_mask) | noise
    return out.to(torch.uint32)


@pytest.mark.parametrize(
    ("fmt_name", "k", "m", "n"),
    [
        ("int3", 100, 1, 12),         # 300 of 320 bits: 20 padding bits, codes 100-106 straddle
        ("fp4", 100, 4, 12),          # half a word of padding (gemv_rows)
        ("int2", 100, 12, 12),        # gemm, no split
        ("fp8_e4m3", 102, 1, 12),     # gemv: 2 padding bytes = E4M3 NaN codes when all ones
        ("fp8_e5m2", 102, 4, 12),     # gemv_rows: NaN codes past K must not meet the zero x
        ("fp8_e4m3", 102, 12, 12),    # gemm, no split
        ("fp8_e4m3", 1102, 9, 8),     # gemm split-K: the last split ends inside a chunk, at K
        ("nf3", 1100, 33, 24),        # split-K, 3-bit straddling padding
        ("int5", 100, 4, 12),         # gemv_rows: 500 of 512 bits, the last piece's w[1] half padding
        ("int6", 100, 12, 12),        # gemm: 600 of 608 bits
    ],
)
def test_padding_bits_are_ignored(emu, fmt_name, k, m, n):
    # FORMAT.md leaves the bits after code K-1 of a row undefined; kernels and the torch op must
    # both ignore them. fp8 padding is set to all ones (NaN codes), other formats at random.
    fmt = F.get_format(fmt_name)
    qt = make_layer(fmt_name, -1, n, k, seed=5)
    padded = random_padding(qt.weight, k, fmt.bits, seed=6, ones=fmt_name.startswith("fp8"))
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(7)) / k**0.5).to(torch.bfloat16)
    args = (qt.scales, qt.biases, qt.global_scale, None, fmt_name, -1)
    # The oracle's own handling: padding changes nothing, bitwise (unpack keeps codes 0..K-1).
    assert torch.equal(reference.gemm(x, padded, *args), reference.gemm(x, qt.weight, *args))
    assert torch.equal(reference.dequantize(padded, qt.scales, qt.biases, None, fmt_name, -1, k, torch.float32),
                       F.dequantize(qt, torch.float32))
    variant = check_against_torch(emu, qt, x, weight=padded)
    if k > 1024:
        assert emu._gemm_plan(m, n, k)[2] > 1  # the split-K cases really split
    assert variant == (GEMV if m == 1 else GEMV_ROWS if m <= 8 else GEMM)


@pytest.mark.parametrize("dtype", DTYPES)
def test_long_k_reduction_is_fp32(emu, dtype):
    # The longest K the dispatcher runs in one pass on one tile (K >= 1024 with fewer than 64
    # tiles is split; 64 tiles x 32+ steps take minutes in the emulator), with data built so
    # that fp16 accumulation cannot hide: activations are positive over the first half of K and
    # negative over the second, weights positive, so the running sums climb to
    # S = sum_{k < K/2} x w and fall back to a small y.
    #
    # Bound, derived for the gemm kernel: it rounds each dequantized fp32 weight to T once
    # (w_T = T(w), the torch op's fp32 value), multiplies exactly in fp32 (a product of two
    # 11-bit significands fits 24 bits) and adds K products in fp32, so recursive summation
    # gives |acc - y_T| <= gamma_K * sum |x| |w_T|, gamma_K = K u / (1 - K u), u = 2^-24, where
    # y_T = x . w_T exactly (float64 here). The fp32 -> T conversion adds u_T |acc|. Here
    # sum |x||w_T| ~ 2 S, so the bound is ~ K 2^-23 S + u_T |y| ~ 2^-13 S for K = 992.
    # Accumulators of half precision round the running sum to 11 bits after every 8-product
    # MMA step: 124 roundings of ~ulp/4 ~ 2^-12.5 |s| each, about 2^-9.5 S in all, 10x the bound.
    m, n, k, g = 9, 32, 992, 32
    assert emu._gemm_plan(m, n, k)[:3] == [GEMM, k, 1]  # one split over all of K (lanes: gemv only)
    gen = torch.Generator().manual_seed(11)
    qt = F.quantize(torch.rand(n, k, generator=gen), "int4", g, torch.float16)  # w >= 0 (bias = min)
    sign = torch.where(torch.arange(k) < k // 2, 1.0, -1.0)
    x = ((0.5 + 0.5 * torch.rand(m, k, generator=gen)) * sign).to(dtype)
    out = emu.gemm(x, qt.weight, qt.scales, qt.biases, None, None, "int4", g).double()
    w_t = F.dequantize(qt, torch.float32).to(dtype).double()
    y = x.double() @ w_t.T
    terms = x.double().abs() @ w_t.abs().T
    u = 2.0**-24
    gamma = k * u / (1 - k * u)
    lim = gamma * terms + UNIT[dtype] * (y.abs() + gamma * terms) + 1e-30
    s_half = x[:, : k // 2].double() @ w_t[:, : k // 2].T
    assert (s_half > 5 * y.abs()).all()  # the running sums climb far above the result
    assert ((out - y).abs() <= lim).all(), f"max excess {((out - y).abs() - lim).max().item():.3g}"


@pytest.mark.parametrize("m", [1, 4, 12])  # gemv, gemv_rows, gemm
@pytest.mark.parametrize("x_off", [1, 2])
def test_unaligned_bindings_of_every_argument(emu, m, x_off):
    # x starts 1 or 2 fp16 elements (2 or 4 bytes) into its storage with K a multiple of 8: the
    # host must not enable 4-vector loads of x (GemmArgs.x_wide_loads); weight starts 1 word in
    # (no uint4 chunk loads), scales and biases 1 element in (a misaligned binding of each).
    n, k, g = 16, 64, 32
    qt = make_layer("int4", g, n, k, seed=13)

    def at_offset(t: torch.Tensor, off: int) -> torch.Tensor:
        store = torch.zeros(off + t.numel(), dtype=t.dtype)
        store[off:] = t.reshape(-1)
        v = store[off:].view(t.shape)
        assert v.storage_offset() == off and v.is_contiguous()
        return v

    x = at_offset((torch.randn(m, k) / 8).to(torch.float16), x_off)
    moved = F.QuantizedTensor(at_offset(qt.weight, 1), at_offset(qt.scales, 1), at_offset(qt.biases, 1),
                              None, "int4", g, qt.shape)
    ref = reference.gemm(x, qt.weight, qt.scales, qt.biases, None, None, "int4", g)
    out = emu.gemm(x, moved.weight, moved.scales, moved.biases, None, None, "int4", g)
    assert ((out.double() - ref.double()).abs() <= bound(x, qt, ref, weights_rounded=m > 8)).all()


def test_every_gemm_thread_loads_and_decodes_weights(emu):
    # Issue 17: the gemm decoded each weight tile with 32 of its 128 threads (3 of 4 simdgroups
    # idle). Now every thread loads, and so decodes, one weight piece per step. The profiler
    # counts, per barrier interval, the threads that read the 'weight' buffer.
    qt = make_layer("int4", 32, 32, 128)
    x = (torch.randn(64, 128) / 128**0.5).to(torch.float16)
    with emulator.profile() as launches:
        emu.gemm(x, qt.weight, qt.scales, qt.biases, None, None, "int4", 32)
    p = launches[0]
    assert p.kernel.startswith("marlin_gemm_int4_")
    loading = [ph for ph in p.phases if ph["weight_bytes"] > 0]
    assert loading and all(ph["threads_weight"] == ph["thread_slots"] for ph in loading)


def test_gemv_idle_lanes_are_not_counted_active(emu):
    # Per-channel K = 100 is 13 pieces: a 16-lane slot per row leaves lanes 13..15 with nothing
    # to load. They still read the argument block, which must not count as taking part.
    qt = make_layer("int4", -1, 64, 100)
    x = (torch.randn(1, 100) / 10).to(torch.float16)
    with emulator.profile() as launches:
        emu.gemm(x, qt.weight, qt.scales, qt.biases, None, None, "int4", -1)
    (p,) = launches
    assert p.kernel.startswith("marlin_gemv_int4_")
    (ph,) = p.phases  # no barriers in the gemv
    assert ph["threads_active"] == ph["threads_weight"] == ph["thread_slots"] * 13 // 16


def test_split_k_partials_are_summed_in_fp32(emu):
    # gemm_reduce adds the splits' fp32 partials in fp32. Here (float32 activations near 100,
    # weights in [0, 1]) the sums pass 1e5, beyond half's largest finite value (65504): a
    # reduction carried in half overflows to inf. (The error bound of check_against_torch is
    # too loose at this K to see half's rounding alone: it allows K * 2^-24 * sum |x||w|.)
    m, n, k, g = 9, 8, 2048, 32
    plan = emu._gemm_plan(m, n, k)
    assert plan[0] == GEMM and plan[2] > 1  # split-K, then gemm_reduce
    gen = torch.Generator().manual_seed(12)
    qt = F.quantize(torch.rand(n, k, generator=gen), "int4", g, torch.float16)
    x = 90 + 20 * torch.rand(m, k, generator=gen)
    assert reference.gemm(x, qt.weight, qt.scales, qt.biases, None, None, "int4", g).min() > 65504
    check_against_torch(emu, qt, x)
