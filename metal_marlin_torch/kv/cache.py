"""``make_cache``: the one call that builds a quantized KV cache for ``generate()``."""

from __future__ import annotations

from typing import Any

import torch

from ..dtypes import DTypeConfig, resolve
from ..ops.kv import check_bits
from .layers import QuantizedKVCache, QuantizedKVLayer, StaticQuantizedKVLayer
from .stores import CastStore, FP8Store, KVStore, TurboQuantStore

METHODS = ("fp8", "turboquant", "bf16", "fp16")


def store_for(method: str, bits: int = 4) -> tuple[type[KVStore], dict[str, Any]]:
    """The store class and its options for a cache ``method``."""
    if method == "fp8":
        return FP8Store, {}
    if method == "turboquant":
        check_bits("make_cache", bits)
        return TurboQuantStore, {"bits": bits}
    if method in ("bf16", "fp16"):
        return CastStore, {"dtype": torch.bfloat16 if method == "bf16" else torch.float16}
    raise ValueError(f"make_cache: method must be one of {METHODS}, got {method!r}")


def make_cache(
    config: Any,
    dtype_config: DTypeConfig | None = None,
    *,
    method: str | None = None,
    bits: int = 4,
    max_cache_len: int | None = None,
    fused: bool = False,
) -> QuantizedKVCache:
    """A KV cache for a decoder whose layers all use full attention.

    Args:
        config: the model's ``PretrainedConfig`` (its text config is used).
        dtype_config: picks the storage when ``method`` is None: ``kv_cache="fp8"`` gives the FP8
            cache, ``"bf16"``/``"fp16"`` plain 16-bit storage. None: the process-wide default.
        method: ``"fp8"``, ``"turboquant"``, ``"bf16"`` or ``"fp16"``; overrides ``dtype_config``.
        bits: TurboQuant code width (4, 5, 6 or 8).
        max_cache_len: preallocate this many positions (the compile-friendly static layers);
            None grows on demand.
        fused: TurboQuant only: decode steps run ``marlin::kv_attention`` on the codes instead of
            attending over dequantized keys and values; needs
            ``model.set_attn_implementation("marlin_kv")`` (kv/attention.py).

    Example::

        cache = make_cache(model.config, method="turboquant", bits=4)
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=32)
    """
    if method is None:
        method = resolve(dtype_config).kv_cache
    store_cls, options = store_for(method, bits)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    other = sorted(set(layer_types) - {"full_attention"})
    if other:
        raise ValueError(f"make_cache: only full-attention layers are supported, the config also has {other}")
    if fused and (method != "turboquant" or max_cache_len is not None):
        raise ValueError(f"make_cache: fused=True needs method='turboquant' and no max_cache_len, "
                         f"got method={method!r}, max_cache_len={max_cache_len!r}")
    if fused:
        layers = [QuantizedKVLayer(store_cls, fused_config=text, **options) for _ in layer_types]
    elif max_cache_len is None:
        layers = [QuantizedKVLayer(store_cls, **options) for _ in layer_types]
    else:
        layers = [StaticQuantizedKVLayer(max_cache_len, store_cls, **options) for _ in layer_types]
    return QuantizedKVCache(layers)
