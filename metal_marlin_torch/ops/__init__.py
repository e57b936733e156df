"""``torch.ops.marlin.*``: schemas, pure-torch CPU/CUDA kernels, fake kernels, autograd, and
typed Python wrappers. See docs/FORMAT.md for the tensors' layout."""

from __future__ import annotations

import torch

from . import autograd, cpu, cuda, fake, kv_fake, library, moe, reference, registry  # noqa: F401  (registration)
from .registry import active_kernels, override, reset_kernel, set_kernel

cuda.register()  # marlin::gemm on CUDA tensors -> Triton kernels when Triton and a GPU exist
cpu.register()  # marlin::gemm on CPU tensors -> the C++ kernel (built on first use)


def gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    format: str,
    group_size: int,
) -> torch.Tensor:
    """``x[..., K] @ dequant(weight).T + bias`` -> ``[..., N]`` in ``x.dtype`` (fp32 accumulation)."""
    return torch.ops.marlin.gemm(x, weight, scales, biases, global_scale, bias, format, group_size)


def dequantize(
    weight: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    format: str,
    group_size: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W_hat [N, in_features]`` in ``dtype``."""
    return torch.ops.marlin.dequantize(
        weight, scales, biases, global_scale, format, group_size, in_features, dtype
    )


def quantize(
    w: torch.Tensor, format: str, group_size: int, scale_dtype: torch.dtype = torch.float16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """RTN quantize ``w [N, K]``: ``(weight, scales, biases or None, global_scale or None)``."""
    weight, scales, biases, global_scale = torch.ops.marlin.quantize(w, format, group_size, scale_dtype)
    return (weight, scales, biases if biases.numel() else None,
            global_scale if global_scale.numel() else None)


def fake_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Clip to [-1, 1], quantize to ``2^(bits-1) - 1`` steps per unit, dequantize (seed 001)."""
    return torch.ops.marlin.fake_quantize(x, bits)


def hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """Normalized fast Walsh–Hadamard transform of each ``block`` of the last dimension."""
    return torch.ops.marlin.hadamard(x, block)


def moe_gemm(
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    format: str,
    group_size: int,
) -> torch.Tensor:
    """``y[m] = x[m] @ dequant(weight[expert_ids[m]]).T + bias[expert_ids[m]]``.

    ``x [..., K]``, ``expert_ids`` int of x's leading shape (``[M]`` for ``x [M, K]``), ``weight``
    uint32 ``[E, N, words]`` (each expert in the layout of docs/FORMAT.md),
    ``scales``/``biases`` ``[E, N, K/G]``, ``global_scale`` ``[E, 1]`` (nvfp4),
    ``bias [E, N]``. Output ``[..., N]`` in ``x.dtype``, fp32 accumulation.
    """
    return torch.ops.marlin.moe_gemm(x, expert_ids, weight, scales, biases, global_scale, bias, format, group_size)


def moe_route(
    logits: torch.Tensor,
    top_k: int,
    mode: str = "softmax_topk",
    renormalize: bool = True,
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits ``[..., E]`` -> ``(weights float32 [..., top_k], ids int64 [..., top_k])``.

    ``mode``: "softmax_topk" (Qwen-MoE, Mixtral), "topk_softmax", or "sigmoid" with the score
    correction ``bias`` and group-limited selection (DeepSeek-V3, GLM-4.x); see
    :mod:`metal_marlin_torch.ops.moe_route`.
    """
    return torch.ops.marlin.moe_route(logits, bias, top_k, mode, renormalize, n_group, topk_group, scaling)


__all__ = [
    "active_kernels", "dequantize", "fake_quantize", "gemm", "hadamard", "moe_gemm", "moe_route", "override",
    "quantize", "reset_kernel", "set_kernel",
]
