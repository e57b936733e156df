"""Constant lookup tables as tensors, made once per (values, dtype, device).

The decode / unpack paths index small constant tables (E2M1 and NF code values, 3-bit word
offsets). Building them with ``torch.tensor`` on every call costs a host-to-device copy per call
on CUDA and MPS, and a CUDA graph cannot capture that copy; these are built on first use and
shared afterwards. Callers must not modify them.
"""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=256)
def device_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, cached (read-only by convention)."""
    return torch.tensor(values, dtype=dtype, device=device)


__all__ = ["device_table"]
