"""marlin_emu.dequantize (host code + Metal kernel, emulated) against the pure-torch op.

The reference is the pure-torch metal_marlin_torch.ops.reference.dequantize; the kernel computes in the same order, so
results must be bitwise equal (NaN where the reference has NaN). Packed words are random
bits, so every code of every format occurs, including the fp8 NaN/Inf codes.
"""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch import formats as F
from metal_marlin_torch.ops import reference

from .conftest import needs_emulator

pytestmark = needs_emulator

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CASES = [(name, g) for name, fmt in F.FORMATS.items() for g in fmt.group_sizes]


def random_tensors(fmt: F.WeightFormat, n: int, k: int, g: int, scale_dtype: torch.dtype):
    """Packed words of random bits and random group parameters of the right dtypes."""
    words = F.packed_words(k, fmt.bits)
    weight = torch.randint(-(2**31), 2**31, (n, words), dtype=torch.int64).to(torch.int32)
    groups = k // g
    if fmt.name == "mxfp4":
        scales = torch.randint(0, 255, (n, groups), dtype=torch.uint8)
    elif fmt.name == "nvfp4":
        scales = (torch.rand(n, groups) * 400).to(torch.float8_e4m3fn)
    else:
        scales = (torch.rand(n, groups) * 2 - 0.5).to(scale_dtype)
    biases = (torch.randn(n, groups)).to(scale_dtype) if fmt.has_biases else None
    gscale = torch.rand(1) + 0.01 if fmt.has_global_scale else None
    return weight, scales, biases, gscale


def check(emu, fmt_name, g, n, k, dtype, scale_dtype=torch.float16):
    fmt = F.get_format(fmt_name)
    weight, scales, biases, gscale = random_tensors(fmt, n, k, g if g > 0 else k, scale_dtype)
    ref = reference.dequantize(weight, scales, biases, gscale, fmt_name, g, k, dtype)
    out = emu.dequantize(weight, scales, biases, gscale, fmt_name, g, k, dtype)
    assert out.dtype == dtype and out.shape == (n, k)
    torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("fmt_name", "g"), CASES)
def test_every_format_group_and_dtype(emu, fmt_name, g, dtype):
    # N = 3 rows; K = 3 groups (odd), or for per-channel a K that is not a multiple of 32
    # (the last word of each row is partly padding, for 3 bits it straddles)
    k = 3 * g if g > 0 else 100
    check(emu, fmt_name, g, 3, k, dtype)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt_name", ["fp4", "int4", "int3", "nf3", "fp8_e5m2"])
def test_scale_dtypes(emu, fmt_name, scale_dtype):
    check(emu, fmt_name, 64, 2, 128, torch.float32, scale_dtype)


@pytest.mark.parametrize("fmt_name", ["nvfp4", "int2", "nf4"])
def test_nvfp4_with_float_scales_and_odd_shapes(emu, fmt_name):
    g = F.get_format(fmt_name).group_sizes[0]
    for n, k in [(1, g), (7, 5 * g)]:  # one row; an odd number of rows and groups
        check(emu, fmt_name, g, n, k, torch.float16)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (1, 7), (5, 33), (2, 320)])
@pytest.mark.parametrize("fmt_name", ["int3", "fp4", "int8", "int5", "int6"])
def test_per_channel_sizes(emu, fmt_name, n, k):
    check(emu, fmt_name, -1, n, k, torch.bfloat16)


@pytest.mark.parametrize("fmt_name", ["fp4", "int4", "nf3", "fp8_e4m3"])
def test_large(emu, fmt_name, thread_order):
    check(emu, fmt_name, 128, 96, 1024, torch.float16)


@pytest.mark.parametrize("fmt_name", sorted(F.FORMATS))
def test_quantized_weights_roundtrip(emu, fmt_name):
    # Real RTN output (zeros group, extreme magnitudes) through both paths.
    fmt = F.get_format(fmt_name)
    g = 32 if 32 in fmt.group_sizes else fmt.group_sizes[0]
    w = torch.randn(4, 4 * g)
    w[0, :g] = 0.0                      # an all-zero group: scale 0, exact zeros
    w[1, g:2 * g] *= 1e4                # large
    w[2, 2 * g:3 * g] *= 1e-4           # tiny
    qt = F.quantize(w, fmt_name, g, torch.float32)
    for dtype in DTYPES:
        ref = F.dequantize(qt, dtype)
        out = emu.dequantize(qt.weight, qt.scales, qt.biases, qt.global_scale, fmt_name, g, 4 * g, dtype)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert torch.all(out[0, :g] == 0)


def test_every_e2m1_code_matches_the_table(emu):
    # FORMAT.md §4: magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}; bit 3 is the sign. Row = codes 0..15
    # repeated twice (32 codes = 4 words), scale 1.
    table = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    expect = torch.tensor(table + [-v for v in table], dtype=torch.float32).repeat(2)
    codes = torch.arange(16).repeat(2)
    words = torch.zeros(4, dtype=torch.int64)
    for i, c in enumerate(codes.tolist()):
        words[i // 8] |= c << (4 * (i % 8))
    weight = words.to(torch.int32).view(1, 4)
    out = emu.dequantize(weight, torch.ones(1, 1, dtype=torch.float16), None, None, "fp4", 32, 32, torch.float32)
    assert out[0].tolist() == expect.tolist()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"group_size": 48}, "group_size"),
        ({"in_features": 100}, "words per row|divisible"),
        ({"dtype": torch.float64}, "dtype must be float16, bfloat16 or float32"),
        ({"format": "int7"}, "unknown format"),
        ({"drop_biases": True}, "biases must have shape"),
    ],
)
def test_bad_arguments_raise(emu, kwargs, match):
    w = torch.randn(2, 128)
    qt = F.quantize(w, "int4", 64)
    args = {"format": "int4", "group_size": 64, "in_features": 128, "dtype": torch.float16}
    args.update({k: v for k, v in kwargs.items() if k != "drop_biases"})
    biases = None if kwargs.get("drop_biases") else qt.biases
    with pytest.raises(ValueError, match=match):
        emu.dequantize(qt.weight, qt.scales, biases, None, args["format"], args["group_size"],
                       args["in_features"], args["dtype"])


@pytest.mark.parametrize(("scale_dtype", "bias_dtype"), [
    (torch.float16, torch.float32), (torch.float32, torch.float16),
    (torch.bfloat16, torch.float16), (torch.float16, torch.bfloat16),
])
@pytest.mark.parametrize(("fmt_name", "g"), [("int4", 32), ("int3", -1), ("int8", 64)])
def test_scales_and_biases_of_different_dtypes(emu, fmt_name, g, scale_dtype, bias_dtype):
    # Scales and biases are stored independently (docs/FORMAT.md §3): a kernel or host that read
    # the biases with the scales' type would decode fp32 biases as pairs of halves or read past
    # an fp16 buffer.
    fmt = F.get_format(fmt_name)
    k = 100 if g == -1 else 4 * g
    weight, scales, biases, _ = random_tensors(fmt, 3, k, k if g == -1 else g, torch.float32)
    scales, biases = scales.to(scale_dtype), (biases * 3).to(bias_dtype)
    ref = reference.dequantize(weight, scales, biases, None, fmt_name, g, k, torch.float32)
    out = emu.dequantize(weight, scales, biases, None, fmt_name, g, k, torch.float32)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("offset", [1, 3])
def test_bindings_at_storage_offsets(emu, offset):
    # weight, scales and biases viewed from inside bigger storages (byte offsets 4*offset and
    # 2*offset: not 16-byte aligned), as slices of a checkpoint's flat buffer would be.
    fmt = F.get_format("int4")
    weight, scales, biases, _ = random_tensors(fmt, 4, 128, 32, torch.float16)

    def inside(t: torch.Tensor) -> torch.Tensor:
        store = torch.zeros(offset + t.numel() + 1, dtype=t.dtype)
        store[offset:offset + t.numel()] = t.reshape(-1)
        return store[offset:offset + t.numel()].view(t.shape)

    moved = [inside(t) for t in (weight, scales, biases)]
    assert all(t.storage_offset() == offset for t in moved)
    ref = reference.dequantize(weight, scales, biases, None, "int4", 32, 128, torch.float16)
    out = emu.dequantize(*moved, None, "int4", 32, 128, torch.float16)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
