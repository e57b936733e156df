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


def check_attention_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
                         window: int) -> None:
    where = "marlin.attention"
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


REFERENCE = {"attention": attention, "attention_fp8": attention_fp8}
