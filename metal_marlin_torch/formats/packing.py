"""Bit-stream packing of quantization codes into ``uint32`` words (docs/FORMAT.md §2).

Row ``n`` is one little-endian bit stream: code ``k`` sits at bits ``[k*bits, (k+1)*bits)``,
bit ``j`` of the stream being bit ``j % 32`` of word ``j // 32``. The same routine serves every
width: the layout repeats every ``P = 32 / gcd(32, bits)`` codes (``P * bits / 32`` words), so a
row is viewed as periods and each code's word index and bit offset inside a period are fixed.
A code that straddles two words (3-bit codes 10 and 21) contributes its low bits to word ``a``
and its high bits to word ``a + 1``. All arithmetic is int64 (torch has no shifts on uint32).
"""

from __future__ import annotations

import sys
from functools import cache
from math import gcd, lcm

import torch

from .tables import device_table

_MASK32 = 0xFFFFFFFF


def packed_words(k: int, bits: int) -> int:
    """Number of uint32 words a row of ``k`` codes of width ``bits`` occupies."""
    return (k * bits + 31) // 32


@cache
def _period(bits: int) -> tuple[int, int, tuple[int, ...], tuple[int, ...]]:
    codes = 32 // gcd(32, bits)
    words = codes * bits // 32
    starts = [j * bits for j in range(codes)]
    return codes, words, tuple(s // 32 for s in starts), tuple(s % 32 for s in starts)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[N, K]`` (each in ``[0, 2**bits)``) into ``uint32 [N, ceil(K*bits/32)]``."""
    _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack: codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise TypeError(f"pack: codes must be an integer tensor, got {codes.dtype}")
    n, k = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"pack: codes must lie in [0, {1 << bits}), got [{int(c.min())}, {int(c.max())}]")
    period, wpp, word_idx, offsets = _period(bits)
    n_periods = -(-k // period)
    c = torch.nn.functional.pad(c, (0, n_periods * period - k)).view(n, n_periods, period)
    off = torch.tensor(offsets, dtype=torch.int64, device=c.device)
    a = torch.tensor(word_idx, dtype=torch.int64, device=c.device)
    lo = (c << off) & _MASK32
    hi = c >> (32 - off)  # bits that spill into the next word (zero unless the code straddles)
    words = torch.zeros(n, n_periods, wpp + 1, dtype=torch.int64, device=c.device)
    words.index_add_(2, a, lo)  # codes never overlap, so adding is OR
    words.index_add_(2, a + 1, hi)
    words = words[:, :, :wpp].reshape(n, n_periods * wpp)[:, : packed_words(k, bits)]
    return words.to(torch.uint32)


def unpack(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint32 [N, W]`` -> ``uint8 [N, k]`` codes."""
    _check_bits(bits)
    if words.dtype not in (torch.uint32, torch.int32):
        raise TypeError(f"unpack: words must be uint32 (or int32 bits), got {words.dtype}")
    if words.dim() != 2:
        raise ValueError(f"unpack: words must be 2-D [N, W], got shape {tuple(words.shape)}")
    n, w = words.shape
    if w != packed_words(k, bits):
        raise ValueError(
            f"unpack: {k} codes of {bits} bits need {packed_words(k, bits)} words per row, got {w}"
        )
    if sys.byteorder == "little":
        return _unpack_bytes(words, bits, k)
    return _unpack_words(words, bits, k)


def _unpack_bytes(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Fast path on little-endian hosts: the word stream is the byte stream.

    ``lcm(bits, 8)`` bits always hold a whole number of bytes (B) and of codes (C): 1 byte per
    8/bits codes when bits divides 8, 3 bytes per 8 codes for 3-bit. Each group of B bytes is
    combined into one integer and the C codes are shifted out of it.
    """
    n = words.shape[0]
    span = lcm(bits, 8)
    n_bytes, n_codes = span // 8, span // bits
    data = words.contiguous().view(torch.uint8)  # [N, 4W], byte j holds stream bits 8j..8j+7
    n_groups = -(-k // n_codes)
    need = n_groups * n_bytes
    if data.shape[1] < need:
        data = torch.nn.functional.pad(data, (0, need - data.shape[1]))
    data = data[:, :need].view(n, n_groups, n_bytes)
    if n_bytes == 1:
        value = data[..., 0]
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=words.device)
    else:
        wide = torch.int32 if span <= 31 else torch.int64
        value = data[..., 0].to(wide)
        for i in range(1, n_bytes):
            value = value | (data[..., i].to(wide) << (8 * i))
        shifts = torch.arange(0, span, bits, dtype=wide, device=words.device)
    codes = (value.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(n, n_groups * n_codes)[:, :k].to(torch.uint8)


def _unpack_words(words: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Portable path: per-period word index and bit offset of every code, int64 arithmetic."""
    n, w = words.shape
    w64 = words.view(torch.int32).to(torch.int64) & _MASK32
    period, wpp, word_idx, offsets = _period(bits)
    n_periods = -(-k // period)
    w64 = torch.nn.functional.pad(w64, (0, n_periods * wpp - w)).view(n, n_periods, wpp)
    w64 = torch.nn.functional.pad(w64, (0, 1))  # a zero word after each period for straddles
    a = device_table(word_idx, torch.int64, words.device)
    off = device_table(offsets, torch.int64, words.device)
    val = (w64[:, :, a] >> off) | (w64[:, :, a + 1] << (32 - off))
    codes = (val & ((1 << bits) - 1)).reshape(n, n_periods * period)[:, :k]
    return codes.to(torch.uint8)
