"""GGUF block types whose values are small integers times a per-group scale.

Each reader follows ``gguf.quants.<TYPE>.dequantize_blocks`` line by line but stops before the
multiplication: it returns the integer *levels* of every value and the float32 scale of every
group, with ``gguf``'s value ``== scale * level`` (computed in float32 the same way). The importer
(:func:`metal_marlin_torch.io.gguf_import.convert_exact`) then stores ``level + offset`` as the
code of an affine integer format, scale ``scale * step`` and bias ``-offset * scale``.

==========  ======  =====================================================  ======================
type        group   level                                                  scale
==========  ======  =====================================================  ======================
Q6_K        16      ``q - 32``, ``q`` 6-bit                                ``d * sc`` (int8 sc)
Q3_K        16      ``q`` in [-4, 3]                                       ``d * (sc - 32)``
Q2_K        16      ``q`` in [0, 3] (minus ``dmin * m``: the bias)         ``d * sc``
IQ2_XXS     32      ``grid * sign``, grid in {8, 25, 43}                   ``d * (0.5 + s) / 4``
IQ2_XS      16      same grid (512 entries)                                same
IQ2_S       16      same grid (1024 entries)                               same
IQ3_XXS     32      ``grid * sign``, grid in {4, 12, ..., 52, 62}          ``d * (0.5 + s) / 2``
IQ3_S       32      ``grid * sign``, grid odd in [1, 15]                   ``d * (1 + 2 s)``
IQ1_S       32      ``8 * (grid + delta)``, grid in {-1, 0, 1}, delta ±1/8 ``d * (1 + 2 s) / 8``
IQ1_M       16      same (delta per 8 values)                              same
TQ2_0       256     ``q - 1`` in [-1, 1]                                   ``d``
TQ1_0       256     ``q - 1`` in [-1, 1] (base-3 packing)                  ``d``
==========  ======  =====================================================  ======================

Why the float32 arithmetic stays exact: a scale is an fp16 ``d`` (11 significant bits) times a
small integer or a power of two (at most 7 more bits), and a stored code has at most 8 bits, so
``code * scale`` needs at most 24 bits (float32's mantissa) and ``code * scale + bias`` is the
exact value ``level * scale``, which float32 holds, so the sum is exact too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256


@dataclass
class Levels:
    """Integer levels and per-group scales of ``n_blocks`` super-blocks.

    Attributes:
        levels: ``int32 [n_blocks, QK_K]`` in ``gguf``'s value order.
        scales: ``float32 [n_blocks, QK_K // group]``.
        group: values per scale.
        bias: ``float32 [n_blocks, QK_K // group]`` added after the scaling (Q2_K's
            ``-dmin * m``), or None.
    """

    levels: np.ndarray
    scales: np.ndarray
    group: int
    bias: np.ndarray | None = None


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _split(blocks: np.ndarray, *sizes: int) -> list[np.ndarray]:
    return np.hsplit(blocks, list(np.cumsum(sizes)))


def q6_k(blocks: np.ndarray) -> Levels:
    n = blocks.shape[0]
    ql, qh, scales, d = _split(blocks, QK_K // 2, QK_K // 4, QK_K // 16)
    scale = _f16(d) * scales.view(np.int8).astype(np.float32)
    ql = ql.reshape((n, -1, 1, 64)) >> np.array([0, 4], dtype=np.uint8).reshape((1, 1, 2, 1))
    ql = (ql & np.uint8(0x0F)).reshape((n, -1, 32))
    qh = qh.reshape((n, -1, 1, 32)) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape((1, 1, 4, 1))
    qh = (qh & np.uint8(0x03)).reshape((n, -1, 32))
    q = (ql | (qh << np.uint8(4))).astype(np.int32) - 32
    return Levels(q.reshape(n, QK_K), scale, 16)


def q3_k(blocks: np.ndarray) -> Levels:
    n = blocks.shape[0]
    hmask, qs, scales, d = _split(blocks, QK_K // 8, QK_K // 4, 12)
    lscales, hscales = np.hsplit(scales, [8])
    lscales = (lscales.reshape((n, 1, 8)) >> np.array([0, 4], dtype=np.uint8).reshape((1, 2, 1))).reshape((n, 16))
    hscales = (hscales.reshape((n, 1, 4)) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape((1, 4, 1))).reshape((n, 16))
    sc = ((lscales & np.uint8(0x0F)) | ((hscales & np.uint8(0x03)) << np.uint8(4))).astype(np.int32) - 32
    scale = _f16(d) * sc.astype(np.float32)
    ql = qs.reshape((n, -1, 1, 32)) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape((1, 1, 4, 1))
    qh = hmask.reshape(n, -1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape((1, 1, 8, 1))
    ql = ql.reshape((n, 16, 16)) & np.uint8(3)
    qh = (qh.reshape((n, 16, 16)) & np.uint8(1)) ^ np.uint8(1)  # high bit set: no -4 offset
    q = ql.astype(np.int32) - (qh.astype(np.int32) << 2)
    return Levels(q.reshape(n, QK_K), scale, 16)


def q2_k(blocks: np.ndarray) -> Levels:
    n = blocks.shape[0]
    scales, qs, d, dmin = _split(blocks, QK_K // 16, QK_K // 4, 2)
    scale = _f16(d) * (scales & 0xF).astype(np.float32)
    bias = -(_f16(dmin) * (scales >> 4).astype(np.float32))
    q = (qs.reshape((n, -1, 1, 32)) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape((1, 1, 4, 1))) & np.uint8(3)
    return Levels(q.reshape(n, QK_K).astype(np.int32), scale, 16, bias)


def _grid(cls: type) -> np.ndarray:
    """``cls``'s value grid ``[entries, width]`` as integers (gguf keeps it as float32)."""
    cls.init_grid()
    return cls.grid.reshape(cls.grid_shape).astype(np.int32)


def _bit_signs(bits: np.ndarray) -> np.ndarray:
    """Bytes ``[..., m]`` -> ``[..., m * 8]`` of +1 (bit clear) / -1 (bit set), bit 0 first."""
    b = (bits[..., None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)
    return np.where(b == 0, 1, -1).astype(np.int32).reshape(*bits.shape[:-1], -1)


def _ksigns(index: np.ndarray) -> np.ndarray:
    """7-bit sign indices -> 8 signs each (llama.cpp's ksigns table: the 8th bit is the parity)."""
    from gguf.quants import IQ2_XXS  # noqa: PLC0415

    table = np.frombuffer(IQ2_XXS.ksigns, dtype=np.uint8)
    return _bit_signs(table[index.astype(np.int64)][..., None])


def iq2_xxs(blocks: np.ndarray) -> Levels:
    from gguf.quants import IQ2_XXS  # noqa: PLC0415

    n = blocks.shape[0]
    d, qs = np.hsplit(blocks, [2])
    qs = np.ascontiguousarray(qs).view(np.uint32).reshape(n, -1, 2)  # 8 groups of 32
    scale = _f16(d) * (np.float32(0.5) + (qs[..., 1] >> 28).astype(np.float32)) * np.float32(0.25)
    sign_idx = (qs[..., 1].reshape(n, -1, 1) >> np.array([0, 7, 14, 21], dtype=np.uint32)) & np.uint32(0x7F)
    signs = _ksigns(sign_idx)  # [n, 8, 4, 8]
    idx = np.ascontiguousarray(qs[..., 0]).view(np.uint8).reshape(n, -1, 4)
    grid = _grid(IQ2_XXS)[idx.astype(np.int64)]  # [n, 8, 4, 8]
    return Levels((grid * signs).reshape(n, QK_K), scale, 32)


def iq2_xs(blocks: np.ndarray) -> Levels:
    from gguf.quants import IQ2_XS  # noqa: PLC0415

    n = blocks.shape[0]
    d, qs, scales = _split(blocks, 2, 2 * QK_K // 8)
    qs = np.ascontiguousarray(qs).view(np.uint16)
    sc = ((scales.reshape((n, -1, 1)) >> np.array([0, 4], dtype=np.uint8)) & 0x0F).reshape((n, -1))
    scale = _f16(d) * (np.float32(0.5) + sc) * np.float32(0.25)
    signs = _ksigns(qs >> 9)  # [n, 32, 8]
    grid = _grid(IQ2_XS)[(qs & np.uint16(511)).astype(np.int64)]
    return Levels((grid * signs).reshape(n, QK_K), scale, 16)


def iq2_s(blocks: np.ndarray) -> Levels:
    from gguf.quants import IQ2_S  # noqa: PLC0415

    n = blocks.shape[0]
    d, qs, signs, qh, scales = _split(blocks, 2, QK_K // 8, QK_K // 8, QK_K // 32)
    sc = ((scales.reshape((n, -1, 1)) >> np.array([0, 4], dtype=np.uint8)) & 0x0F).reshape((n, -1))
    scale = _f16(d) * (np.float32(0.5) + sc) * np.float32(0.25)
    qh = qh.reshape((n, -1, 1)) >> np.array([0, 2, 4, 6], dtype=np.uint8)
    idx = qs.astype(np.int64) | ((qh & 0x03).astype(np.int64) << 8).reshape((n, -1))
    grid = _grid(IQ2_S)[idx].reshape(n, QK_K)
    return Levels(grid * _bit_signs(signs), scale, 16)


def iq3_xxs(blocks: np.ndarray) -> Levels:
    from gguf.quants import IQ3_XXS  # noqa: PLC0415

    n = blocks.shape[0]
    d, qs, scales = _split(blocks, 2, QK_K // 4)
    scales = np.ascontiguousarray(scales).view(np.uint32)
    scale = _f16(d) * (np.float32(0.5) + (scales >> 28).astype(np.float32)) * np.float32(0.5)
    sign_idx = (scales.reshape((n, -1, 1)) >> np.array([0, 7, 14, 21], dtype=np.uint32)) & np.uint32(0x7F)
    signs = _ksigns(sign_idx)  # [n, 8, 4, 8]
    grid = _grid(IQ3_XXS)[qs.astype(np.int64)].reshape(n, QK_K)
    return Levels(grid * signs.reshape(n, QK_K), scale, 32)


def iq3_s(blocks: np.ndarray) -> Levels:
    from gguf.quants import IQ3_S  # noqa: PLC0415

    n = blocks.shape[0]
    d, qs, qh, signs, scales = _split(blocks, 2, QK_K // 4, QK_K // 32, QK_K // 8)
    sc = ((scales.reshape((n, -1, 1)) >> np.array([0, 4], dtype=np.uint8)) & 0x0F).reshape((n, -1))
    scale = _f16(d) * (1 + 2 * sc)
    qh = ((qh.reshape((n, -1, 1)) >> np.arange(8, dtype=np.uint8)) & 0x01).astype(np.int64).reshape((n, -1))
    idx = qs.astype(np.int64) | (qh << 8)
    grid = _grid(IQ3_S)[idx].reshape(n, QK_K)
    return Levels(grid * _bit_signs(signs), scale.astype(np.float32), 32)


def iq1_s(blocks: np.ndarray) -> Levels:
    from gguf.quants import IQ1_S  # noqa: PLC0415

    n = blocks.shape[0]
    d, qs, qh = _split(blocks, 2, QK_K // 8)
    qh = np.ascontiguousarray(qh).view(np.uint16)  # one per 32 values
    # gguf: d * (2 s + 1) * (grid + delta) with delta = ±1/8; here scale d (2 s + 1) / 8 (exact,
    # a power of two) and level 8 grid ± 1
    scale = _f16(d) * (2 * ((qh >> 12) & 7) + 1).astype(np.float32) * np.float32(0.125)
    delta = np.where((qh & np.uint16(0x8000)) == 0, 1, -1).astype(np.int32)
    qh4 = qh.reshape((n, -1, 1)) >> np.array([0, 3, 6, 9], dtype=np.uint16)
    idx = qs.astype(np.int64) | ((qh4 & 7).astype(np.int64) << 8).reshape((n, -1))
    grid = _grid(IQ1_S)[idx].reshape(n, -1, 32)
    return Levels((8 * grid + delta[..., None]).reshape(n, QK_K), scale, 32)


def iq1_m(blocks: np.ndarray) -> Levels:
    from gguf.quants import IQ1_M  # noqa: PLC0415

    n = blocks.shape[0]
    qs, qh, scales = _split(blocks, QK_K // 8, QK_K // 16)
    scales = np.ascontiguousarray(scales).view(np.uint16)
    d = (scales.reshape((n, 4)) & np.uint16(0xF000)) >> np.array([12, 8, 4, 0], dtype=np.uint16)
    d = (d[..., 0] | d[..., 1] | d[..., 2] | d[..., 3]).view(np.float16).astype(np.float32).reshape((n, 1))
    sc = ((scales.reshape(n, -1, 1) >> np.array([0, 3, 6, 9], dtype=np.uint16)) & 0x07).reshape((n, -1))
    scale = d * (2 * sc + 1).astype(np.float32) * np.float32(0.125)  # per 16 values
    qh = qh.reshape((n, -1, 1)) >> np.array([0, 4], dtype=np.uint8)
    idx = qs.astype(np.int64) | ((qh & 0x07).astype(np.int64) << 8).reshape((n, -1))
    delta = np.where(qh & 0x08 == 0, 1, -1).astype(np.int32).reshape((n, -1))  # per 8 values
    grid = _grid(IQ1_M)[idx]  # [n, 32, 8]
    return Levels((8 * grid + delta[..., None]).reshape(n, QK_K), scale, 16)


def tq2_0(blocks: np.ndarray) -> Levels:
    n = blocks.shape[0]
    qs, d = np.hsplit(blocks, [QK_K // 4])
    q = (qs.reshape((n, -1, 1, 32)) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape((1, 1, 4, 1))) & 0x03
    return Levels(q.reshape(n, QK_K).astype(np.int32) - 1, _f16(d), QK_K)


def tq1_0(blocks: np.ndarray) -> Levels:
    n = blocks.shape[0]
    qs, qh, d = _split(blocks, (QK_K - 4 * QK_K // 64) // 5, QK_K // 64)
    qs0, qs1 = qs[..., :32], qs[..., 32:]
    pow3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8).reshape((1, 1, 5, 1))  # uint8 wrap-around, as gguf
    qs0 = (qs0.reshape((n, -1, 1, 32)) * pow3).reshape((n, -1))
    qs1 = (qs1.reshape((n, -1, 1, 16)) * pow3).reshape((n, -1))
    qh = (qh.reshape((n, -1, 1, 4)) * pow3[:, :, :4]).reshape((n, -1))
    q = np.concatenate([qs0, qs1, qh], axis=-1)
    q = ((q.astype(np.uint16) * 3) >> 8).astype(np.int32) - 1
    return Levels(q, _f16(d), QK_K)


# type -> (reader, block bytes, stored format, offset added to a level, level step)
READERS = {
    "Q6_K": (q6_k, 210, "int8", 32, 1),
    "Q3_K": (q3_k, 110, "int3", 4, 1),
    "Q2_K": (q2_k, 84, "int2", 0, 1),
    "IQ2_XXS": (iq2_xxs, 66, "int8", 128, 1),
    "IQ2_XS": (iq2_xs, 74, "int8", 128, 1),
    "IQ2_S": (iq2_s, 82, "int8", 128, 1),
    "IQ3_XXS": (iq3_xxs, 98, "int8", 128, 1),
    "IQ3_S": (iq3_s, 110, "int4", 15, 2),  # odd levels -15..15: code (level + 15) / 2
    "IQ1_S": (iq1_s, 50, "int8", 128, 1),
    "IQ1_M": (iq1_m, 56, "int8", 128, 1),
    "TQ2_0": (tq2_0, 66, "int2", 1, 1),
    "TQ1_0": (tq1_0, 54, "int2", 1, 1),
}
