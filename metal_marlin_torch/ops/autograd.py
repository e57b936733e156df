"""Autograd for ``marlin::gemm`` with respect to ``x`` and the layer bias, so LoRA adapters on
a frozen quantized base can train. The packed weight itself is not differentiable."""

from __future__ import annotations

import torch

from .library import NAMESPACE


def _setup_context(ctx, inputs, output):
    x, weight, scales, biases, global_scale, bias, format, group_size = inputs
    ctx.save_for_backward(weight, scales, biases, global_scale)
    ctx.format = format
    ctx.group_size = group_size
    ctx.in_features = x.shape[-1]
    ctx.bias_needs_grad = bias is not None and bias.requires_grad


def _backward(ctx, grad):
    weight, scales, biases, global_scale = ctx.saved_tensors
    w_hat = torch.ops.marlin.dequantize(
        weight, scales, biases, global_scale, ctx.format, ctx.group_size, ctx.in_features,
        torch.float32,
    )
    grad_x = (grad.float() @ w_hat).to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_needs_grad else None
    return grad_x, None, None, None, None, grad_bias, None, None


torch.library.register_autograd(f"{NAMESPACE}::gemm", _backward, setup_context=_setup_context)
