"""Weight formats (docs/FORMAT.md): value grids, round-to-nearest quantization, packing.

Pure torch, vectorized, any device; also the oracle every kernel is tested against.

    >>> from metal_marlin_torch import formats
    >>> qt = formats.quantize(w, "fp4", group_size=128)
    >>> w_hat = formats.dequantize(qt, torch.bfloat16)
"""

from __future__ import annotations

import torch

from .base import (
    PER_CHANNEL,
    STANDARD_GROUPS,
    GroupParams,
    QuantizedTensor,
    WeightFormat,
    resolve_group_size,
)
from .fp4 import E2M1_VALUES, FP4, MXFP4, NVFP4
from .fp8 import FP8E4M3, FP8E5M2
from .integer import INT2, INT3, INT4, INT5, INT6, INT8
from .nf import NF3, NF3_VALUES, NF4, NF4_VALUES
from .packing import pack, packed_words, unpack

FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (FP4(), MXFP4(), NVFP4(), INT8(), INT4(), INT3(), INT2(), NF4(), NF3(),
              FP8E4M3(), FP8E5M2(), INT6(), INT5())
}


def get_format(name: str) -> WeightFormat:
    """The :class:`WeightFormat` called ``name``; unknown names raise ``ValueError``."""
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown format {name!r}; expected one of {sorted(FORMATS)}") from None


def quantize(
    w: torch.Tensor, format: str, group_size: int = 128, scale_dtype: torch.dtype = torch.float16
) -> QuantizedTensor:
    """Round-to-nearest quantize ``w [N, K]`` to ``format`` (see :meth:`WeightFormat.quantize`)."""
    return get_format(format).quantize(w, group_size, scale_dtype)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W_hat [N, K]`` of a :class:`QuantizedTensor`."""
    return get_format(qt.format).dequantize(qt, dtype)


def default_group_size(format: str) -> int:
    """128 where the format allows it, else its only group size (mxfp4: 32, nvfp4: 16)."""
    fmt = get_format(format)
    return 128 if 128 in fmt.group_sizes else fmt.group_sizes[0]


__all__ = [
    "E2M1_VALUES", "FORMATS", "NF3_VALUES", "NF4_VALUES", "PER_CHANNEL", "STANDARD_GROUPS",
    "GroupParams", "QuantizedTensor", "WeightFormat", "default_group_size", "dequantize",
    "get_format", "pack", "packed_words", "quantize", "resolve_group_size", "unpack",
]
