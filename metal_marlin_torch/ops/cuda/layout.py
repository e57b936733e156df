"""What the CUDA kernels need to know about a weight, in plain Python and torch (no Triton).

* :class:`KernelFormat`: a format's code width, decode path and value table, derived from the
  format table in :mod:`metal_marlin_torch.formats` (the one place formats are defined).
* :func:`kernel_scales`: group scales as a float tensor the kernels multiply by (E8M0 bytes of
  ``mxfp4`` and E4M3 scales times ``global_scale`` of ``nvfp4`` become float32).
* :func:`k_major`: the load-time repack of docs/CUDA.md (``[N, KW]`` -> ``[N / 16, KW, 16]``:
  K-major inside blocks of N_BLOCK features; 4-bit words in :func:`pair_order`).
* :func:`items_per_row` / :func:`items_per_group`: the GEMV kernel's unit of work along K.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from ... import formats as F
from ...formats.base import GroupParams

DECODE_INT = 0  # must match kernels.DECODE_INT
DECODE_E2M1 = 1  # must match kernels.DECODE_E2M1
DECODE_LUT = 2  # must match kernels.DECODE_LUT
DECODE_E4M3 = 3  # must match kernels.DECODE_E4M3
DECODE_E5M2 = 4  # must match kernels.DECODE_E5M2
E2M1_SCALE_MUL = 2.0**14  # kernels decode E2M1 as value / 2^14 (fp16 bit placement)
E4M3_SCALE_MUL = 2.0**8  # kernels decode E4M3 as value / 2^8 (fp16 bit placement)
FLOAT_SCALES = (torch.float16, torch.bfloat16, torch.float32)
N_BLOCK = 16  # features per block of the K-major weight (must match kernels.N_BLOCK)


@dataclass(frozen=True)
class KernelFormat:
    """A weight format as the kernels see it.

    Attributes:
        name: format name.
        bits: code width.
        decode: ``DECODE_INT`` (affine integers), ``DECODE_E2M1`` (the E2M1 family),
            ``DECODE_E4M3`` / ``DECODE_E5M2`` (float8 bytes) or ``DECODE_LUT`` (any other
            format: a table of ``2**bits`` float32 values).
        affine: the format has per-group biases (``w = s * q + b``).
        scale_mul: constant the kernels fold into each scale.
        lut: the ``2**bits`` code values (``DECODE_LUT`` only), else empty.
    """

    name: str
    bits: int
    decode: int
    affine: bool
    scale_mul: float
    lut: tuple[float, ...]


def _is_e2m1(fmt: F.WeightFormat) -> bool:
    """Codes decode (at unit scale) to the E2M1 values: the fp16 bit-placement path applies."""
    if fmt.bits != 4 or fmt.has_biases:
        return False
    return all(float(v) == float(e) for v, e in zip(_code_values(fmt), F.E2M1_VALUES, strict=True))


def _decodes_as(fmt: F.WeightFormat, fp8: torch.dtype) -> bool:
    """Codes decode (at unit scale) to the float8 value of the same byte (NaN codes aside)."""
    if fmt.bits != 8 or fmt.has_biases:
        return False
    ref = torch.arange(256, dtype=torch.uint8).view(fp8).float()
    got = torch.tensor(_code_values(fmt))
    finite = torch.isfinite(ref)
    return bool(torch.equal(got[finite], ref[finite]))


def _unit_params(fmt: F.WeightFormat) -> GroupParams:
    """Group parameters under which a code decodes to its bare value (scale 1)."""
    if fmt.fixed_scale_dtype == torch.uint8:  # E8M0: 127 is 2^0
        scales = torch.full((1, 1), 127, dtype=torch.uint8)
    else:
        scales = torch.ones(1, 1, dtype=fmt.fixed_scale_dtype or torch.float32)
    biases = torch.zeros(1, 1) if fmt.has_biases else None
    global_scale = torch.ones(1) if fmt.has_global_scale else None
    return GroupParams(scales, biases, global_scale)


def _code_values(fmt: F.WeightFormat) -> tuple[float, ...]:
    codes = torch.arange(1 << fmt.bits, dtype=torch.int64).view(1, 1, -1)
    return tuple(fmt.decode(codes, _unit_params(fmt)).reshape(-1).tolist())


@cache
def kernel_format(name: str) -> KernelFormat:
    """The :class:`KernelFormat` of format ``name`` (unknown names raise ``ValueError``)."""
    fmt = F.get_format(name)
    if fmt.bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"CUDA kernels take 2-, 3-, 4-, 5-, 6- or 8-bit formats, {name!r} has "
                         f"{fmt.bits}")
    if fmt.has_biases:
        return KernelFormat(name, fmt.bits, DECODE_INT, True, 1.0, ())
    if _is_e2m1(fmt):
        return KernelFormat(name, fmt.bits, DECODE_E2M1, False, E2M1_SCALE_MUL, ())
    if _decodes_as(fmt, torch.float8_e4m3fn):
        return KernelFormat(name, fmt.bits, DECODE_E4M3, False, E4M3_SCALE_MUL, ())
    if _decodes_as(fmt, torch.float8_e5m2):
        return KernelFormat(name, fmt.bits, DECODE_E5M2, False, 1.0, ())
    return KernelFormat(name, fmt.bits, DECODE_LUT, False, 1.0, _code_values(fmt))


def kernel_scales(
    format: str, scales: torch.Tensor, global_scale: torch.Tensor | None
) -> torch.Tensor:
    """``scales`` as a float tensor ``[N, n_groups]`` holding each group's effective scale.

    Float scales pass through unchanged (the kernels read fp16/bf16/fp32). Other storage
    (E8M0 bytes, E4M3 with a tensor scale) is turned into float32 by the format's own decode:
    the effective scale is the decoded value of a code whose bare value is 1.
    """
    fmt = F.get_format(format)
    if scales.dtype in FLOAT_SCALES and not fmt.has_global_scale:
        return scales
    values = _code_values(fmt)
    one = values.index(1.0)
    params = fmt.params_from_tensors(scales, None, global_scale)
    codes = torch.full((scales.shape[0], scales.shape[1], 1), one, dtype=torch.int64,
                       device=scales.device)
    return fmt.decode(codes, params)[..., 0].float().contiguous()


def straddles(bits: int) -> bool:
    """Codes of ``bits`` cross word boundaries (3, 5, 6 bits): the kernels' item is then the
    *unit* of 32 codes in ``bits`` words (docs/FORMAT.md §2), not one word."""
    return 32 % bits != 0


def items_per_row(k: int, bits: int) -> int:
    """Kernel items of a row: words for 2/4/8 bits, ``bits``-word units of 32 codes for 3, 5
    and 6 bits."""
    return -(-k // 32) if straddles(bits) else F.packed_words(k, bits)


def codes_per_item(bits: int) -> int:
    return 32 if straddles(bits) else 32 // bits


def items_per_group(group: int, k: int, bits: int) -> int:
    """Items of one scale group of ``group`` inputs (the whole row when per-channel)."""
    if group == k:
        return items_per_row(k, bits)
    return group // 32 if straddles(bits) else group * bits // 32


def pair_order(words: torch.Tensor) -> torch.Tensor:
    """4-bit words with their 8 codes re-placed in *pair order*: code ``2j`` at bit ``4j``,
    code ``2j + 1`` at bit ``16 + 4j``, so that ``(w >> 4j) & 0x000F000F`` holds the pair of
    consecutive inputs (2j, 2j + 1) in its two 16-bit halves (what one 32-bit register of an
    MMA A fragment holds; docs/CUDA.md). ``int32`` in, ``int32`` out, same shape."""
    u = words.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(u)
    for j in range(4):
        out |= ((u >> (8 * j)) & 0xF) << (4 * j)
        out |= ((u >> (8 * j + 4)) & 0xF) << (16 + 4 * j)
    return (out - ((out >> 31) << 32)).to(torch.int32)  # back to int32's range, same bits


def canonical_order(words: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pair_order`."""
    u = words.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(u)
    for j in range(4):
        out |= ((u >> (4 * j)) & 0xF) << (8 * j)
        out |= ((u >> (16 + 4 * j)) & 0xF) << (8 * j + 4)
    return (out - ((out >> 31) << 32)).to(torch.int32)


def k_major(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """The K-major repack: canonical ``uint32 [N, KW]`` -> ``int32 [ceil(N / 16), KW', 16]``.

    Features are cut into blocks of N_BLOCK = 16; inside a block the words are K-major (word
    ``w`` of feature ``16 b + j`` at ``[b, w, j]``): 16 consecutive features' same word are
    one 64-byte run, and a block's whole K walk is one contiguous stream. (A plain ``[KW, N]``
    transpose gives a program the same 64-byte runs at a stride of N words: the M = 1 GEMV
    read int4 4096 x 14336 in 23.1 us that way against 17.8 us blocked,
    benchmarks/results/sweep_h100_m1_gemv_blocked.json.) The last block is padded with zero
    features. 4-bit words also have their codes re-placed in :func:`pair_order`. For 3, 5 and
    6 bits the row is padded with zero words to whole units (``KW' = bits * ceil(K / 32)``) so
    the kernels never read past a row.
    """
    w = weight.view(torch.int32)
    n, kw = w.shape
    if straddles(bits):
        kw = bits * -(-kw // bits)
    nb = -(-n // N_BLOCK)
    w = torch.nn.functional.pad(w, (0, kw - w.shape[1], 0, nb * N_BLOCK - n))
    if bits == 4:
        w = pair_order(w)
    return w.reshape(nb, N_BLOCK, kw).transpose(1, 2).contiguous()


def from_k_major(weight_t: torch.Tensor, n: int, k: int, bits: int) -> torch.Tensor:
    """Inverse of :func:`k_major` (for tests and for saving a prepared layer)."""
    nb, kw, _ = weight_t.shape
    w = weight_t.transpose(1, 2).reshape(nb * N_BLOCK, kw)[:n, : F.packed_words(k, bits)]
    if bits == 4:
        w = canonical_order(w)
    return w.contiguous().view(torch.uint32)


def canonical_scales(
    format: str, kernel_scales_t: torch.Tensor, global_scale: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Inverse of :func:`kernel_scales` after its transpose: the kernels' ``[n_groups, N]``
    scales back to the stored ``[N, n_groups]`` in ``dtype``. Float scales are the same values;
    mxfp4's effective scales are powers of two (E8M0 byte = log2 + 127, exact) and nvfp4's are
    an E4M3 value times the tensor scale (divided back and rounded to E4M3: exact, since one
    float32 rounding is far below E4M3's step)."""
    s = kernel_scales_t.t()
    fmt = F.get_format(format)
    if fmt.fixed_scale_dtype == torch.uint8:  # E8M0
        return (torch.log2(s.float()).round() + 127).clamp(0, 254).to(torch.uint8).contiguous()
    if fmt.has_global_scale:
        if global_scale is None:
            raise ValueError(f"canonical_scales: format {format!r} needs its global_scale")
        return (s.float() / global_scale.float()).to(dtype).contiguous()
    return s.to(dtype).contiguous()
