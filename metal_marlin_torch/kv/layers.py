"""Quantized KV caches as ``transformers.cache_utils`` layers, for ``generate(past_key_values=...)``.

Each layer quantizes keys and values on append into a :class:`~.stores.KVStore` and returns the
dequantized states (original domain, model dtype) for the model's own attention, so it works
with every attention implementation (eager, sdpa). Only the quantized bytes persist between
steps. Batch and KV heads are folded into the store's rows (``[B * H, positions, D]``), which is
the layout of the ``marlin::kv_*`` ops.

- :class:`QuantizedKVLayer` follows ``DynamicLayer``: it grows (capacity doubles, bytes are
  copied, nothing is re-quantized).
- :class:`StaticQuantizedKVLayer` follows ``StaticLayer``: buffers preallocated for
  ``max_cache_len`` positions, positions written through a tensor counter, so the update has no
  data-dependent Python control flow and traces under ``torch.compile``.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer

from .stores import KVStore

_INITIAL_CAPACITY = 256


def _rows(states: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]`` -> ``[B * H, S, D]``."""
    b, h, s, d = states.shape
    return states.reshape(b * h, s, d)


class _StoreMixin:
    """Shared by the dynamic and the static layer: two stores and their batch bookkeeping."""

    store_cls: type[KVStore]
    store_options: dict[str, Any]
    key_store: KVStore | None
    value_store: KVStore | None

    def _make_stores(self, key_states: torch.Tensor, value_states: torch.Tensor, capacity: int) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        rows = self.batch_size * self.num_heads
        self.key_store = self.store_cls(rows, capacity, self.k_head_dim, self.device, **self.store_options)
        self.value_store = self.store_cls(rows, capacity, self.v_head_dim, self.device, **self.store_options)

    def _read(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        b, h = self.batch_size, self.num_heads
        k = self.key_store.read(n, self.dtype).view(b, h, n, self.k_head_dim)
        v = self.value_store.read(n, self.dtype).view(b, h, n, self.v_head_dim)
        return k, v

    def _select_batch(self, batch_index: torch.Tensor) -> None:
        """Rows of the new batch: ``batch_index`` [B'] into the old batch dimension."""
        h = self.num_heads
        rows = (batch_index.to(self.device).view(-1, 1) * h + torch.arange(h, device=self.device)).view(-1)
        for store in (self.key_store, self.value_store):
            store.select_rows(rows)
        self.batch_size = int(batch_index.numel())

    def nbytes(self) -> int:
        """Bytes held by the quantized storage of this layer (keys + values)."""
        if self.key_store is None:
            return 0
        return self.key_store.nbytes() + self.value_store.nbytes()


class QuantizedKVLayer(_StoreMixin, DynamicLayer):
    """A growing KV-cache layer that stores keys and values in ``store_cls`` (quantize on append).

    Args:
        store_cls: :class:`~.stores.FP8Store`, :class:`~.stores.TurboQuantStore` or
            :class:`~.stores.CastStore`.
        **store_options: passed to the store (``bits=`` for TurboQuant, ``dtype=`` for Cast).
    """

    def __init__(self, store_cls: type[KVStore], fused_config: Any = None, **store_options: Any) -> None:
        super().__init__()
        self.store_cls, self.store_options = store_cls, store_options
        self.key_store = self.value_store = None
        self.cumulative_length = 0
        # fused: the model's config, whose attention implementation must be "marlin_kv"
        # (kv/attention.py); update then returns the new states tagged with this layer
        self.fused_config = fused_config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.store_cls.__name__}, {self.store_options})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._make_stores(key_states, value_states, _INITIAL_CAPACITY)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the new states into the cache; return all cached states, dequantized."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, n = self.cumulative_length, key_states.shape[-2]
        end = start + n
        if end > self.key_store.capacity:
            capacity = max(end, 2 * self.key_store.capacity)
            self.key_store.resize(capacity, start)
            self.value_store.resize(capacity, start)
        positions = torch.arange(start, end, device=self.device)
        self.key_store.write(_rows(key_states), positions)
        self.value_store.write(_rows(value_states), positions)
        self.cumulative_length = end
        if self.fused_config is not None:
            return self._tagged(key_states), value_states
        return self._read(end)

    def _tagged(self, key_states: torch.Tensor) -> torch.Tensor:
        from .attention import ATTN_IMPLEMENTATION, LAYER_ATTR

        impl = getattr(self.fused_config, "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            raise ValueError(f"a fused quantized KV cache needs the model's attn_implementation to be "
                             f"{ATTN_IMPLEMENTATION!r} (model.set_attn_implementation), got {impl!r}")
        tagged = key_states.view(key_states.shape)
        setattr(tagged, LAYER_ATTR, self)
        return tagged

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def reset(self) -> None:
        self.key_store = self.value_store = None
        self.keys = self.values = None
        self.is_initialized = False
        self.cumulative_length = 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers' negative convention)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop: tokens_to_remove must be <= 0 (tokens to drop, negated), got {tokens_to_remove}")
        if self.is_initialized:
            self.cumulative_length = max(self.cumulative_length + tokens_to_remove, 0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_batch(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch_size).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._select_batch(torch.arange(self.batch_size)[indices])

    def offload(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support offloading")

    def prefetch(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support offloading")


class StaticQuantizedKVLayer(_StoreMixin, CacheLayerMixin):
    """A preallocated quantized KV-cache layer of ``max_cache_len`` positions (``StaticLayer``
    pattern): returns all ``max_cache_len`` positions each step (the attention mask hides the
    unwritten ones, which dequantize to zeros), counts positions in a tensor, and marks its
    buffers as static addresses, so a compiled decode step neither breaks nor recompiles."""

    is_compileable = True
    is_sliding = False

    def __init__(self, max_cache_len: int, store_cls: type[KVStore], **store_options: Any) -> None:
        super().__init__()
        if not isinstance(max_cache_len, int) or max_cache_len < 1:
            raise ValueError(f"StaticQuantizedKVLayer: max_cache_len must be an int >= 1, got {max_cache_len!r}")
        self.max_cache_len = max_cache_len
        self.store_cls, self.store_options = store_cls, store_options
        self.key_store = self.value_store = None
        self.cumulative_length = torch.tensor(0, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.max_cache_len}, {self.store_cls.__name__}, {self.store_options})"

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self._make_stores(key_states, value_states, self.max_cache_len)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for store in (self.key_store, self.value_store):
                for t in store.tensors().values():
                    torch._dynamo.mark_static_address(t)
            torch._dynamo.mark_static_address(self.cumulative_length)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize the new states at the next positions; return all ``max_cache_len`` positions."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        positions = torch.arange(n, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(n)
        self.key_store.write(_rows(key_states), positions)
        self.value_store.write(_rows(value_states), positions)
        return self._read(self.max_cache_len)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length if self.is_initialized else 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            for store in (self.key_store, self.value_store):
                for t in store.tensors().values():
                    t.zero_()
        self.cumulative_length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            self._select_batch(beam_idx)

    def offload(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support offloading")

    def prefetch(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support offloading")


class QuantizedKVCache(Cache):
    """A :class:`transformers.cache_utils.Cache` of one quantized layer per decoder layer.

    Use :func:`~metal_marlin_torch.kv.make_cache` rather than this constructor.
    """

    def __init__(self, layers: list[CacheLayerMixin]) -> None:
        super().__init__(layers=layers)

    def nbytes(self) -> int:
        """Bytes held by all layers' quantized storage."""
        return sum(layer.nbytes() for layer in self.layers)
