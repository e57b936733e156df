"""metal_marlin_torch: quantized LLM weights for PyTorch.

One call quantizes a model's Linear layers in place; they run through ``torch.ops.marlin.*``
(Metal kernels on MPS when the compiled extension is present, pure torch on CPU and CUDA)::

    from metal_marlin_torch import QuantConfig, quantize_model
    summary = quantize_model(model, QuantConfig(format="fp4", group_size=128))
"""

from __future__ import annotations

from . import (
    ops,  # noqa: F401  (registers torch.ops.marlin.*)
    quant,  # noqa: F401  (registers GPTQ, MR-GPTQ, the RTN variants and the bit budget with nn)
)
from ._peft_hook import install as _install_peft_hook
from .backend import backend_info
from .dtypes import (
    DTypeConfig,
    bf16_config,
    fp16_config,
    get_default_config,
    high_precision_config,
    memory_efficient_config,
    reset_default_config,
    set_default_config,
)
from .io import MarlinConfig, load_quantized, save_quantized
from .nn import MarlinExperts, MarlinLinear, QuantConfig, QuantizeSummary, dequantize_model, quantize_model

_install_peft_hook()  # LoRA through peft on MarlinLinear (nn/lora.py), once peft is imported

__version__ = "0.1.0"

__all__ = [
    "DTypeConfig", "MarlinConfig", "MarlinExperts", "MarlinLinear", "QuantConfig", "QuantizeSummary", "backend_info",
    "bf16_config", "dequantize_model", "fp16_config", "get_default_config", "high_precision_config",
    "load_quantized", "memory_efficient_config", "quantize_model", "reset_default_config",
    "save_quantized", "set_default_config",
]
