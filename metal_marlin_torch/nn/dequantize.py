"""``dequantize_model``: a quantized model back to dense ``nn.Linear`` layers.

The way out of the package: for exporting to tools that take dense weights, for fine-tuning
from the quantized values, or for measuring what quantization changed. Each
:class:`MarlinLinear` becomes the ``nn.Linear`` of :meth:`MarlinLinear.dequantize` (the same
function, rotation folded back). :class:`MarlinExperts` (fused MoE experts) replaced a model
class's own experts module whose class is not kept, so a model holding them is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from .experts import MarlinExperts
from .linear import MarlinLinear
from .quantize import replace_module


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every :class:`MarlinLinear` of ``model`` by a dense ``nn.Linear``, in place.

    Args:
        model: a model with quantized layers (``quantize_model``, ``load_quantized``,
            ``from_pretrained`` of a metal_marlin checkpoint, ``import_mlx``/``import_gguf``).
        dtype: dtype of the dense weights (None: each layer's activation dtype).

    Returns:
        ``model``; a transformers model also loses its ``quantization_config`` (it is dense now).
    """
    experts = [n for n, m in model.named_modules() if isinstance(m, MarlinExperts)]
    if experts:
        raise ValueError(f"dequantize_model: fused MoE experts cannot be dequantized back into the model's own "
                         f"experts module (its class is not kept); found {len(experts)}, e.g. {experts[0]!r}")
    if isinstance(model, MarlinLinear):
        raise TypeError("dequantize_model: model is a single MarlinLinear; use its .dequantize() instead")
    for name, m in list(model.named_modules()):
        if isinstance(m, MarlinLinear):
            replace_module(model, name, m.dequantize(dtype))
    # what transformers' HfQuantizer.remove_quantization_config does, so that save_pretrained
    # writes a plain dense checkpoint
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    return model
