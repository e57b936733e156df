"""Pure-torch kernels of the quantized-KV-cache ops (TurboQuant-style rotated codebooks).

These are the CPU/CUDA implementation and the oracle for the Metal kernels. Layout of one
cache (K or V) with ``H`` rows (batch x KV heads folded together), ``C`` positions (the
capacity; a ring buffer whose positions the caller wraps) and head dimension ``D`` (a power of
two >= 2), with ``B = min(D, 256)`` and ``P = D / B`` norm blocks per position:

======== ========================= ===========================================================
tensor   dtype / shape             meaning
======== ========================= ===========================================================
packed   uint8 ``[H, C, D/2]``     4-bit codes, element ``2j`` in the low nibble of byte ``j``
packed   uint8 ``[H, C, D]``       5-, 6- or 8-bit codes, one byte per element
norms    float32 ``[H, C, P]``     L2 norm of each block of ``B`` rotated coordinates
codebook float32 ``[2^bits]``      strictly increasing levels for ``sqrt(B) * y / norm``
======== ========================= ===========================================================

Quantize (per position, per row): ``y = hadamard(x, D)`` (normalized FWHT, fp32); for each
block ``b`` of ``B`` coordinates ``n_b = sqrt(Σ y²)`` (the sum as a fixed halving tree, the
square root correctly rounded), ``u = y * (sqrt(B) / n_b)`` (``u = 0`` when ``n_b = 0``),
``code = #{j : mid_j < u}`` with ``mid_j = (c_j + c_{j+1}) / 2`` (nearest level; a tie goes to
the lower level). Dequantize: ``y_hat = c[code] * (n_b * (1 / sqrt(B)))`` in
fp32, with ``sqrt(B)`` and ``1 / sqrt(B)`` rounded once to float32. Dequantized values stay in
the rotated domain: attention scores are rotation-invariant, so a caller rotates ``q`` instead
of un-rotating every key (``hadamard`` is its own inverse).
"""

from __future__ import annotations

import functools
import math
import struct

import torch

from .reference import hadamard

KV_BITS = (4, 5, 6, 8)
NORM_BLOCK = 256  # one norm per 256 rotated coordinates (at least one per position)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)


def head_dim_of(packed: torch.Tensor, bits: int) -> int:
    """Head dimension ``D`` stored in a ``packed`` cache of ``bits``-bit codes."""
    return packed.shape[-1] * 2 if bits == 4 else packed.shape[-1]


def block_of(head_dim: int) -> int:
    """Rotated coordinates per norm: ``min(head_dim, 256)``."""
    return min(head_dim, NORM_BLOCK)


def norms_per_pos(head_dim: int) -> int:
    return max(head_dim // NORM_BLOCK, 1)


def packed_dim(head_dim: int, bits: int) -> int:
    """Last dimension of the packed cache: ``D/2`` for 4-bit, ``D`` otherwise."""
    return head_dim // 2 if bits == 4 else head_dim


@functools.cache
def block_constants(head_dim: int) -> tuple[float, float]:
    """``(sqrt(B), 1/sqrt(B))`` rounded once to float32 (the Metal host passes the same); plain
    floats, computed once per head_dim (no tensors on the per-token path)."""
    b = block_of(head_dim)

    def f32(v: float) -> float:
        return struct.unpack("f", struct.pack("f", v))[0]

    return f32(math.sqrt(b)), f32(1.0 / math.sqrt(b))


def check_bits(where: str, bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in KV_BITS:
        raise ValueError(f"{where}: bits must be one of {KV_BITS}, got {bits!r}")


def check_head_dim(where: str, head_dim: int) -> None:
    if head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"{where}: head_dim must be a power of two >= 2, got {head_dim}")


def check_cache(where: str, packed: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor,
                bits: int) -> tuple[int, int, int]:
    """Validate one cache's tensors; returns ``(H, C, D)``. Errors name the argument."""
    check_bits(where, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 3:
        raise ValueError(f"{where}: packed must be uint8 [H, C, D{'/2' if bits == 4 else ''}], "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    h, c, _ = packed.shape
    d = head_dim_of(packed, bits)
    check_head_dim(where, d)
    p = norms_per_pos(d)
    if norms.dtype != torch.float32 or tuple(norms.shape) != (h, c, p):
        raise ValueError(f"{where}: norms must be float32 [{h}, {c}, {p}] (H, C, max(D/256, 1) with D={d}), "
                         f"got {norms.dtype} {tuple(norms.shape)}")
    if codebook.dtype != torch.float32 or tuple(codebook.shape) != (2 ** bits,):
        raise ValueError(f"{where}: codebook must be float32 [{2 ** bits}] for bits={bits}, "
                         f"got {codebook.dtype} {tuple(codebook.shape)}")
    check_on_packed_device(where, packed, norms=norms, codebook=codebook)
    return h, c, d


def check_on_packed_device(where: str, packed: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Each of ``tensors`` is on ``packed``'s device (no silent copies); errors name the tensor."""
    for name, t in tensors.items():
        if t.device != packed.device:
            raise ValueError(f"{where}: {name} is on {t.device} but packed is on {packed.device}")


def check_out(where: str, out: torch.Tensor, required: int, device: torch.device) -> None:
    if out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"{where}: out must be a contiguous float32 tensor, got {out.dtype} "
                         f"(contiguous={out.is_contiguous()})")
    if out.device != device:
        raise ValueError(f"{where}: out is on {out.device} but packed is on {device}")
    if out.numel() < required:
        raise ValueError(f"{where}: out has {out.numel()} elements, need {required}")


def check_range(where: str, start: int, n: int, capacity: int) -> None:
    if start < 0 or n < 0:
        raise ValueError(f"{where}: start and n must be >= 0, got start={start}, n={n}")
    if start + n > capacity:
        raise ValueError(f"{where}: start({start}) + n({n}) > capacity({capacity})")


def check_quantize_args(x: torch.Tensor, positions: torch.Tensor, packed: torch.Tensor, norms: torch.Tensor,
                        codebook: torch.Tensor, bits: int) -> tuple[int, int, int]:
    where = "marlin.kv_quantize"
    h, c, d = check_cache(where, packed, norms, codebook, bits)
    if x.dtype not in _FLOAT or x.dim() != 3 or x.shape[0] != h or x.shape[2] != d:
        raise ValueError(f"{where}: x must be float16/bfloat16/float32 [{h}, n, {d}] to match packed, "
                         f"got {x.dtype} {tuple(x.shape)}")
    n = x.shape[1]
    if positions.dtype != torch.int64 or tuple(positions.shape) != (n,):
        raise ValueError(f"{where}: positions must be int64 [{n}] (one per token of x), "
                         f"got {positions.dtype} {tuple(positions.shape)}")
    check_on_packed_device(where, packed, x=x, positions=positions)
    return h, n, d


# ---- kernels ------------------------------------------------------------------------------------

def tree_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (a power of two) as a fixed tree: first half + second half, until
    one element is left. The Metal kernel reduces in this order, so norms match bitwise."""
    while t.shape[-1] > 1:
        half = t.shape[-1] // 2
        t = t[..., :half] + t[..., half:]
    return t[..., 0]


def encode(x: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., D]`` (original domain) -> ``(codes int64 [..., D], norms float32 [..., P])``."""
    d = x.shape[-1]
    b, p = block_of(d), norms_per_pos(d)
    sq, _ = block_constants(d)
    y = hadamard(x.float(), d).reshape(*x.shape[:-1], p, b)
    # torch's float32 sqrt on CPU is not always correctly rounded; through float64 it is
    norm = torch.sqrt(tree_sum(y * y).double()).float()
    inv = torch.where(norm > 0, sq / norm, torch.zeros_like(norm))
    u = y * inv.unsqueeze(-1)
    mids = (codebook[1:] + codebook[:-1]) * 0.5
    codes = torch.searchsorted(mids, u.contiguous())  # count of midpoints < u: the nearest level
    return codes.reshape(x.shape), norm


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int codes ``[..., D]`` -> uint8 ``[..., packed_dim(D, bits)]``."""
    c = codes.to(torch.uint8)
    if bits == 4:
        return c[..., 0::2] | (c[..., 1::2] << 4)
    return c


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 ``[..., packed_dim]`` -> int64 codes ``[..., D]``."""
    p = packed.to(torch.int64)
    if bits == 4:
        return torch.stack((p & 0xF, p >> 4), dim=-1).flatten(-2)
    return p


def decode(packed: torch.Tensor, norms: torch.Tensor, codebook: torch.Tensor, bits: int) -> torch.Tensor:
    """``packed [..., packed_dim]``, ``norms [..., P]`` -> float32 ``[..., D]`` (rotated domain)."""
    codes = unpack(packed, bits)
    d = codes.shape[-1]
    b, p = block_of(d), norms_per_pos(d)
    _, rs = block_constants(d)
    vals = codebook[codes].reshape(*codes.shape[:-1], p, b)
    return (vals * (norms * rs).unsqueeze(-1)).reshape(codes.shape)


def kv_quantize(x, positions, packed, norms, codebook, bits):
    _, n, _ = check_quantize_args(x, positions, packed, norms, codebook, bits)
    if n == 0 or x.shape[0] == 0:
        return
    capacity = packed.shape[1]
    lo, hi = torch.stack(torch.aminmax(positions)).tolist()  # one device sync, not four
    if lo < 0 or hi >= capacity:
        raise ValueError(f"marlin.kv_quantize: positions must lie in [0, {capacity}) (wrap them), "
                         f"got min {lo}, max {hi}")
    codes, nrm = encode(x, codebook)
    packed.index_copy_(1, positions, pack(codes, bits))
    norms.index_copy_(1, positions, nrm)


def _dequantize_range(packed, norms, codebook, start, n, bits):
    return decode(packed[:, start:start + n], norms[:, start:start + n], codebook, bits)


def kv_dequantize(packed, norms, codebook, pos, bits):
    h, c, d = check_cache("marlin.kv_dequantize", packed, norms, codebook, bits)
    if h == 0:
        return packed.new_empty((0, d), dtype=torch.float32)
    if not 0 <= pos < c:
        raise ValueError(f"marlin.kv_dequantize: pos must lie in [0, {c}), got {pos}")
    return _dequantize_range(packed, norms, codebook, pos, 1, bits)[:, 0]


def kv_dequantize_out(packed, norms, codebook, pos, bits, out):
    h, c, d = check_cache("marlin.kv_dequantize_out", packed, norms, codebook, bits)
    check_out("marlin.kv_dequantize_out", out, h * d, packed.device)
    if h == 0:
        return
    if not 0 <= pos < c:
        raise ValueError(f"marlin.kv_dequantize_out: pos must lie in [0, {c}), got {pos}")
    out.view(-1)[: h * d].view(h, d).copy_(_dequantize_range(packed, norms, codebook, pos, 1, bits)[:, 0])


def kv_dequantize_seq(packed, norms, codebook, start, n, bits):
    h, c, d = check_cache("marlin.kv_dequantize_seq", packed, norms, codebook, bits)
    if h == 0 or n == 0:
        return packed.new_empty((h, max(n, 0), d), dtype=torch.float32)
    check_range("marlin.kv_dequantize_seq", start, n, c)
    return _dequantize_range(packed, norms, codebook, start, n, bits)


def kv_dequantize_seq_out(packed, norms, codebook, start, n, bits, out):
    where = "marlin.kv_dequantize_seq_out"
    h, c, d = check_cache(where, packed, norms, codebook, bits)
    check_out(where, out, h * max(n, 0) * d, packed.device)
    if h == 0 or n == 0:
        return
    check_range(where, start, n, c)
    out.view(-1)[: h * n * d].view(h, n, d).copy_(_dequantize_range(packed, norms, codebook, start, n, bits))


def check_attention_args(q, k_packed, k_norms, v_packed, v_norms, codebook, length, bits) -> tuple[int, int, int]:
    where = "marlin.kv_attention"
    h, c, d = check_cache(where + " (keys)", k_packed, k_norms, codebook, bits)
    hv, cv, dv = check_cache(where + " (values)", v_packed, v_norms, codebook, bits)
    if (hv, cv, dv) != (h, c, d):
        raise ValueError(f"{where}: value cache [H={hv}, C={cv}, D={dv}] must match key cache [{h}, {c}, {d}]")
    if q.dtype not in _FLOAT or q.dim() != 3 or q.shape[0] != h or q.shape[2] != d:
        raise ValueError(f"{where}: q must be float16/bfloat16/float32 [{h}, G, {d}], got {q.dtype} {tuple(q.shape)}")
    if q.device != k_packed.device:
        raise ValueError(f"{where}: q is on {q.device} but the cache is on {k_packed.device}")
    if not 1 <= length <= c:
        raise ValueError(f"{where}: length must lie in [1, {c}] (capacity), got {length}")
    return h, c, d


def kv_attention(q, k_packed, k_norms, v_packed, v_norms, codebook, length, bits, scale):
    """Decode attention in the rotated domain over positions ``[0, length)``: fp32 softmax."""
    check_attention_args(q, k_packed, k_norms, v_packed, v_norms, codebook, length, bits)
    k = _dequantize_range(k_packed, k_norms, codebook, 0, length, bits)  # [H, L, D]
    v = _dequantize_range(v_packed, v_norms, codebook, 0, length, bits)
    s = (q.float() @ k.transpose(1, 2)) * scale  # [H, G, L]
    return torch.softmax(s, dim=-1) @ v


REFERENCE = {
    "kv_quantize": kv_quantize,
    "kv_dequantize": kv_dequantize,
    "kv_dequantize_out": kv_dequantize_out,
    "kv_dequantize_seq": kv_dequantize_seq,
    "kv_dequantize_seq_out": kv_dequantize_seq_out,
    "kv_attention": kv_attention,
}
