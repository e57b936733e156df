"""`quantize_model`: one call that replaces a model's ``nn.Linear`` layers in place."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from .. import formats as F
from .._memory import release_freed_memory
from ..dtypes import resolve
from .config import LayerPlan, QuantConfig
from .experts import MarlinExperts, plan_experts
from .linear import MarlinLinear
from .router import convert_routers

log = logging.getLogger("metal_marlin_torch")


@dataclass
class QuantizeSummary:
    """What :func:`quantize_model` did.

    Attributes:
        layers: converted module name -> ``(format, group_size)``.
        skipped: selected layers left as they were -> reason (shape the format cannot take).
        bytes_before: bytes of the converted layers' weights and biases before.
        bytes_after: the same layers' bytes after (packed codes, scales, biases).
        quant_bits: stored bits of the converted ``nn.Linear`` layers' and MoE experts' codes,
            scales, biases, global scales and rotation signs (not their own bias vectors): what
            a bit budget counts.
        quant_weights: number of weights of those layers and experts.
        budget: the allocation (``quant.budget.BudgetPlan``) when the config has a bit budget.
        routers: MoE routers swapped for :class:`~.router.MarlinRouter` (``marlin::moe_route``).
        kept_routers: routers of converted MoE blocks left on transformers' code -> reason.
        method_report: what the method returned (GPTQ: ``quantize_layerwise``'s report, with
            ``experts``: rows per expert and the experts that fell back to round to nearest).
    """

    layers: dict[str, tuple[str, int]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0
    quant_bits: int = 0
    quant_weights: int = 0
    budget: Any = None
    routers: list[str] = field(default_factory=list)
    kept_routers: dict[str, str] = field(default_factory=dict)
    method_report: dict[str, Any] = field(default_factory=dict)

    @property
    def compression(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else 1.0

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the converted layers and experts (see ``quant_bits``)."""
        return self.quant_bits / self.quant_weights if self.quant_weights else 0.0

    def __str__(self) -> str:
        skipped = f" ({len(self.skipped)} skipped: {', '.join(list(self.skipped)[:4])}" \
            f"{', ...' if len(self.skipped) > 4 else ''})" if self.skipped else " (0 skipped)"
        return (
            f"quantized {len(self.layers)} layers{skipped}: "
            f"{self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
            f"({self.compression:.2f}x), {self.bits_per_weight:.4f} bits/weight"
            + (f"\n{self.budget}" if self.budget is not None else "")
        )


def _tensor_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
    return sum(t.numel() * t.element_size() for t in tensors)


def stored_bits(layer: MarlinLinear) -> int:
    """Bits of ``layer``'s codes, scales, biases, global scale and rotation signs."""
    tensors = (layer.weight, layer.scales, layer.biases, layer.global_scale, layer.rotation_signs)
    return sum(t.numel() * t.element_size() * 8 for t in tensors if t is not None)


def experts_stored_bits(layer: MarlinExperts) -> int:
    """Bits of a :class:`MarlinExperts`' codes, scales, biases and global scales (not its own
    bias vectors): what a bit budget counts for its projection stacks."""
    names = [f"{p}{s}" for p in layer.plans for s in ("", "_scales", "_biases", "_global_scale")]
    tensors = [getattr(layer, n, None) for n in names]
    return sum(t.numel() * t.element_size() * 8 for t in tensors if t is not None)


def plan_layers(model: nn.Module, config: QuantConfig) -> tuple[dict[str, LayerPlan], dict[str, str]]:
    """Which ``nn.Linear`` layers to convert and how; plus the selected ones that cannot be."""
    plans: dict[str, LayerPlan] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not config.selects(name):
            continue
        plan = config.plan(name)
        if config.bits_per_weight is not None and not config.pinned(name):
            # a bit budget chooses the setting later: the layer needs one candidate that fits
            fits = [LayerPlan(f, g) for f, g in config.budget_candidates()
                    if g == -1 or module.in_features % g == 0]
            if fits:
                plans[name] = fits[0]
            else:
                skipped[name] = (f"no bit-budget candidate fits in_features K={module.in_features} "
                                 f"(candidates {config.budget_candidates()})")
            continue
        try:
            F.get_format(plan.format).check_group_size(plan.group_size, module.in_features)
        except ValueError as err:
            skipped[name] = str(err)
            continue
        plans[name] = plan
    return plans, skipped


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule called ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _rtn(model: nn.Module, plans: dict[str, LayerPlan], config: QuantConfig, **_: Any) -> None:
    dtype_config = resolve(config.dtype_config)
    for name, plan in tqdm(plans.items(), desc="quantize (rtn)", unit="layer", disable=None):
        linear = model.get_submodule(name)
        replace_module(model, name, MarlinLinear.from_linear(
            linear, plan.format, plan.group_size, dtype_config))
        del linear
        release_freed_memory()  # this layer's temporaries and dense weight (see _memory.py)


def _no_budget_planner(*_: Any, **__: Any) -> Any:
    raise RuntimeError("quantize_model: bits_per_weight needs the bit-budget planner of "
                       "metal_marlin_torch.quant, which registers itself when the package is imported")


# method name -> function(model, plans, config, **kwargs) that converts the planned layers.
# ``quant`` (which sits above ``nn`` and imports it, never the other way round) registers GPTQ,
# MR-GPTQ, the RTN variants and the bit-budget planner here when metal_marlin_torch is imported.
QUANTIZERS: dict[str, Callable[..., Any]] = {"rtn": _rtn}
BUDGET_PLANNER: dict[str, Callable[..., Any]] = {"plan": _no_budget_planner}


def register_quantizer(method: str, fn: Callable[..., Any]) -> None:
    """Register the implementation of a :class:`QuantConfig` method (GPTQ lives in ``quant``)."""
    QUANTIZERS[method] = fn


def register_budget_planner(fn: Callable[..., Any]) -> None:
    """Register the function that turns ``QuantConfig.bits_per_weight`` into per-layer plans
    (``quant.budget.plan_budget``)."""
    BUDGET_PLANNER["plan"] = fn


def quantize_model(model: nn.Module, config: QuantConfig | None = None, **method_kwargs: Any) -> QuantizeSummary:
    """Replace ``model``'s ``nn.Linear`` layers in place by :class:`MarlinLinear`.

    Args:
        model: any module (a Hugging Face model, a plain ``nn.Sequential``, ...).
        config: :class:`QuantConfig`; None = FP4, group 128, round to nearest.
        **method_kwargs: passed to the method (e.g. ``calibration=`` for GPTQ).

    Fused mixture-of-experts modules (transformers 5's 3-D expert weights) become
    :class:`MarlinExperts` unless ``config.experts`` is False: with ``gptq``/``mr-gptq`` each
    expert is GPTQ-quantized against the Hessian of the calibration tokens routed to it (too
    few tokens: round to nearest, reported in ``summary.method_report["experts"]``), with
    ``rtn`` by round to nearest. Their blocks' routers become :class:`MarlinRouter`.

    Returns:
        :class:`QuantizeSummary`. Selected layers whose shape the format cannot take (K not
        divisible by the group) are left unquantized and listed in ``summary.skipped``, with a
        warning, rather than silently padded.
    """
    config = config or QuantConfig()
    if not isinstance(config, QuantConfig):
        raise TypeError(f"quantize_model: config must be a QuantConfig, got {type(config).__name__}")
    if config.method not in QUANTIZERS:
        raise ValueError(f"quantize_model: method {config.method!r} is not available "
                         f"(registered: {sorted(QUANTIZERS)})")
    plans, skipped = plan_layers(model, config)
    expert_plans, expert_skipped = plan_experts(model, config)
    skipped.update(expert_skipped)
    budget = None
    if config.bits_per_weight is not None and (plans or expert_plans):
        # the experts' projection stacks are planning units of the budget like the layers
        budget = BUDGET_PLANNER["plan"](model, plans, config, experts=expert_plans, **method_kwargs)
        plans = budget.plans
        expert_plans = {name: budget.experts.get(name, projs) for name, projs in expert_plans.items()}
    for name, reason in skipped.items():  # a warning the user sees (Python shows UserWarnings by default)
        warnings.warn(f"metal_marlin_torch: leaving {name} unquantized: {reason}", UserWarning, stacklevel=2)
    before = {name: _tensor_bytes(model.get_submodule(name)) for name in plans}
    experts_before = {name: _tensor_bytes(model.get_submodule(name)) for name in expert_plans}
    quantizer = QUANTIZERS[config.method]
    if expert_plans and getattr(quantizer, "handles_experts", False):
        # GPTQ / MR-GPTQ quantize the experts too, each expert against the Hessian of its routed tokens
        method_kwargs = {**method_kwargs, "expert_plans": expert_plans}
    result = quantizer(model, plans, config, **method_kwargs)
    summary = QuantizeSummary(skipped=skipped, budget=budget)
    if isinstance(result, dict):
        summary.method_report = result
    for name in plans:
        module = model.get_submodule(name)
        if isinstance(module, MarlinLinear):
            summary.layers[name] = (module.format, module.group_size)
            summary.bytes_before += before[name]
            summary.bytes_after += _tensor_bytes(module)
            summary.quant_bits += stored_bits(module)
            summary.quant_weights += module.in_features * module.out_features
    dtype_config = resolve(config.dtype_config)
    rtn_experts = [n for n in expert_plans if not isinstance(model.get_submodule(n), MarlinExperts)]
    if rtn_experts and config.method != "rtn":
        log.info("metal_marlin_torch: experts %s are quantized by rtn (no calibration inputs reach them)",
                 rtn_experts)
    for name, projections in expert_plans.items():
        summary.bytes_before += experts_before[name]
        layer = model.get_submodule(name)
        if not isinstance(layer, MarlinExperts):  # not converted by the method: round to nearest
            experts = layer
            layer = MarlinExperts.from_experts(experts, projections, dtype_config)
            replace_module(model, name, layer)
            del experts
            release_freed_memory()
        first = projections[layer.shape.up_name]
        summary.layers[name] = (first.format, first.group_size)
        summary.bytes_after += _tensor_bytes(layer)
        summary.quant_bits += experts_stored_bits(layer)
        summary.quant_weights += layer.num_experts * sum(n * k for n, k in layer.shape.projections().values())
    summary.routers, summary.kept_routers = convert_routers(model, moe_router_names(model, list(expert_plans)))
    return summary


def moe_router_names(model: nn.Module, experts_names: list[str]) -> list[str]:
    """The ``gate`` modules beside the named experts modules (the MoE blocks' routers)."""
    names = []
    for name in experts_names:
        parent, _, _ = name.rpartition(".")
        block = model.get_submodule(parent) if parent else model
        gate = getattr(block, "gate", None)
        if isinstance(gate, nn.Module) and not isinstance(gate, nn.Linear):
            names.append(f"{parent}.gate" if parent else "gate")
    return names
