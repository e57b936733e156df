"""An independent reading of docs/FORMAT.md for tests: plain Python bit streams and the code
tables written out literally. Shares no code with ``metal_marlin_torch.formats``."""

from __future__ import annotations

import numpy as np
import torch

# OCP Microscaling spec, table of FP4 E2M1 values by code (sign bit 3).
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
# bitsandbytes' NF4 table (QLoRA paper, appendix E).
NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
BITS = {"fp4": 4, "mxfp4": 4, "nvfp4": 4, "nf4": 4, "nf3": 3, "int8": 8, "int4": 4, "int3": 3, "int2": 2,
        "fp8_e4m3": 8, "fp8_e5m2": 8, "int5": 5, "int6": 6}


def nf3_table() -> list[float]:
    """NF3 from its recipe (docs/FORMAT.md §4), with the standard library's normal quantiles."""
    from statistics import NormalDist

    nd = NormalDist()
    offset = (1 - 1 / 14 + 1 - 1 / 16) / 2
    pos = [nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 5)[:-1]]
    neg = [-nd.inv_cdf(p) for p in np.linspace(offset, 0.5, 4)[:-1]]
    vals = sorted(pos + [0.0] + neg)
    top = max(abs(v) for v in vals)
    return [v / top for v in vals]


def fp8_value(byte: int, exp_bits: int, man_bits: int) -> float:
    """IEEE-style decoding of an FP8 byte (E4M3 'fn': no Inf, 0x7F/0xFF NaN; E5M2: IEEE)."""
    sign = -1.0 if byte & 0x80 else 1.0
    e = (byte >> man_bits) & ((1 << exp_bits) - 1)
    m = byte & ((1 << man_bits) - 1)
    bias = (1 << (exp_bits - 1)) - 1
    if exp_bits == 4 and e == 15 and m == 7:
        return float("nan")
    if exp_bits == 5 and e == 31:
        return sign * float("inf") if m == 0 else float("nan")
    if e == 0:
        return sign * (m / (1 << man_bits)) * 2.0 ** (1 - bias)
    return sign * (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)


def unpack_row(words: list[int], bits: int, k: int) -> list[int]:
    """Codes of one packed row: one arbitrary-precision integer holds the whole bit stream."""
    stream = 0
    for i, w in enumerate(words):
        stream |= (int(w) & 0xFFFFFFFF) << (32 * i)
    return [(stream >> (j * bits)) & ((1 << bits) - 1) for j in range(k)]


def pack_row(codes: list[int], bits: int) -> list[int]:
    stream = 0
    for j, c in enumerate(codes):
        stream |= int(c) << (j * bits)
    n_words = (len(codes) * bits + 31) // 32
    return [(stream >> (32 * i)) & 0xFFFFFFFF for i in range(n_words)]


def value_of(fmt: str, code: int) -> float:
    if fmt in ("fp4", "mxfp4", "nvfp4"):
        return E2M1[code]
    if fmt == "nf4":
        return NF4[code]
    if fmt == "nf3":
        return nf3_table()[code]
    if fmt == "fp8_e4m3":
        return fp8_value(code, 4, 3)
    if fmt == "fp8_e5m2":
        return fp8_value(code, 5, 2)
    return float(code)  # affine integer formats: the code itself


def dequantize(fmt: str, weight, scales, biases, global_scale, group_size: int, k: int) -> np.ndarray:
    """W_hat [N, K] in float64, element by element from the definitions."""
    weight = weight.view(torch.int32).numpy()
    s = scales.float().numpy() if scales.dtype != torch.uint8 else scales.numpy().astype(np.int64)
    b = biases.float().numpy() if biases is not None else None
    g = k if group_size == -1 else group_size
    n = weight.shape[0]
    out = np.zeros((n, k))
    table = {c: value_of(fmt, c) for c in range(1 << BITS[fmt])}
    for row in range(n):
        codes = unpack_row(list(weight[row]), BITS[fmt], k)
        for col, c in enumerate(codes):
            grp = col // g
            v = table[c]
            if fmt == "mxfp4":
                out[row, col] = v * 2.0 ** (int(s[row, grp]) - 127)
            elif fmt == "nvfp4":
                out[row, col] = v * float(s[row, grp]) * float(global_scale)
            elif fmt.startswith("int"):
                out[row, col] = float(s[row, grp]) * v + float(b[row, grp])
            else:
                out[row, col] = v * float(s[row, grp])
    return out
