"""LoRA through peft on :class:`~.experts.MarlinExperts` (quantized mixture-of-experts projections).

peft adapts transformers' fused experts through ``LoraConfig(target_parameters=[...])``, which
wraps each 3-D ``nn.Parameter`` (``ParamWrapper``) and adds the low-rank update to the dense
weight at every forward. A :class:`MarlinExperts` has no dense weight to add to (packed codes),
so here the whole module is targeted by name, like a linear layer, and gets its own LoRA class
through the same extension point as :class:`~.lora.MarlinLoraLinear`::

    LoraConfig(r=8, target_modules=["experts"])        # every MarlinExperts named ...experts

Each projection ``p`` (``gate_up_proj`` or ``up_proj``, and ``down_proj``) of each expert ``e``
gets its own pair, as peft's ``ParamWrapper`` gives per expert: ``A_p[e] [r, K]``, ``B_p[e]
[N, r]``, ``W_p[e] x + scaling * B_p[e] A_p[e] x``. Stored per adapter as
``lora_A.<adapter>.<p>`` ``[E, r, K]`` and ``lora_B.<adapter>.<p>`` ``[E, N, r]`` (peft's own
adapter files; A random, B zero at the start, as peft initializes LoRA).

The frozen base keeps computing through ``marlin::moe_gemm``: during the forward the wrapper puts
a ``project`` on the base module instance that adds the update to each projection's rows, and
the base module's own forward (routing, gate, weights) runs unchanged. Merging adds
``scaling * B_p[e] A_p[e]`` to each expert's dequantized weight and quantizes the sum again with
the projection's format and group (round to nearest); the error is reported as for linear
layers (:data:`~.lora.MERGE_REPORT`). DoRA and a dense merge are not offered for experts.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .experts import MarlinExperts
from .lora import _DENSE, MERGE_REPORT, MergeError, log


class MarlinLoraExperts(nn.Module, LoraLayer):
    """peft LoRA layer around a frozen :class:`MarlinExperts` (module docstring)."""

    adapter_layer_names = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        if config.lora_bias:
            raise ValueError("MarlinLoraExperts: lora_bias is not supported; set LoraConfig(lora_bias=False)")
        if config.use_dora:
            raise ValueError("MarlinLoraExperts: DoRA is not supported on quantized experts; "
                             "set LoraConfig(use_dora=False)")
        if config.lora_dropout:
            # the update is computed per routed row, after the routing that the base module does
            # inside its forward: there is no single input tensor to drop out
            raise ValueError(f"MarlinLoraExperts: lora_dropout must be 0, got {config.lora_dropout}")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if not any(True for _ in base_layer.parameters()) and "qweight" not in vars(base_layer):
            # peft places new LoRA modules on the device of the base's weight, found as `qweight`,
            # `W_q`, `weight`, ... or else its first parameter; experts without biases have no
            # parameter at all (packed buffers only), so name one buffer for that lookup. A plain
            # attribute: no state-dict key, dropped again by merging.
            vars(base_layer)["qweight"] = base_layer.down_proj
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.shape.hidden_dim, module.shape.hidden_dim

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        return None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        """Create adapter ``adapter_name``: per projection ``A [E, r, K]`` (Kaiming uniform, as
        ``nn.Linear`` and peft initialize ``lora_A``) and ``B [E, N, r]`` zero."""
        if not isinstance(r, int) or r <= 0:
            raise ValueError(f"MarlinLoraExperts: r must be a positive int, got {r!r}")
        base: MarlinExperts = self.get_base_layer()
        device = base.down_proj_scales.device
        a, b = nn.ParameterDict(), nn.ParameterDict()
        for proj, (n, k) in base.shape.projections().items():
            wa = torch.empty(base.num_experts, r, k, device=device)
            for e in range(base.num_experts):
                nn.init.kaiming_uniform_(wa[e], a=math.sqrt(5))
            if config.init_lora_weights is False:  # peft's "random B" option, for tests
                wb = torch.randn(base.num_experts, n, r, device=device) / math.sqrt(r)
            else:
                wb = torch.zeros(base.num_experts, n, r, device=device)
            a[proj] = nn.Parameter(wa)
            b[proj] = nn.Parameter(wb)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_A[adapter_name] = a
        self.lora_B[adapter_name] = b
        self.lora_dropout[adapter_name] = nn.Identity()
        self.lora_bias[adapter_name] = False
        self.use_dora[adapter_name] = False
        self.use_rslora[adapter_name] = config.use_rslora
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        target = device or self.get_base_layer().down_proj_scales.device
        for name in self.adapter_layer_names:
            layer = getattr(self, name)
            if adapter_name in layer:
                layer[adapter_name] = layer[adapter_name].to(target)

    # ---- the update ----------------------------------------------------------------------------
    def _update(self, proj: str, x: torch.Tensor, ids: torch.Tensor, adapter: str) -> torch.Tensor:
        """``scaling * B[ids[m]] A[ids[m]] x[m]`` for rows ``x [M, K]`` (float32 math)."""
        a = self.lora_A[adapter][proj]  # [E, r, K]
        b = self.lora_B[adapter][proj]  # [E, N, r]
        e, r, k = a.shape
        xa = (x.to(a.dtype) @ a.reshape(e * r, k).T).view(-1, e, r)  # every expert's A: [M, E, r]
        # keep only each row's own expert (a one-hot mask keeps this differentiable and
        # vectorized), then one GEMM with all experts' B side by side [E*r, N]
        onehot = nn.functional.one_hot(ids, e).to(xa.dtype)
        xa = (xa * onehot[:, :, None]).reshape(-1, e * r)
        return (xa @ b.permute(0, 2, 1).reshape(e * r, -1)) * self.scaling[adapter]

    def get_delta_weight(self, adapter: str, proj: str | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """``scaling * B[e] @ A[e]`` in float32, ``[E, N, K]``, of one projection (all of them
        as a dict when ``proj`` is None)."""
        if proj is None:
            return {p: self.get_delta_weight(adapter, p) for p in self.lora_A[adapter]}
        a = self.lora_A[adapter][proj].float()
        b = self.lora_B[adapter][proj].float()
        return torch.bmm(b, a) * self.scaling[adapter]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args: Any, **kwargs: Any) -> torch.Tensor:
        base: MarlinExperts = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        adapters = [a for a in self.active_adapters if a in self.lora_A]
        if self.merged or not adapters:
            return base(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        plain = type(base).project

        def project(proj: str, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
            out = plain(base, proj, x, expert_ids)
            for adapter in adapters:
                out = out + self._update(proj, x, expert_ids, adapter).to(out.dtype)
            return out

        # an instance attribute shadows MarlinExperts.project for this call only, so the base
        # module's own forward (routing, gate, weighting) is what runs
        base.project = project
        try:
            return base(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        finally:
            del base.project

    # ---- merging ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _apply(self, adapter: str, sign: float) -> None:
        base: MarlinExperts = self.get_base_layer()
        vars(base).pop("qweight", None)
        if _DENSE["on"]:
            raise ValueError("merge_dense: a dense merge is not offered for MarlinExperts (their LoRA merges by "
                             "requantizing); merge without dense=True")
        for proj, delta in self.get_delta_weight(adapter).items():
            delta = delta * sign
            w = base.dequantized(proj, torch.float32) + delta
            new = base.quantize_projection(proj, w)
            device = getattr(base, f"{proj}_scales").device
            for name, t in new.items():
                setattr(base, name, t.to(device))
            err = float((base.dequantized(proj, torch.float32) - w).norm())
            plan = base.plans[proj]
            report = MergeError(f"{plan.format}/g{plan.group_size}", float(delta.norm()), err,
                                err / max(float(w.norm()), 1e-30))
            MERGE_REPORT[f"{id(self):x}:{adapter}:{proj}"] = report
            log.info("metal_marlin_torch: merged LoRA adapter %r into experts %s (%s): |delta| %.4g, "
                     "requantization error %.4g (%.3g of the weight)", adapter, proj, report.layer,
                     report.delta_norm, report.error_norm, report.relative)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters to every expert's weight and requantize it."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            if safe_merge and not all(torch.isfinite(d).all() for d in self.get_delta_weight(adapter).values()):
                raise ValueError(f"merge: NaN or Inf in the adapter {adapter!r}")
            self._apply(adapter, 1.0)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract merged adapters again (requantized: a second rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self.lora_A:
                self._apply(adapter, -1.0)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()
