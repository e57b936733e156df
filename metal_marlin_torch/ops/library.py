"""The ``marlin`` operator namespace: every schema, defined once.

Schemas use ``torch.library.define`` + ``impl`` (lower per-call overhead than ``custom_op``).
Backends only add kernels for these names: the pure-torch kernels in :mod:`.reference`
(CPU, CUDA), the Metal kernels of the compiled extension (MPS), the emulator (``marlin_emu``).
"""

from __future__ import annotations

import torch

NAMESPACE = "marlin"
LIB = torch.library.Library(NAMESPACE, "DEF")

SCHEMAS: dict[str, str] = {
    "gemm": (
        "gemm(Tensor x, Tensor weight, Tensor scales, Tensor? biases, Tensor? global_scale, "
        "Tensor? bias, str format, int group_size) -> Tensor"
    ),
    # a layer in the CUDA kernels' layout (docs/CUDA.md §1: K-major weight, [n_groups, N]
    # scales and biases), what MarlinLinear calls once it holds that layout (issue 24)
    "gemm_prepared": (
        "gemm_prepared(Tensor x, Tensor weight, Tensor scales, Tensor? biases, Tensor? bias, "
        "str format, int group_size, int in_features, int out_features) -> Tensor"
    ),
    "dequantize": (
        "dequantize(Tensor weight, Tensor scales, Tensor? biases, Tensor? global_scale, "
        "str format, int group_size, int in_features, ScalarType dtype) -> Tensor"
    ),
    "quantize": "quantize(Tensor w, str format, int group_size, ScalarType scale_dtype) -> Tensor[]",
    "fake_quantize": "fake_quantize(Tensor x, int bits) -> Tensor",
    "hadamard": "hadamard(Tensor x, int block) -> Tensor",
    # mixture of experts: row m of x times expert expert_ids[m] of 3-D weights [E, N, words]
    "moe_gemm": (
        "moe_gemm(Tensor x, Tensor expert_ids, Tensor weight, Tensor scales, Tensor? biases, "
        "Tensor? global_scale, Tensor? bias, str format, int group_size) -> Tensor"
    ),
    # its gradient w.r.t. x: grad_x[m] = grad[m] @ dequant(weight[expert_ids[m]]) -> [M, in_features]
    "moe_gemm_backward": (
        "moe_gemm_backward(Tensor grad, Tensor expert_ids, Tensor weight, Tensor scales, Tensor? biases, "
        "Tensor? global_scale, str format, int group_size, int in_features) -> Tensor"
    ),
    # router logits [..., E] -> (weights float32 [..., top_k], ids int64 [..., top_k]) (ops/moe_route.py)
    "moe_route": (
        "moe_route(Tensor logits, Tensor? bias, int top_k, str mode, bool renormalize, int n_group, "
        "int topk_group, float scaling) -> (Tensor, Tensor)"
    ),
    # quantized KV cache (ops/kv.py, docs/KV_CACHE.md)
    "kv_quantize": (
        "kv_quantize(Tensor x, Tensor positions, Tensor(a!) packed, Tensor(b!) norms, Tensor codebook, "
        "int bits) -> ()"
    ),
    "kv_dequantize": "kv_dequantize(Tensor packed, Tensor norms, Tensor codebook, SymInt pos, int bits) -> Tensor",
    "kv_dequantize_out": (
        "kv_dequantize_out(Tensor packed, Tensor norms, Tensor codebook, SymInt pos, int bits, "
        "Tensor(a!) out) -> ()"
    ),
    "kv_dequantize_seq": (
        "kv_dequantize_seq(Tensor packed, Tensor norms, Tensor codebook, SymInt start, SymInt n, int bits) -> Tensor"
    ),
    "kv_dequantize_seq_out": (
        "kv_dequantize_seq_out(Tensor packed, Tensor norms, Tensor codebook, SymInt start, SymInt n, int bits, "
        "Tensor(a!) out) -> ()"
    ),
    "kv_attention": (
        "kv_attention(Tensor q, Tensor k_packed, Tensor k_norms, Tensor v_packed, Tensor v_norms, Tensor codebook, "
        "SymInt length, int bits, float scale) -> Tensor"
    ),
    # decoder-layer ops (ops/layer.py, issue 22): norms with an optional fused residual add
    # (returns [y] or [y, x + residual]), gated activations (up=None: gate is [..., 2I]), RoPE
    "rms_norm": "rms_norm(Tensor x, Tensor weight, Tensor? residual, float eps) -> Tensor[]",
    "layer_norm": "layer_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) -> Tensor[]",
    "silu_mul": "silu_mul(Tensor gate, Tensor? up) -> Tensor",
    "gelu_mul": "gelu_mul(Tensor gate, Tensor? up) -> Tensor",
    "rope": (
        "rope(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, float scaling, bool interleaved) "
        "-> (Tensor, Tensor)"
    ),
    # token sampling (ops/sampling.py): one uniform draw per row -> int64 [B]
    "sample": (
        "sample(Tensor logits, Tensor uniforms, Tensor? prev_tokens, float repetition_penalty, float temperature, "
        "int top_k, float top_p, float min_p) -> Tensor"
    ),
    # attention over fp16/bf16/fp32 K/V (ops/attention.py): GQA, causal, sliding window (0 = none)
    "attention": "attention(Tensor q, Tensor k, Tensor v, float scale, bool causal, int window) -> Tensor",
    # attention over K/V held as FP8 E4M3 codes (uint8) + float32 scales per token and head (ops/attention.py)
    "attention_fp8": (
        "attention_fp8(Tensor q, Tensor k, Tensor k_scales, Tensor v, Tensor v_scales, float scale, bool causal, "
        "int window) -> Tensor"
    ),
    # attention over paged K/V: pages [num_pages, Hk, P, D] + int32 block table [B, pages] (ops/attention.py)
    "attention_paged": (
        "attention_paged(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, int seq_k, float scale, "
        "bool causal, int window) -> Tensor"
    ),
}

for _schema in SCHEMAS.values():
    LIB.define(_schema)
