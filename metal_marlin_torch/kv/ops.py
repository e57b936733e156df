"""Typed wrappers of the ``torch.ops.marlin.kv_*`` ops and rotated-domain attention.

Layouts and the exact quantization rule: :mod:`metal_marlin_torch.ops.kv` and docs/KV_CACHE.md.
"""

from __future__ import annotations

import math

import torch

from .. import ops  # noqa: F401  (registers torch.ops.marlin.*)


def kv_quantize(x: torch.Tensor, positions: torch.Tensor, packed: torch.Tensor, norms: torch.Tensor,
                codebook: torch.Tensor, bits: int) -> None:
    """Rotate, normalize and quantize ``x [H, n, D]`` into ``packed``/``norms`` at ``positions``
    (int64 ``[n]``, distinct, already wrapped into ``[0, capacity)``), in place."""
    torch.ops.marlin.kv_quantize(x, positions, packed, norms, codebook, bits)


def kv_dequantize(packed: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor, pos: int, bits: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Position ``pos`` -> float32 ``[H, D]`` in the rotated domain (into ``out`` if given)."""
    if out is None:
        return torch.ops.marlin.kv_dequantize(packed, norms, codebook, pos, bits)
    torch.ops.marlin.kv_dequantize_out(packed, norms, codebook, pos, bits, out)
    return out


def kv_dequantize_seq(packed: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor, start: int, n: int,
                      bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Positions ``[start, start + n)`` -> float32 ``[H, n, D]`` in the rotated domain, one call."""
    if out is None:
        return torch.ops.marlin.kv_dequantize_seq(packed, norms, codebook, start, n, bits)
    torch.ops.marlin.kv_dequantize_seq_out(packed, norms, codebook, start, n, bits, out)
    return out


def kv_attention(q_rot: torch.Tensor, k_packed: torch.Tensor, k_norms: torch.Tensor, v_packed: torch.Tensor,
                 v_norms: torch.Tensor, codebook: torch.Tensor, length: int, bits: int,
                 scale: float | None = None) -> torch.Tensor:
    """Decode attention over positions ``[0, length)`` of a quantized cache, in the rotated
    domain: ``q_rot [H, G, D]`` (already rotated) -> float32 ``[H, G, D]`` (still rotated)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q_rot.shape[-1])
    return torch.ops.marlin.kv_attention(q_rot, k_packed, k_norms, v_packed, v_norms, codebook, length, bits,
                                         float(scale))


def rotated_attention(q: torch.Tensor, k_packed: torch.Tensor, k_norms: torch.Tensor, v_packed: torch.Tensor,
                      v_norms: torch.Tensor, codebook: torch.Tensor, length: int, bits: int,
                      scale: float | None = None) -> torch.Tensor:
    """Attention of ``q [H, G, D]`` (original domain) over a quantized cache, done in the rotated
    domain: rotate ``q``, score against the rotated keys, and un-rotate ``Σ p·v̂``. Equal to
    dense attention over the dequantized cache, because the normalized Hadamard transform is
    orthogonal and its own inverse. Returns ``[H, G, D]`` in ``q.dtype``."""
    d = q.shape[-1]
    q_rot = torch.ops.marlin.hadamard(q.float(), d)
    o_rot = kv_attention(q_rot, k_packed, k_norms, v_packed, v_norms, codebook, length, bits, scale)
    return torch.ops.marlin.hadamard(o_rot, d).to(q.dtype)
