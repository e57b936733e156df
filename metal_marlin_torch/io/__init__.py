"""Checkpoints (safetensors + config.json), transformers integration, importers."""

from .checkpoint import (
    FORMAT_VERSION,
    QUANT_METHOD,
    layer_table,
    load_quantized,
    read_config,
    read_tensors,
    save_quantized,
)

__all__ = [
    "FORMAT_VERSION", "QUANT_METHOD", "layer_table", "load_quantized", "read_config",
    "read_tensors", "save_quantized",
]
