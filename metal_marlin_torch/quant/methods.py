"""The ``gptq`` and ``mr-gptq`` methods of :func:`metal_marlin_torch.quantize_model`.

Keyword arguments of ``quantize_model`` used here:

- ``calibration``: anything :func:`~.calibration.load_calibration` takes (None: the default
  standard-library text), ``tokenizer``: the model's tokenizer (needed for text),
- ``device`` (compute device), ``work_dir`` (resume folder), ``progress`` (tqdm).

``QuantConfig.method_options`` keys: ``n_samples``, ``seq_len``, ``calibration_seed`` and the
fields of :class:`~.driver.DriverOptions` / options of :func:`~.gptq.gptq_quantize` (``damp``,
``block_size``, ``act_order``, ``scale_search``, ``rotation_block``, ``rotation_signs``, ...).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..nn.config import LayerPlan, QuantConfig
from ..nn.quantize import register_quantizer
from .calibration import DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_SEQ_LEN, load_calibration
from .driver import DriverOptions, quantize_layerwise


def _layerwise(model: nn.Module, plans: dict[str, LayerPlan], config: QuantConfig, *,
               calibration: Any = None, tokenizer: Any = None, device: Any = None,
               work_dir: Any = None, progress: bool = True,
               expert_plans: dict[str, dict[str, LayerPlan]] | None = None) -> dict[str, Any]:
    opts = config.method_options
    tokens = load_calibration(
        calibration, tokenizer,
        n_samples=int(opts.get("n_samples", DEFAULT_SAMPLES)),
        seq_len=int(opts.get("seq_len", DEFAULT_SEQ_LEN)),
        seed=int(opts.get("calibration_seed", DEFAULT_SEED)),
    )
    options = DriverOptions.from_options(config.method, opts)
    return quantize_layerwise(model, plans, tokens, options, config.dtype_config, device, work_dir, progress,
                              expert_plans=expert_plans)


_layerwise.handles_experts = True  # quantize_model passes expert_plans (per-expert Hessians, .experts)


def register_methods() -> None:
    """Register ``gptq`` and ``mr-gptq`` with :func:`~metal_marlin_torch.nn.register_quantizer`."""
    register_quantizer("gptq", _layerwise)
    register_quantizer("mr-gptq", _layerwise)
