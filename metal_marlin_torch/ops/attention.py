"""Pure-torch kernel of ``marlin::attention`` (the oracle of shaders/attention.h).

``q [B, Hq, Sq, D]``, ``k``/``v [B, Hk, Sk, D]`` (transformers' layout, ``Hq`` a multiple of
``Hk``: grouped-query heads share K/V head ``h // (Hq / Hk)``), ``Sq <= Sk``: query row ``i`` sits
at position ``Sk - Sq + i`` (a prefill has ``Sq = Sk``, a decode step ``Sq = 1`` after the cache).
Key ``j`` is attended when ``causal`` lets it (``j <= pos``) and, with ``window > 0``, when
``pos - j < window`` (transformers' sliding window). Scores, softmax and the weighted sum in
float32; output in q's dtype. NaN/Inf in q, k or v propagate to the rows that read them, as in
``scaled_dot_product_attention``.
"""

from __future__ import annotations

import torch


def _check_qkv_shapes(where: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """The shape checks of the contiguous-K/V ops (plain and FP8): q ``[B, Hq, Sq, D]``, k and v
    ``[B, Hk, Sk, D]`` of one shape, ``Hq`` a multiple of ``Hk``, no more query rows than keys."""
    if not q.dtype.is_floating_point:
        raise ValueError(f"{where}: q must be floating point, got {q.dtype}")
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        raise ValueError(f"{where}: q must be [B, Hq, Sq, D] and k, v [B, Hk, Sk, D] of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, sq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or k.shape[1] < 1 or hq % k.shape[1]:
        raise ValueError(f"{where}: k {tuple(k.shape)} must match q {tuple(q.shape)} in batch and head_dim, "
                         f"with q's heads a multiple of k's")
    if sq > k.shape[2]:
        raise ValueError(f"{where}: q has more rows ({sq}) than there are keys ({k.shape[2]})")


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                         window: int) -> None:
    where = "marlin.attention"
    _check_qkv_shapes(where, q, k, v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{where}: {name} must have q's dtype and device ({q.dtype}, {q.device}), "
                             f"got {t.dtype}, {t.device}")
    if window < 0:
        raise ValueError(f"{where}: window must be >= 0 (0 = none), got {window}")


def attention_mask(sq: int, sk: int, causal: bool, window: int, device=None) -> torch.Tensor:
    """Boolean ``[Sq, Sk]``: which keys each query row attends (module docstring)."""
    qpos = torch.arange(sq, device=device)[:, None] + (sk - sq)
    kpos = torch.arange(sk, device=device)[None]
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        mask &= kpos <= qpos
    if window > 0:
        mask &= qpos - kpos < window
    return mask


def attention(q, k, v, scale, causal, window):
    check_attention_args(q, k, v, scale, causal, window)
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    group = hq // hk
    # the query heads of one K/V head side by side ([B, Hk, G * Sq, D]): no repeated K/V copy
    qf = q.float().reshape(b, hk, group * sq, d)
    s = (qf @ k.float().transpose(-1, -2)) * scale
    mask = attention_mask(sq, sk, causal, window, q.device).repeat(group, 1)
    s = s.masked_fill(~mask, -float("inf"))
    return (torch.softmax(s, -1) @ v.float()).reshape(b, hq, sq, d).to(q.dtype)


def check_attention_fp8_args(q: torch.Tensor, k: torch.Tensor, k_scales: torch.Tensor, v: torch.Tensor,
                             v_scales: torch.Tensor, window: int) -> None:
    where = "marlin.attention_fp8"
    _check_qkv_shapes(where, q, k, v)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != torch.uint8 or t.device != q.device:
            raise ValueError(f"{where}: {name} must be the E4M3 bytes as uint8 on q's device ({q.device}), got "
                             f"{t.dtype}, {t.device}")
    for name, t in (("k_scales", k_scales), ("v_scales", v_scales)):
        if t.dtype != torch.float32 or t.device != q.device or t.shape != k.shape[:3]:
            raise ValueError(f"{where}: {name} must be float32 {list(k.shape[:3])} ([B, Hk, Sk]) on q's device, "
                             f"got {t.dtype} {list(t.shape)} on {t.device}")
    if window < 0:
        raise ValueError(f"{where}: window must be >= 0 (0 = none), got {window}")


def dequantize_fp8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """E4M3 bytes ``[..., D]`` times float32 ``scales [...]``, rounded to ``dtype`` (as
    ``kv.stores.FP8Store.dequantize``, whose per-token scales these are)."""
    return (codes.view(torch.float8_e4m3fn).float() * scales[..., None]).to(dtype)


def attention_fp8(q, k, k_scales, v, v_scales, scale, causal, window):
    """``attention`` over the FP8 cache dequantized to q's dtype (the layout of
    ``kv.stores.FP8Store``: E4M3 bytes ``[B, Hk, Sk, D]``, one float32 scale per token and head)."""
    check_attention_fp8_args(q, k, k_scales, v, v_scales, window)
    return attention(q, dequantize_fp8(k, k_scales, q.dtype), dequantize_fp8(v, v_scales, q.dtype), scale, causal,
                     window)


def check_attention_paged_args(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                               block_table: torch.Tensor, seq_k: int, window: int) -> None:
    where = "marlin.attention_paged"
    if not q.dtype.is_floating_point:
        raise ValueError(f"{where}: q must be floating point, got {q.dtype}")
    if q.dim() != 4 or k_pages.dim() != 4 or v_pages.shape != k_pages.shape:
        raise ValueError(f"{where}: q must be [B, Hq, Sq, D] and k_pages, v_pages [num_pages, Hk, P, D] of one shape, "
                         f"got {tuple(q.shape)}, {tuple(k_pages.shape)}, {tuple(v_pages.shape)}")
    b, hq, sq, d = q.shape
    if k_pages.shape[3] != d or k_pages.shape[1] < 1 or hq % k_pages.shape[1]:
        raise ValueError(f"{where}: k_pages {tuple(k_pages.shape)} must match q {tuple(q.shape)} in head_dim, "
                         f"with q's heads a multiple of its heads")
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{where}: {name} must have q's dtype and device ({q.dtype}, {q.device}), "
                             f"got {t.dtype}, {t.device}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 or block_table.shape[0] != b \
            or block_table.device != q.device:
        raise ValueError(f"{where}: block_table must be int32 [B, pages] with B = {b} on q's device, got "
                         f"{block_table.dtype} {list(block_table.shape)} on {block_table.device}")
    cap = block_table.shape[1] * k_pages.shape[2]
    if not 0 <= seq_k <= cap:
        raise ValueError(f"{where}: seq_k must be in [0, {cap}] (block_table's {block_table.shape[1]} pages of "
                         f"{k_pages.shape[2]} tokens), got {seq_k}")
    if sq > seq_k:
        raise ValueError(f"{where}: q has more rows ({sq}) than there are keys ({seq_k})")
    if window < 0:
        raise ValueError(f"{where}: window must be >= 0 (0 = none), got {window}")


def gather_pages(pages: torch.Tensor, block_table: torch.Tensor, seq_k: int) -> torch.Tensor:
    """Paged ``[num_pages, Hk, P, D]`` -> contiguous ``[B, Hk, seq_k, D]``: sequence b's token j is
    slot ``j % P`` of page ``block_table[b, j // P]`` (the paged layout of docs/METAL.md)."""
    p = pages.shape[2]
    used = -(-seq_k // p)  # pages holding tokens [0, seq_k)
    ids = block_table[:, :used].long()
    if ids.numel() and (ids.min() < 0 or ids.max() >= pages.shape[0]):
        raise ValueError(f"marlin.attention_paged: block_table's first {used} columns must name pages in "
                         f"[0, {pages.shape[0]}), got values in [{int(ids.min())}, {int(ids.max())}]")
    g = pages[ids]  # [B, used, Hk, P, D]
    return g.permute(0, 2, 1, 3, 4).reshape(g.shape[0], g.shape[2], used * p, g.shape[4])[:, :, :seq_k]


def attention_paged(q, k_pages, v_pages, block_table, seq_k, scale, causal, window):
    """``attention`` over the pages gathered into contiguous K/V (``gather_pages``)."""
    check_attention_paged_args(q, k_pages, v_pages, block_table, seq_k, window)
    return attention(q, gather_pages(k_pages, block_table, seq_k), gather_pages(v_pages, block_table, seq_k), scale,
                     causal, window)


REFERENCE = {"attention": attention, "attention_fp8": attention_fp8, "attention_paged": attention_paged}
