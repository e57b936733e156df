"""The GPTQ algorithm as the paper states it (Frantar et al., 2022, Algorithm 1), written plainly
as the comparison for ``benchmarks/gptq_time.py``.

Quantizer: asymmetric min-max integer grid per group of 128 inputs, ``q = clamp(round(w / s) + z,
0, 2^b - 1)``, ``w_hat = s (q - z)`` (the paper's uniform quantizer). Static groups: each group's
``(s, z)`` from the original weights. Act-order: columns by descending ``diag(H)``. Lazy batches
of 128 columns; Cholesky of the damped inverse Hessian. Nothing here is shared with
``metal_marlin_torch.quant``: it is an independent implementation for timing and cross-checking.
"""

from __future__ import annotations

import torch


def add_batch(h: torch.Tensor, n_seen: int, x: torch.Tensor) -> int:
    """Running mean update ``H <- (n H + X^T X) / (n + m)`` (the paper's ``H = 2 X X^T`` up to scale)."""
    x = x.reshape(-1, x.shape[-1]).float()
    m = x.shape[0]
    h.mul_(n_seen / (n_seen + m))
    h.add_(x.T @ x, alpha=1.0 / (n_seen + m))
    return n_seen + m


def minmax_params(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point of ``w [N, G]`` for a ``bits`` asymmetric grid."""
    maxq = 2 ** bits - 1
    lo = torch.minimum(w.min(1).values, torch.zeros(1, device=w.device))
    hi = torch.maximum(w.max(1).values, torch.zeros(1, device=w.device))
    same = lo == hi
    lo = torch.where(same, lo - 1, lo)
    hi = torch.where(same, hi + 1, hi)
    scale = (hi - lo) / maxq
    zero = torch.round(-lo / scale)
    return scale, zero


def gptq_reference(
    w: torch.Tensor, h: torch.Tensor, bits: int = 4, group: int = 128, damp: float = 0.01,
    block: int = 128, act_order: bool = True,
) -> torch.Tensor:
    """Quantized-dequantized weight ``[N, K]`` (original column order)."""
    w = w.clone().float()
    h = h.clone().float()
    n, k = w.shape
    maxq = 2 ** bits - 1
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    scales, zeros = [], []
    for g0 in range(0, k, group):  # static groups from the original weights
        s, z = minmax_params(w[:, g0:g0 + group], bits)
        scales.append(s)
        zeros.append(z)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k, device=w.device)
    w = w[:, perm]
    h = h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, device=w.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q_all = torch.zeros_like(w)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        q1 = torch.zeros_like(w1)
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            gi = int(perm[i1 + i]) // group
            s, z = scales[gi], zeros[gi]
            q = s * (torch.clamp(torch.round(col / s) + z, 0, maxq) - z)
            q1[:, i] = q
            e = (col - q) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        q_all[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q_all[:, torch.argsort(perm)]
