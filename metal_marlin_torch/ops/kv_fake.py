"""Fake (meta) kernels of the quantized-KV-cache ops: shapes and dtypes, for ``torch.compile``.

They run the same argument checks as the pure-torch kernels (everything that does not read
tensor data), so a bad call fails while tracing, not later on the device.
"""

from __future__ import annotations

import torch

from .kv import check_cache, check_out, check_quantize_args
from .library import NAMESPACE


@torch.library.register_fake(f"{NAMESPACE}::kv_quantize")
def _kv_quantize_fake(x, positions, packed, norms, codebook, bits):
    check_quantize_args(x, positions, packed, norms, codebook, bits)


@torch.library.register_fake(f"{NAMESPACE}::kv_dequantize")
def _kv_dequantize_fake(packed, norms, codebook, pos, bits):
    h, _, d = check_cache("marlin.kv_dequantize", packed, norms, codebook, bits)
    return packed.new_empty((h, d), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::kv_dequantize_out")
def _kv_dequantize_out_fake(packed, norms, codebook, pos, bits, out):
    h, _, d = check_cache("marlin.kv_dequantize_out", packed, norms, codebook, bits)
    check_out("marlin.kv_dequantize_out", out, h * d, packed.device)


@torch.library.register_fake(f"{NAMESPACE}::kv_dequantize_seq")
def _kv_dequantize_seq_fake(packed, norms, codebook, start, n, bits):
    h, _, d = check_cache("marlin.kv_dequantize_seq", packed, norms, codebook, bits)
    return packed.new_empty((h, n, d), dtype=torch.float32)


@torch.library.register_fake(f"{NAMESPACE}::kv_dequantize_seq_out")
def _kv_dequantize_seq_out_fake(packed, norms, codebook, start, n, bits, out):
    h, _, d = check_cache("marlin.kv_dequantize_seq_out", packed, norms, codebook, bits)
    check_out("marlin.kv_dequantize_seq_out", out, h * n * d, packed.device)


@torch.library.register_fake(f"{NAMESPACE}::kv_attention")
def _kv_attention_fake(q, k_packed, k_norms, v_packed, v_norms, codebook, length, bits, scale):
    check_cache("marlin.kv_attention (keys)", k_packed, k_norms, codebook, bits)
    return q.new_empty(q.shape, dtype=torch.float32)
