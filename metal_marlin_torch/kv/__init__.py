"""Quantized KV caches: FP8 E4M3 and TurboQuant-style rotated Lloyd–Max codebooks (docs/KV_CACHE.md).

    from metal_marlin_torch.kv import make_cache
    cache = make_cache(model.config, method="turboquant", bits=4)     # or DTypeConfig(kv_cache="fp8")
    model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

from . import attention
from .attention import ATTN_IMPLEMENTATION, quantized_kv_attention
from .cache import METHODS, make_cache, store_for
from .codebook import expected_mse, lloyd_max_codebook
from .layers import QuantizedKVCache, QuantizedKVLayer, StaticQuantizedKVLayer
from .ops import kv_attention, kv_dequantize, kv_dequantize_seq, kv_quantize, rotated_attention
from .stores import CastStore, FP8Store, KVStore, TurboQuantStore

attention.register()  # attn_implementation="marlin_kv" (fused decode from a TurboQuant cache)

__all__ = [
    "ATTN_IMPLEMENTATION", "METHODS", "CastStore", "FP8Store", "KVStore", "QuantizedKVCache", "QuantizedKVLayer",
    "StaticQuantizedKVLayer", "TurboQuantStore", "expected_mse", "kv_attention", "kv_dequantize",
    "kv_dequantize_seq", "kv_quantize", "lloyd_max_codebook", "make_cache", "quantized_kv_attention",
    "rotated_attention", "store_for",
]
