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

from ..dtypes import resolve
from ..nn.config import LayerPlan, QuantConfig
from ..nn.quantize import QUANTIZERS, register_budget_planner, register_quantizer, replace_module
from .budget import plan_budget
from .calibration import DEFAULT_SAMPLES, DEFAULT_SEED, DEFAULT_SEQ_LEN, load_calibration
from .driver import DriverOptions, quantize_layerwise
from .mr_gptq import quantize_linear


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
    options = DriverOptions.from_options(config.method, _driver_options(config))
    if config.refine != "model":
        return quantize_layerwise(model, plans, tokens, options, config.dtype_config, device, work_dir, progress,
                                  expert_plans=expert_plans)
    # whole-model refinement: the dense teacher's outputs first (the method overwrites the model)
    from .refine_model import ModelRefineOptions, refine_model, teacher_outputs  # noqa: PLC0415

    refine_opts = ModelRefineOptions.from_method_options(opts)  # bad options fail before the long run
    teacher = teacher_outputs(model, tokens, refine_opts.topk, device=device)
    report = quantize_layerwise(model, plans, tokens, options, config.dtype_config, device, work_dir, progress,
                                expert_plans=expert_plans)
    report["refine_model"] = refine_model(model, tokens, teacher, refine_opts, work_dir, progress, device)
    return report


_layerwise.handles_experts = True  # quantize_model passes expert_plans (per-expert Hessians, .experts)


def _driver_options(config: QuantConfig) -> dict[str, Any]:
    opts = dict(config.method_options)
    if config.refine == "model":  # the whole-model stage's keys are not the driver's
        from .refine_model import OPTION_KEYS  # noqa: PLC0415

        return {k: v for k, v in opts.items() if k not in OPTION_KEYS}
    if config.refine:
        opts["refine"] = True
    return opts


def rtn_layers(model: nn.Module, plans: dict[str, LayerPlan], config: QuantConfig, **kwargs: Any) -> dict[str, Any]:
    """``method="rtn"`` with ``method_options`` ``scale_search`` / ``imatrix`` or with
    ``QuantConfig.refine``: RTN with the MSE scale search (:mod:`.rtn`), importance-weighted by
    the calibration inputs' ``diag(X^T X)`` with ``imatrix``, refined with ``refine``. Without
    ``imatrix`` and ``refine`` it needs no calibration data and runs layer by layer."""
    opts = _driver_options(config)
    if opts.get("imatrix") or opts.get("refine") or config.refine == "model":
        return _layerwise(model, plans, config, **kwargs)
    options = DriverOptions.from_options("rtn", opts)
    gptq = {**options.gptq, "rtn": True}
    dcfg = resolve(config.dtype_config)
    for name, plan in plans.items():
        replace_module(model, name, quantize_linear(model.get_submodule(name), plan, dcfg, None, None, gptq))
    return {"rtn_layers": list(plans)}


def wants_rtn_layers(config: QuantConfig) -> bool:
    """Whether ``method="rtn"`` needs :func:`rtn_layers` rather than the formats' plain RTN."""
    opts = config.method_options
    return config.method == "rtn" and bool(config.refine or opts.get("imatrix") or opts.get("refine")
                                           or opts.get("scale_search"))


_plain_rtn = QUANTIZERS["rtn"]  # nn.quantize's own RTN, before register_methods replaces the entry


def _rtn_method(model: nn.Module, plans: dict[str, LayerPlan], config: QuantConfig,
                **kwargs: Any) -> dict[str, Any] | None:
    """``method="rtn"``: the formats' plain RTN (``nn.quantize``), or :func:`rtn_layers` when
    the config asks for the scale search, the importance matrix or refinement."""
    if wants_rtn_layers(config):
        return rtn_layers(model, plans, config, **kwargs)
    return _plain_rtn(model, plans, config, **kwargs)


def register_methods() -> None:
    """Register ``gptq``, ``mr-gptq``, the RTN variants and the bit-budget planner with
    :mod:`metal_marlin_torch.nn.quantize` (``nn`` never imports ``quant``)."""
    register_quantizer("gptq", _layerwise)
    register_quantizer("mr-gptq", _layerwise)
    register_quantizer("autoround", _layerwise)  # learned rounding after GPTQ or RTN (.autoround)
    register_quantizer("rtn", _rtn_method)
    register_budget_planner(plan_budget)
