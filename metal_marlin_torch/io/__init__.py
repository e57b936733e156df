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
from .hf_quantizer import MarlinConfig, MarlinHfQuantizer  # registers quant_method "metal_marlin"

__all__ = [
    "FORMAT_VERSION", "QUANT_METHOD", "MarlinConfig", "MarlinHfQuantizer", "layer_table", "load_quantized",
    "read_config", "read_tensors", "save_quantized",
]
