"""``attn_implementation="marlin_kv"``: decode attention straight from a TurboQuant cache.

With ``make_cache(model.config, method="turboquant", fused=True)`` the cache layers keep only
codes and norms and hand the attention function the layer itself (tagged on the new key
states) instead of dequantized keys and values. This attention function then

- for a decode step (one query token, no padding mask) runs ``marlin::kv_attention`` on the
  codes: rotate q, score against the rotated keys, un-rotate ``Σ p·v̂`` (the Metal kernel on
  MPS, flash-decoding, no dequantized copy; the pure-torch op elsewhere), query heads grouped
  by their KV head (GQA);
- otherwise (prefill, chunks, padding) dequantizes the layer's cache and runs transformers'
  sdpa attention on it, so results equal the unfused cache's.

    from metal_marlin_torch.kv import make_cache
    model.set_attn_implementation("marlin_kv")
    cache = make_cache(model.config, method="turboquant", bits=4, fused=True)
    model.generate(**inputs, past_key_values=cache)
"""

from __future__ import annotations

import torch

ATTN_IMPLEMENTATION = "marlin_kv"
LAYER_ATTR = "_marlin_kv_layer"


def quantized_kv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                           **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: ``query [B, Hq, q_len, D]`` -> ``[B, q_len, Hq, D]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .ops import rotated_attention

    layer = getattr(key, LAYER_ATTR, None)
    if layer is None:
        raise ValueError(f"attn_implementation={ATTN_IMPLEMENTATION!r} needs the cache of "
                         "make_cache(config, method='turboquant', fused=True) as past_key_values")
    b, hq, q_len, d = query.shape
    length = layer.cumulative_length
    if q_len == 1 and attention_mask is None and dropout == 0.0:
        hk = layer.num_heads
        ks, vs = layer.key_store, layer.value_store
        q_rows = query.reshape(b * hk, hq // hk, d)  # query head h reads KV head h // (Hq / Hk)
        scale = scaling if scaling is not None else d ** -0.5
        out = rotated_attention(q_rows, ks.packed, ks.norms, vs.packed, vs.norms, ks.codebook, length, ks.bits, scale)
        return out.reshape(b, hq, 1, d).transpose(1, 2), None
    k, v = layer._read(length)
    return sdpa_attention_forward(module, query, k, v, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def register() -> None:
    """Make ``"marlin_kv"`` a transformers attention implementation (with sdpa's masks)."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, quantized_kv_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
