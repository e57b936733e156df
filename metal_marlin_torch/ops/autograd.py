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
    # grad_x only when x needs it: a bias-only (or adapter-only) backward skips dequantizing W
    grad_x = None
    if ctx.needs_input_grad[0]:
        weight, scales, biases, global_scale = ctx.saved_tensors
        w_hat = torch.ops.marlin.dequantize(
            weight, scales, biases, global_scale, ctx.format, ctx.group_size, ctx.in_features,
            torch.float32,
        )
        grad_x = (grad.float() @ w_hat).to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_needs_grad else None
    return grad_x, None, None, None, None, grad_bias, None, None


torch.library.register_autograd(f"{NAMESPACE}::gemm", _backward, setup_context=_setup_context)


def _prepared_setup_context(ctx, inputs, output):
    x, weight, scales, biases, bias, format, group_size, in_features, out_features = inputs
    ctx.save_for_backward(weight, scales, biases)
    ctx.meta = (format, group_size, in_features, out_features)
    ctx.bias_needs_grad = bias is not None and bias.requires_grad


def _prepared_backward(ctx, grad):
    from .reference import dequantize_prepared

    grad_x = None
    if ctx.needs_input_grad[0]:
        weight, scales, biases = ctx.saved_tensors
        w_hat = dequantize_prepared(weight, scales, biases, *ctx.meta)
        grad_x = (grad.float() @ w_hat).to(grad.dtype)
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.bias_needs_grad else None
    return grad_x, None, None, None, grad_bias, None, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::gemm_prepared", _prepared_backward,
                                setup_context=_prepared_setup_context)


def _moe_setup_context(ctx, inputs, output):
    x, expert_ids, weight, scales, biases, global_scale, bias, format, group_size = inputs
    ctx.save_for_backward(expert_ids, weight, scales, biases, global_scale)
    ctx.format = format
    ctx.group_size = group_size
    ctx.in_features = x.shape[-1]
    ctx.bias_needs_grad = bias is not None and bias.requires_grad
    ctx.bias_dtype = None if bias is None else bias.dtype


def _moe_backward(ctx, grad):
    # grad_x[m] = grad[m] @ W_hat[e_m] (its own op: the per-expert loop is opaque to tracing);
    # grad_bias[e] = the sum of grad over the rows routed to expert e
    expert_ids, weight, scales, biases, global_scale = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = torch.ops.marlin.moe_gemm_backward(
            grad, expert_ids, weight, scales, biases, global_scale, ctx.format, ctx.group_size,
            ctx.in_features,
        )
    grad_bias = None
    if ctx.bias_needs_grad:
        grad_bias = grad.new_zeros((weight.shape[0], weight.shape[1]), dtype=torch.float32)
        grad_bias = grad_bias.index_add(0, expert_ids.reshape(-1).long(),
                                        grad.reshape(-1, grad.shape[-1]).float()).to(ctx.bias_dtype)
    return grad_x, None, None, None, None, None, grad_bias, None, None


torch.library.register_autograd(f"{NAMESPACE}::moe_gemm", _moe_backward, setup_context=_moe_setup_context)
