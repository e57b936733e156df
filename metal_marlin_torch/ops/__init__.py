"""``torch.ops.marlin.*``: schemas, pure-torch CPU/CUDA kernels, fake kernels, autograd, and
typed Python wrappers. See docs/FORMAT.md for the tensors' layout."""

from __future__ import annotations

import torch

from . import autograd, cpu, cuda, fake, kv_fake, layer_fake, library, moe, reference, registry  # noqa: F401  (registration)
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
# decoder-layer ops (ops/layer.py: the exact semantics, matching the transformers modules)
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``LlamaRMSNorm(x)``; with ``residual``: ``(norm(x + residual), x + residual)``."""
    out = torch.ops.marlin.rms_norm(x, weight, residual, eps)
    return out[0] if residual is None else (out[0], out[1])


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.layer_norm`` over the last dim; with ``residual``: ``(norm(x + residual), x + residual)``."""
    out = torch.ops.marlin.layer_norm(x, weight, bias, residual, eps)
    return out[0] if residual is None else (out[0], out[1])


def silu_mul(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(gate) * up``; ``up=None``: ``gate`` is ``[..., 2I]`` (gate half first)."""
    return torch.ops.marlin.silu_mul(gate, up)


def gelu_mul(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """``gelu_tanh(gate) * up``; ``up=None``: ``gate`` is ``[..., 2I]`` (gate half first)."""
    return torch.ops.marlin.gelu_mul(gate, up)


def rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
    scaling: float = 1.0, interleaved: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of ``q [B, Hq, S, D]`` and ``k [B, Hk, S, D]`` at ``positions [B or 1, S]``
    (one launch); ``inv_freq``/``scaling`` from :func:`.layer.rope_parameters`."""
    return torch.ops.marlin.rope(q, k, positions, inv_freq, scaling, interleaved)


def sample(
    logits: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
    repetition_penalty: float = 1.0, prev_tokens: torch.Tensor | None = None,
    generator: torch.Generator | None = None, uniforms: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of ``logits [B, V]`` (int64 ``[B]``), semantics in :mod:`.sampling`;
    ``temperature=0`` is greedy. The uniform draws come from ``generator`` (reproducible under
    its seed) unless given as ``uniforms`` (float32 ``[B]``). A row with no token to draw (a NaN
    score, or no finite maximum when sampling) gets -1 from the op; this wrapper raises then
    (which reads the tokens back: on MPS a sync, as ``generate()`` does for every token anyway)."""
    if uniforms is None:
        uniforms = torch.rand(logits.shape[0], generator=generator, dtype=torch.float32,
                              device=generator.device if generator is not None else "cpu").to(logits.device)
    tokens = torch.ops.marlin.sample(logits, uniforms, prev_tokens, repetition_penalty, temperature, top_k, top_p,
                                     min_p)
    if not torch.compiler.is_compiling() and bool((tokens < 0).any()):
        rows = torch.nonzero(tokens < 0).flatten().tolist()
        raise ValueError(f"marlin.sample: rows {rows} have no token to draw (a NaN score, or an all -inf / "
                         f"+inf row when sampling)")
    return tokens


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, causal: bool = True,
    window: int = 0,
) -> torch.Tensor:
    """Softmax attention of ``q [B, Hq, Sq, D]`` over ``k``/``v [B, Hk, Sk, D]`` (GQA), the last
    query row at the last key; ``scale`` defaults to ``1/sqrt(D)``; ``window > 0``: sliding window."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.ops.marlin.attention(q, k, v, scale, causal, window)


__all__ = [
    "active_kernels", "dequantize", "fake_quantize", "gemm", "hadamard", "moe_gemm", "moe_route", "override",
    "quantize", "reset_kernel", "set_kernel",
    "attention", "gelu_mul", "layer_norm", "rms_norm", "rope", "sample", "silu_mul",
]
