"""Fake (meta) kernels: output shapes and dtypes without computing, for ``torch.compile``."""

from __future__ import annotations

import torch

from .. import formats as F
from .library import NAMESPACE
from .moe import check_moe_gemm_args
from .moe_route import check_moe_route_args
from .reference import check_fake_quantize_args, check_hadamard_args


@torch.library.register_fake(f"{NAMESPACE}::gemm")
def _gemm_fake(x, weight, scales, biases, global_scale, bias, format, group_size):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@torch.library.register_fake(f"{NAMESPACE}::gemm_prepared")
def _gemm_prepared_fake(x, weight, scales, biases, bias, format, group_size, in_features, out_features):
    return x.new_empty((*x.shape[:-1], out_features))


@torch.library.register_fake(f"{NAMESPACE}::dequantize")
def _dequantize_fake(weight, scales, biases, global_scale, format, group_size, in_features, dtype):
    return weight.new_empty((weight.shape[0], in_features), dtype=dtype)


@torch.library.register_fake(f"{NAMESPACE}::quantize")
def _quantize_fake(w, format, group_size, scale_dtype):
    fmt = F.get_format(format)
    n, k = w.shape
    g = fmt.check_group_size(group_size, k)
    sdt = fmt.scale_dtype(scale_dtype)
    return [
        w.new_empty((n, F.packed_words(k, fmt.bits)), dtype=torch.uint32),
        w.new_empty((n, k // g), dtype=sdt),
        w.new_empty((n, k // g) if fmt.has_biases else (0,), dtype=sdt if fmt.has_biases else torch.float32),
        w.new_empty(1 if fmt.has_global_scale else 0, dtype=torch.float32),
    ]


@torch.library.register_fake(f"{NAMESPACE}::fake_quantize")
def _fake_quantize_fake(x, bits):
    check_fake_quantize_args(x, bits)
    return torch.empty_like(x)


@torch.library.register_fake(f"{NAMESPACE}::hadamard")
def _hadamard_fake(x, block):
    check_hadamard_args(x, block)
    return torch.empty_like(x)


@torch.library.register_fake(f"{NAMESPACE}::moe_gemm")
def _moe_gemm_fake(x, expert_ids, weight, scales, biases, global_scale, bias, format, group_size):
    check_moe_gemm_args(x, expert_ids, weight, scales, biases, global_scale, bias, format, group_size)
    return x.new_empty((*x.shape[:-1], weight.shape[1]))


@torch.library.register_fake(f"{NAMESPACE}::moe_gemm_backward")
def _moe_gemm_backward_fake(grad, expert_ids, weight, scales, biases, global_scale, format, group_size,
                            in_features):
    x_like = grad.new_empty((*grad.shape[:-1], in_features))
    check_moe_gemm_args(x_like, expert_ids, weight, scales, biases, global_scale, None, format, group_size)
    return x_like


@torch.library.register_fake(f"{NAMESPACE}::moe_route")
def _moe_route_fake(logits, bias, top_k, mode, renormalize, n_group, topk_group, scaling):
    check_moe_route_args(logits, bias, top_k, mode, renormalize, n_group, topk_group, scaling)
    shape = (*logits.shape[:-1], top_k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int64)
