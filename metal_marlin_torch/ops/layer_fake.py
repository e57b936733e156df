"""Fake (meta) kernels of the decoder-layer ops (ops/layer.py), of sample (ops/sampling.py) and
of attention (ops/attention.py): shapes and dtypes for ``torch.compile``, after the same argument
checks as the pure-torch kernels."""

from __future__ import annotations

import torch

from .attention import check_attention_args, check_attention_fp8_args, check_attention_paged_args
from .layer import check_act_args, check_norm_args, check_rope_args
from .library import NAMESPACE
from .sampling import check_sample_args


@torch.library.register_fake(f"{NAMESPACE}::rms_norm")
def _rms_norm_fake(x, weight, residual, eps):
    check_norm_args("marlin.rms_norm", x, weight, None, residual, eps)
    return [torch.empty_like(x)] if residual is None else [torch.empty_like(x), torch.empty_like(x)]


@torch.library.register_fake(f"{NAMESPACE}::layer_norm")
def _layer_norm_fake(x, weight, bias, residual, eps):
    check_norm_args("marlin.layer_norm", x, weight, bias, residual, eps)
    return [torch.empty_like(x)] if residual is None else [torch.empty_like(x), torch.empty_like(x)]


def _act_fake(where: str):
    def fake(gate, up):
        inter = check_act_args(where, gate, up)
        return gate.new_empty((*gate.shape[:-1], inter))

    return fake


torch.library.register_fake(f"{NAMESPACE}::silu_mul")(_act_fake("marlin.silu_mul"))
torch.library.register_fake(f"{NAMESPACE}::gelu_mul")(_act_fake("marlin.gelu_mul"))


@torch.library.register_fake(f"{NAMESPACE}::rope")
def _rope_fake(q, k, positions, inv_freq, scaling, interleaved):
    check_rope_args(q, k, positions, inv_freq)
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{NAMESPACE}::sample")
def _sample_fake(logits, uniforms, prev_tokens, repetition_penalty, temperature, top_k, top_p, min_p):
    check_sample_args(logits, uniforms, prev_tokens, repetition_penalty, temperature, top_k, top_p, min_p)
    return logits.new_empty((logits.shape[0],), dtype=torch.int64)


@torch.library.register_fake(f"{NAMESPACE}::attention")
def _attention_fake(q, k, v, scale, causal, window):
    check_attention_args(q, k, v, scale, causal, window)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{NAMESPACE}::attention_fp8")
def _attention_fp8_fake(q, k, k_scales, v, v_scales, scale, causal, window):
    check_attention_fp8_args(q, k, k_scales, v, v_scales, window)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{NAMESPACE}::attention_paged")
def _attention_paged_fake(q, k_pages, v_pages, block_table, seq_k, scale, causal, window):
    check_attention_paged_args(q, k_pages, v_pages, block_table, seq_k, window)
    return torch.empty_like(q, memory_format=torch.contiguous_format)
