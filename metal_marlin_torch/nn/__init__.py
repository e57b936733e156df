"""Modules: :class:`MarlinLinear` and the one call :func:`quantize_model`."""

from .config import DEFAULT_EXCLUDE, MIXED_4_3_RULES, LayerPlan, QuantConfig
from .dequantize import dequantize_model
from .experts import MarlinExperts, plan_experts
from .fuse import OutputSlice, concat_layers, fuse_projections, unfuse_projections
from .layers import MarlinGatedMLP, MarlinRMSNorm, patch_layers
from .linear import MarlinLinear
from .quantize import (
    QUANTIZERS,
    QuantizeSummary,
    plan_layers,
    quantize_model,
    register_quantizer,
    replace_module,
)
from .router import MarlinRouter, RouteSpec, convert_routers

__all__ = [
    "DEFAULT_EXCLUDE", "MIXED_4_3_RULES", "QUANTIZERS", "LayerPlan", "MarlinExperts", "MarlinLinear",
    "QuantConfig", "QuantizeSummary", "plan_experts", "plan_layers", "quantize_model", "register_quantizer",
    "replace_module",
    "dequantize_model",
    "MarlinGatedMLP", "MarlinRMSNorm", "patch_layers",
    "MarlinRouter", "RouteSpec", "convert_routers",
    "OutputSlice", "concat_layers", "fuse_projections", "unfuse_projections",
]
