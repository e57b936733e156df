"""transformers integration: the ``metal_marlin`` quantization method of ``from_pretrained``.

``import metal_marlin_torch`` registers :class:`MarlinConfig` and :class:`MarlinHfQuantizer`
with ``transformers.quantizers`` (``register_quantization_config`` / ``register_quantizer``).
Then::

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=MarlinConfig(format="fp4"))
    model.save_pretrained(out)                     # docs/FORMAT.md checkpoint
    model = AutoModelForCausalLM.from_pretrained(out)   # pre-quantized, identical logits

The quantizer decides (which modules, which formats); the pieces that do the work are the
package's own: :class:`MarlinLinear`, :class:`MarlinExperts`, the format quantizers and the
checkpoint table of :mod:`.checkpoint`.

How loading works (transformers 5.x):

- **quantize on load** (a float checkpoint and a ``MarlinConfig``): before the weights are
  read, every selected ``nn.Linear`` / fused experts module of the meta-device model becomes an
  empty :class:`MarlinLinear` / :class:`MarlinExperts` whose packed tensor (``weight``, or
  ``gate_up_proj``/``down_proj``) is still a float placeholder of the original shape. For each
  such tensor :meth:`MarlinHfQuantizer.param_needs_quantization` is true, so transformers runs
  :class:`MarlinQuantize` on the checkpoint's float tensor (after merging per-expert tensors),
  which returns the packed codes and their scales under the module's tensor names.
- **pre-quantized** (``config.json`` says ``quant_method: metal_marlin``): the modules listed in
  ``quantization_config["layers"]`` are swapped for empty quantized modules of exactly the
  recorded format and group, and the checkpoint's tensors load into them by name.
- **saving**: ``save_pretrained`` writes the model's ``state_dict`` names (no reverse weight
  conversion: MoE checkpoints keep the fused, quantized 3-D tensors), safetensors metadata
  ``metal_marlin_version``, and this config's :meth:`MarlinConfig.to_dict`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from .. import formats as F
from ..dtypes import resolve
from ..nn.experts import MarlinExperts, plan_experts
from ..nn.linear import MarlinLinear
from ..nn.quantize import plan_layers, replace_module
from .checkpoint import (
    FORMAT_VERSION,
    LAYERS_KEY,
    QUANT_METHOD,
    _dedupe_tied,
    check_layer_metadata,
    convert_to_marlin,
    layer_table,
    read_header,
)
from .hf_config import MarlinConfig

log = logging.getLogger("metal_marlin_torch")

def _split(name: str) -> tuple[str, str]:
    module, _, tensor = name.rpartition(".")
    return module, tensor


class MarlinQuantize(ConversionOps):
    """transformers conversion op: a float checkpoint tensor -> the module's quantized tensors."""

    def __init__(self, hf_quantizer: MarlinHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], *args: Any, model: nn.Module | None = None,
                **kwargs: Any) -> dict[str, torch.Tensor]:
        if model is None:
            raise ValueError("MarlinQuantize.convert: transformers passed no model")
        out: dict[str, torch.Tensor] = {}
        for key, value in input_dict.items():
            w = value[0] if isinstance(value, list) else value
            module_name, tensor_name = _split(key)
            module = model.get_submodule(module_name)
            prefix = f"{module_name}." if module_name else ""
            if isinstance(module, MarlinLinear) and tensor_name == "weight":
                qt = F.quantize(w, module.format, module.group_size, module.dtype_config.torch_scales)
                out[prefix + "weight"] = qt.weight
                out[prefix + "scales"] = qt.scales
                for name in ("biases", "global_scale"):
                    if getattr(qt, name) is not None:
                        out[prefix + name] = getattr(qt, name)
            elif isinstance(module, MarlinExperts) and tensor_name in module.plans:
                w = w.transpose(1, 2).contiguous() if module.shape.is_transposed else w
                for name, t in module.quantize_projection(tensor_name, w).items():
                    out[prefix + name] = t
            else:
                raise ValueError(f"MarlinQuantize: {key!r} is not a tensor metal_marlin quantizes")
        return out


class MarlinHfQuantizer(HfQuantizer):
    """The ``metal_marlin`` quantizer: RTN quantize-on-load and pre-quantized checkpoints."""

    requires_calibration = False
    quantization_config: MarlinConfig

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        cfg = self.quantization_config
        if not self.pre_quantized and cfg.method != "rtn":
            raise ValueError(
                f"metal_marlin: from_pretrained quantizes by round to nearest only; method {cfg.method!r} "
                "needs calibration data: load the model, run metal_marlin_torch.quantize_model, then save"
            )
        if self.pre_quantized and not cfg.layers:
            raise ValueError("metal_marlin: the checkpoint's quantization_config lists no quantized layers")
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("metal_marlin: disk offload is not supported (device_map contains 'disk')")

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        if self.pre_quantized:
            return False
        module_name, tensor_name = _split(param_name)
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        if isinstance(module, MarlinLinear):
            return tensor_name == "weight"
        return isinstance(module, MarlinExperts) and tensor_name in module.plans

    def _check_prequantized_files(self, model: nn.Module, files: list[str] | None) -> None:
        """Before any tensor is read: every shard complete, its recorded layers equal to
        ``config.json``'s, and every tensor of every quantized layer present (transformers
        would otherwise initialize a missing ``scales`` at random and the model would run)."""
        if not files:
            return
        layers = self.quantization_config.layers
        stored: set[str] = set()
        for f in files:
            if not str(f).endswith(".safetensors"):
                continue
            header, meta = read_header(f, "from_pretrained")
            check_layer_metadata(layers, Path(f), meta, "from_pretrained")
            stored.update(header)
        if not stored:
            return
        tied = getattr(self.quantization_config, "tied", None) or {}
        quantized = tuple(f"{n}." for n in layers)
        needed = [k for k in model.state_dict() if k.startswith(quantized) and k not in tied
                  and not k.endswith("rotation_signs")]
        missing = [k for k in needed if k not in stored]
        if missing:
            raise ValueError(f"from_pretrained: the checkpoint is missing tensors of quantized layers: {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}")

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if self.pre_quantized:
            convert_to_marlin(model, self.quantization_config.layers, device="meta")
            self._check_prequantized_files(model, kwargs.get("checkpoint_files"))
            return
        keep = self.get_modules_to_not_convert(
            model, self.quantization_config.modules_to_not_convert,
            getattr(model, "_keep_in_fp32_modules", None), add_default_skips=True,
        )
        config = self.quantization_config.quant_config(extra_exclude=keep)
        dtype_config = resolve(config.dtype_config)
        plans, skipped = plan_layers(model, config)
        expert_plans, expert_skipped = plan_experts(model, config)
        for name, reason in {**skipped, **expert_skipped}.items():
            log.warning("metal_marlin_torch: leaving %s unquantized: %s", name, reason)
        for name, plan in plans.items():
            linear = model.get_submodule(name)
            layer = MarlinLinear.like(linear, plan.format, plan.group_size, dtype_config, device="meta")
            # the checkpoint's float weight lands here and is quantized by MarlinQuantize
            layer.weight = torch.empty_like(linear.weight, device="meta")
            replace_module(model, name, layer)
        for name, projections in expert_plans.items():
            experts = model.get_submodule(name)
            layer = MarlinExperts.like(experts, projections, dtype_config, device="meta")
            for proj in projections:
                setattr(layer, proj, torch.empty_like(getattr(experts, proj), device="meta"))
            replace_module(model, name, layer)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        self.quantization_config.layers = layer_table(model)
        # MoE routers on marlin.moe_route (nn/router.py), now that their weights are loaded
        from ..nn.quantize import moe_router_names  # noqa: PLC0415
        from ..nn.router import convert_routers  # noqa: PLC0415

        convert_routers(model, moe_router_names(model, [n for n, m in model.named_modules()
                                                         if isinstance(m, MarlinExperts)]))
        # save_pretrained must write the state_dict names (fused, quantized expert tensors), not
        # revert transformers' load-time weight conversions (which would split packed tensors)
        model._weight_conversions = []
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[None, dict[str, str]]:
        self.quantization_config.layers = layer_table(model)
        self.quantization_config.tied = _dedupe_tied(model.state_dict())[1]
        return None, {"metal_marlin_version": str(FORMAT_VERSION),
                      LAYERS_KEY: json.dumps(self.quantization_config.layers, sort_keys=True)}

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """``model.dequantize()``: every MarlinLinear becomes a dense ``nn.Linear`` of ``dtype``."""
        from ..nn.dequantize import dequantize_model  # noqa: PLC0415

        return dequantize_model(model, dtype)

    def get_quantize_ops(self) -> MarlinQuantize:
        return MarlinQuantize(self)

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # adapters (LoRA) train on the frozen quantized base: marlin::gemm and marlin::moe_gemm
        # are differentiable with respect to their input
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register ``metal_marlin`` with transformers (idempotent; done by ``import metal_marlin_torch``)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MarlinConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MarlinHfQuantizer)


register()

__all__ = ["MarlinConfig", "MarlinHfQuantizer", "MarlinQuantize", "register"]
