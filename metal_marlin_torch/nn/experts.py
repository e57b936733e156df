"""`MarlinExperts`: quantized replacement of transformers' fused mixture-of-experts modules.

transformers 5 stores the experts of a MoE layer (``Qwen3MoeExperts``, ``MixtralExperts``,
``Qwen2MoeExperts``, ``DeepseekV3Experts``, ``GptOssExperts``, ...) as 3-D parameters rather
than ``nn.Linear`` layers::

    gate_up_proj [E, 2I, H]   (or up_proj [E, I, H] without a gate; [E, H, 2I] when transposed)
    down_proj    [E, H, I]    ([E, I, H] when transposed)

with ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
:class:`MarlinExperts` keeps the same interface and holds, per projection ``p``, expert ``e``
in exactly the 2-D layout of docs/FORMAT.md (rows = output features, packed along K)::

    p               uint32 [E, N, ceil(K*bits/32)]   (keeps the parameter's name, so transformers'
                                                      quantize-on-load finds it)
    p_scales        [E, N, K/G]
    p_biases        [E, N, K/G]     affine integer formats only
    p_global_scale  float32 [E, 1]  nvfp4 only (one second-level scale per expert)
    p_bias          [E, N]          the projection's own bias, if the model has one (gpt-oss), in its dtype

Each projection runs through ``torch.ops.marlin.moe_gemm`` (rows gathered by expert id). The
gate (``act_fn(gate) * up`` or the model's own ``_apply_gate``) and any post-expert norm come
from the module being replaced, so the arithmetic around the GEMMs is the model's own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import formats as F
from ..dtypes import DTypeConfig, resolve
from .config import LayerPlan, QuantConfig

DOWN = "down_proj"


@dataclass(frozen=True)
class ExpertsShape:
    """Geometry of a fused experts module.

    Attributes:
        num_experts: ``E``.
        hidden_dim: ``H`` (model width).
        intermediate_dim: ``I`` (per-expert MLP width).
        has_gate: ``gate_up_proj`` (gated, ``2I`` outputs) rather than ``up_proj`` (``I``).
        has_bias: the projections carry biases ``[E, N]``.
        is_transposed: the model stores ``[E, K, N]`` instead of ``[E, N, K]``.
    """

    num_experts: int
    hidden_dim: int
    intermediate_dim: int
    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False

    @property
    def up_name(self) -> str:
        return "gate_up_proj" if self.has_gate else "up_proj"

    def projections(self) -> dict[str, tuple[int, int]]:
        """Projection name -> ``(N, K)`` (out, in features) of one expert."""
        h, i = self.hidden_dim, self.intermediate_dim
        return {self.up_name: ((2 if self.has_gate else 1) * i, h), DOWN: (h, i)}

    def to_dict(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim, "has_gate": self.has_gate,
                "has_bias": self.has_bias, "is_transposed": self.is_transposed}


def experts_shape(module: nn.Module) -> ExpertsShape | None:
    """The geometry of ``module`` if it is a fused experts module (3-D ``gate_up_proj`` or
    ``up_proj`` plus ``down_proj`` parameters), else None. Inconsistent shapes raise ValueError."""
    down = getattr(module, DOWN, None)
    has_gate = isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)
    up = getattr(module, "gate_up_proj" if has_gate else "up_proj", None)
    if not (isinstance(up, nn.Parameter) and isinstance(down, nn.Parameter) and up.dim() == 3 and down.dim() == 3):
        return None
    transposed = bool(getattr(module, "is_transposed", False))
    up_nk = (up.shape[2], up.shape[1]) if transposed else tuple(up.shape[1:])
    down_nk = (down.shape[2], down.shape[1]) if transposed else tuple(down.shape[1:])
    e, (h, i) = up.shape[0], down_nk
    want_up = ((2 if has_gate else 1) * i, h)
    if down.shape[0] != e or tuple(up_nk) != want_up:
        raise ValueError(
            f"experts module {type(module).__name__}: up projection {tuple(up.shape)} and down_proj "
            f"{tuple(down.shape)} are not [E, {'2I' if has_gate else 'I'}, H] / [E, H, I]"
        )
    has_bias = isinstance(getattr(module, f"{'gate_up_proj' if has_gate else 'up_proj'}_bias", None), nn.Parameter)
    return ExpertsShape(e, h, i, has_gate, has_bias, transposed)


def _default_gate(module: nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return module.act_fn(gate) * up


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return torch.ops.marlin.silu_mul(gate_up, None)


def _gelu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return torch.ops.marlin.gelu_mul(gate_up, None)


def fused_act_mul(act_fn: nn.Module | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``marlin::silu_mul`` / ``gelu_mul`` on ``[..., 2I]`` (gate half first) when ``act_fn`` is
    SiLU or tanh-GELU (transformers' ``silu``/``swish``/``gelu_pytorch_tanh``), else None: one
    launch for ``act(gate) * up`` instead of three elementwise ops."""
    name = type(act_fn).__name__
    if name in ("SiLU", "SiLUActivation"):
        return _silu_mul
    if name == "GELUTanh" or (isinstance(act_fn, nn.GELU) and act_fn.approximate == "tanh"):
        return _gelu_mul
    return None


class MarlinExperts(nn.Module):
    """Mixture-of-experts projections with quantized 3-D weights (module docstring: layout).

    Build it with :meth:`from_experts` (quantize a transformers experts module) or
    :meth:`like` (an empty one to load a checkpoint into).
    """

    def __init__(
        self,
        shape: ExpertsShape,
        plans: Mapping[str, LayerPlan],
        dtype_config: DTypeConfig | None = None,
        act_fn: nn.Module | None = None,
        gate_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.shape = shape
        self.num_experts = shape.num_experts
        self.dtype_config = resolve(dtype_config)
        missing = set(shape.projections()) - set(plans)
        if missing:
            raise ValueError(f"MarlinExperts: plans lack projections {sorted(missing)}")
        self.plans = {p: plans[p] for p in shape.projections()}
        if shape.has_gate and act_fn is None and gate_fn is None:
            raise ValueError("MarlinExperts: a gated experts module needs act_fn or gate_fn")
        self.act_fn = act_fn
        self._gate_fn = gate_fn or _default_gate
        e = shape.num_experts
        for proj, (n, k) in shape.projections().items():
            fmt = F.get_format(self.plans[proj].format)
            g = fmt.check_group_size(self.plans[proj].group_size, k)
            sdt = fmt.scale_dtype(self.dtype_config.torch_scales)
            self.register_buffer(proj, torch.zeros(e, n, F.packed_words(k, fmt.bits), dtype=torch.uint32,
                                                   device=device))
            self.register_buffer(f"{proj}_scales", torch.zeros(e, n, k // g, dtype=sdt, device=device))
            self.register_buffer(f"{proj}_biases", torch.zeros(e, n, k // g, dtype=sdt, device=device)
                                 if fmt.has_biases else None)
            self.register_buffer(f"{proj}_global_scale", torch.ones(e, 1, dtype=torch.float32, device=device)
                                 if fmt.has_global_scale else None)
            if shape.has_bias:
                bdt = bias_dtype or self.dtype_config.torch_activations
                self.register_parameter(f"{proj}_bias", nn.Parameter(torch.zeros(e, n, dtype=bdt, device=device)))

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def like(
        cls,
        experts: nn.Module,
        plans: Mapping[str, LayerPlan],
        dtype_config: DTypeConfig | None = None,
        device: torch.device | str | None = None,
    ) -> MarlinExperts:
        """An empty (zero) quantized twin of the transformers experts module ``experts``.

        Takes the module's activation, gate function, post-expert norm and scalar attributes
        (e.g. gpt-oss's ``alpha``/``limit``, which its ``_apply_gate`` reads). Expert biases keep
        the module's dtype, as ``MarlinLinear`` keeps an ``nn.Linear``'s.
        """
        shape = experts_shape(experts)
        if shape is None:
            raise TypeError(f"MarlinExperts: {type(experts).__name__} is not a fused experts module")
        gate_fn = getattr(type(experts), "_apply_gate", None)
        if getattr(gate_fn, "__name__", "") == "_default_apply_gate":
            # transformers' shared default (chunk, act_fn(gate) * up) is ours: keeps the fused
            # silu_mul/gelu_mul path; a model's own _apply_gate (gpt-oss's clamp) stays its own
            gate_fn = None
        bias = getattr(experts, f"{shape.up_name}_bias", None) if shape.has_bias else None
        layer = cls(shape, plans, dtype_config, getattr(experts, "act_fn", None), gate_fn, device,
                    bias_dtype=None if bias is None else bias.dtype)
        for key, value in vars(experts).items():
            if not key.startswith("_") and isinstance(value, (bool, int, float, str)) and not hasattr(layer, key):
                setattr(layer, key, value)
        norm = getattr(experts, "post_expert_norm", None)
        if getattr(experts, "has_post_expert_norm", False) and isinstance(norm, nn.Module):
            layer.post_expert_norm = norm
        layer.source_class = type(experts).__name__
        return layer

    @classmethod
    def from_experts(
        cls,
        experts: nn.Module,
        plans: Mapping[str, LayerPlan],
        dtype_config: DTypeConfig | None = None,
    ) -> MarlinExperts:
        """Round-to-nearest quantize a transformers experts module (which is not modified)."""
        if experts_shape(experts) is None:
            raise TypeError(f"MarlinExperts: {type(experts).__name__} is not a fused experts module")
        layer = cls.like(experts, plans, dtype_config, device=getattr(experts, DOWN).device)
        for proj in layer.shape.projections():
            w = getattr(experts, proj).detach()
            layer.load_quantized(proj, w.transpose(1, 2).contiguous() if layer.shape.is_transposed else w)
            if layer.shape.has_bias:
                with torch.no_grad():
                    getattr(layer, f"{proj}_bias").copy_(getattr(experts, f"{proj}_bias"))
        return layer

    def quantize_projection(self, proj: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """RTN-quantize ``w [E, N, K]`` (one 2-D matrix per expert) for projection ``proj``:
        attribute name (``proj``, ``proj_scales``, ...) -> tensor. ``self`` is not modified."""
        n, k = self.shape.projections()[proj]
        if tuple(w.shape) != (self.num_experts, n, k):
            raise ValueError(
                f"MarlinExperts: {proj} needs a [{self.num_experts}, {n}, {k}] weight, got {tuple(w.shape)}"
            )
        plan = self.plans[proj]
        # one quantize call per expert: nvfp4's global scale is per matrix, i.e. per expert
        qts = [F.quantize(w[e], plan.format, plan.group_size, self.dtype_config.torch_scales)
               for e in range(self.num_experts)]
        out = {}
        for suffix, attr in (("", "weight"), ("_scales", "scales"), ("_biases", "biases"),
                             ("_global_scale", "global_scale")):
            parts = [getattr(q, attr) for q in qts]
            if parts[0] is not None:
                out[proj + suffix] = torch.stack(parts)
        return out

    def load_quantized(self, proj: str, w: torch.Tensor) -> None:
        """RTN-quantize ``w [E, N, K]`` into projection ``proj``."""
        device = getattr(self, f"{proj}_scales").device
        for name, t in self.quantize_projection(proj, w).items():
            setattr(self, name, t.to(device))

    # ---- forward ----------------------------------------------------------------------------
    def project(self, proj: str, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """``x[m] @ W_proj[expert_ids[m]].T (+ bias)`` for rows ``x [M, K]``."""
        plan = self.plans[proj]
        return torch.ops.marlin.moe_gemm(
            x, expert_ids, getattr(self, proj), getattr(self, f"{proj}_scales"),
            getattr(self, f"{proj}_biases"), getattr(self, f"{proj}_global_scale"),
            getattr(self, f"{proj}_bias", None), plan.format, plan.group_size,
        )

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """``sum_j top_k_weights[t, j] * expert_{top_k_index[t, j]}(hidden_states[t])``.

        Ids equal to ``num_experts`` (transformers' expert-parallel sentinel) contribute nothing.
        """
        h = hidden_states.shape[-1]
        x = hidden_states.reshape(-1, h)
        k = top_k_index.shape[-1]
        ids = top_k_index.reshape(-1)
        weights = top_k_weights.reshape(-1)
        valid = ids < self.num_experts
        ids = torch.where(valid, ids, torch.zeros_like(ids))
        weights = torch.where(valid, weights, torch.zeros_like(weights))
        rows = x.repeat_interleave(k, dim=0)  # row t*k + j goes to expert top_k_index[t, j]
        up = self.project(self.shape.up_name, rows, ids)
        if not self.shape.has_gate:
            act = self.act_fn(up)
        elif self._gate_fn is _default_gate and not (torch.is_grad_enabled() and up.requires_grad) \
                and (fused := fused_act_mul(self.act_fn)) is not None:
            # silu_mul/gelu_mul have no autograd formula: training (LoRA) takes the model's own gate
            act = fused(up)
        else:
            act = self._gate_fn(self, up)
        out = self.project(DOWN, act, ids)
        if getattr(self, "post_expert_norm", None) is not None:
            out = self.post_expert_norm(out)
        out = (out.float() * weights.float()[:, None]).view(-1, k, h).sum(1)
        return out.to(hidden_states.dtype).reshape(hidden_states.shape)

    def dequantized(self, proj: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W_hat [E, N, K]`` of one projection (FORMAT.md orientation, not the model's)."""
        n, k = self.shape.projections()[proj]
        plan = self.plans[proj]
        biases, gs = getattr(self, f"{proj}_biases"), getattr(self, f"{proj}_global_scale")
        return torch.stack([
            torch.ops.marlin.dequantize(getattr(self, proj)[e], getattr(self, f"{proj}_scales")[e],
                                        None if biases is None else biases[e], None if gs is None else gs[e],
                                        plan.format, plan.group_size, k, dtype)
            for e in range(self.num_experts)
        ])

    # ---- checkpoint description ---------------------------------------------------------------
    def layer_spec(self) -> dict[str, Any]:
        """This module's entry in ``quantization_config["layers"]`` (docs/TRANSFORMERS.md)."""
        first = self.plans[self.shape.up_name]
        return {
            "kind": "experts", "format": first.format, "bits": F.get_format(first.format).bits,
            "group_size": first.group_size, "rotation_block": 0,
            "dtype_config": self.dtype_config.to_dict(), **self.shape.to_dict(),
            "projections": {p: {"format": pl.format, "bits": F.get_format(pl.format).bits,
                                "group_size": pl.group_size} for p, pl in self.plans.items()},
        }

    @staticmethod
    def plans_from_spec(spec: Mapping[str, Any]) -> dict[str, LayerPlan]:
        return {p: LayerPlan(v["format"], v["group_size"]) for p, v in spec["projections"].items()}

    def extra_repr(self) -> str:
        s = self.shape
        plans = ", ".join(f"{p}={pl.format}/g{pl.group_size}" for p, pl in self.plans.items())
        return (f"num_experts={s.num_experts}, hidden_dim={s.hidden_dim}, "
                f"intermediate_dim={s.intermediate_dim}, {plans}")


def plan_experts(
    model: nn.Module, config: QuantConfig
) -> tuple[dict[str, dict[str, LayerPlan]], dict[str, str]]:
    """Fused experts modules to convert (name -> projection -> plan), and those that cannot be.

    The projections are planned under the names ``<module>.gate_up_proj`` and
    ``<module>.down_proj``, so the config's rules (e.g. ``*.down_proj``) apply to them. Under a
    bit budget an unpinned projection gets a placeholder (the first candidate that fits) that
    the budget's allocation replaces.
    """
    plans: dict[str, dict[str, LayerPlan]] = {}
    skipped: dict[str, str] = {}
    if not config.experts:
        return plans, skipped
    for name, module in model.named_modules():
        if isinstance(module, MarlinExperts) or not config.selects(name):
            continue
        try:
            shape = experts_shape(module)
        except ValueError as err:
            skipped[name] = str(err)
            continue
        if shape is None:
            continue
        module_plans = {}
        try:
            for proj, (_, k) in shape.projections().items():
                plan = config.plan(f"{name}.{proj}")
                if config.bits_per_weight is not None and not config.pinned(f"{name}.{proj}"):
                    # a bit budget chooses the setting later (quant/budget.py): one candidate must fit
                    fits = [LayerPlan(f, g) for f, g in config.budget_candidates() if g == -1 or k % g == 0]
                    if not fits:
                        raise ValueError(f"no bit-budget candidate fits {proj}'s K={k} "
                                         f"(candidates {config.budget_candidates()})")
                    plan = fits[0]
                F.get_format(plan.format).check_group_size(plan.group_size, k)
                module_plans[proj] = plan
        except ValueError as err:
            skipped[name] = str(err)
            continue
        plans[name] = module_plans
    return plans, skipped
