"""Quantization quality: Hadamard rotation, GPTQ, MR-GPTQ, calibration data, quality metrics.

Importing this package registers the ``gptq`` and ``mr-gptq`` methods of
:func:`metal_marlin_torch.quantize_model`, the searched / importance-weighted / refined RTN and
the bit-budget planner, in ``nn.quantize``'s registries; ``metal_marlin_torch`` imports it, and
``nn`` never does (``quant`` sits above ``nn``)::

    from metal_marlin_torch import QuantConfig, quantize_model
    quantize_model(model, QuantConfig(format="fp4", method="mr-gptq"), tokenizer=tok)
"""

from __future__ import annotations

from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, default_calibration_files, load_calibration
from .driver import DriverOptions, find_blocks, quantize_layerwise
from .gptq import GPTQResult, HessianAccumulator, gptq_quantize
from .hadamard import choose_block, hadamard_matrix, random_signs, rotate, rotate_hessian, unrotate
from .methods import register_methods
from .mr_gptq import Rotation, quantize_linear, rotation_for

register_methods()

__all__ = [
    "DEFAULT_SAMPLES", "DEFAULT_SEQ_LEN", "DriverOptions", "GPTQResult", "HessianAccumulator",
    "Rotation", "choose_block", "default_calibration_files", "find_blocks", "gptq_quantize",
    "hadamard_matrix", "load_calibration", "quantize_layerwise", "quantize_linear",
    "random_signs", "register_methods", "rotate", "rotate_hessian", "rotation_for", "unrotate",
]
