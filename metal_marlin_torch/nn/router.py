"""`MarlinRouter`: a mixture-of-experts router on ``marlin::moe_route``.

transformers 5 splits a sparse MoE block into a router (``gate``: ``Qwen3MoeTopKRouter``,
``MixtralTopKRouter``, ``DeepseekV3TopkRouter``, ...) and the fused experts (``experts``,
:class:`~.experts.MarlinExperts` once quantized); the block's own forward calls
``_, weights, ids = self.gate(x)`` then ``self.experts(x, ids, weights)``, and adds a shared
expert where the model has one. :class:`MarlinRouter` replaces the router: the logits are the
router's own ``F.linear`` (its weight stays unquantized: it is small and every token's choice
of experts depends on it), the top-k and the normalization one ``marlin::moe_route`` launch (a
Metal kernel on MPS, the emulated kernel under ``emulator.use()``, pure torch elsewhere). The
block's glue (shared expert, its sigmoid gate, latent projections) stays the model's own code,
so the whole block runs router -> ``moe_gemm`` (up/gate) -> ``silu_mul`` -> ``moe_gemm``
(down) -> weighted combine on the marlin ops, plus the shared expert's ``MarlinLinear`` layers.

The routing settings are read from the router's attributes (``top_k``, ``norm_topk_prob``,
``e_score_correction_bias``, ``n_group``/``num_group``, ``topk_group``,
``routed_scaling_factor``) and then *checked*: :func:`convert_routers` runs the transformers
router and the candidate on the same random probe tokens and swaps only when they choose the
same experts with the same weights. A router whose routing is none of moe_route's modes (for
example one with jitter noise, or a softmax over a different axis) is left as it is and listed
in the returned report, never replaced by a router that routes differently.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .. import ops
from ..ops.moe_route import moe_route as route_reference

log = logging.getLogger("metal_marlin_torch")

PROBE_TOKENS = 64  # random tokens the candidate routing must reproduce before a router is swapped


@dataclass(frozen=True)
class RouteSpec:
    """Arguments of ``marlin::moe_route`` for one router (ops/moe_route.py explains the modes)."""

    top_k: int
    mode: str = "softmax_topk"
    renormalize: bool = True
    n_group: int = 1
    topk_group: int = 1
    scaling: float = 1.0


class MarlinRouter(nn.Module):
    """Router logits by the router's own linear layer, top-k and weights by ``marlin::moe_route``.

    Keeps the transformers router's tensors under their names (``weight [E, H]``,
    ``e_score_correction_bias [E]`` for the sigmoid routers), so checkpoints are unchanged, and
    its call signature: ``forward(hidden_states) -> (logits [T, E], weights float32 [T, k],
    ids int64 [T, k])``. Sigmoid routers (DeepSeek-V3 family) compute their logits in fp32, as
    transformers does; the softmax routers in the activations' dtype.
    """

    def __init__(self, weight: nn.Parameter, spec: RouteSpec, e_score_correction_bias: torch.Tensor | None = None,
                 weight_bias: nn.Parameter | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"MarlinRouter: weight must be [E, H], got shape {tuple(weight.shape)}")
        self.weight = weight
        self.bias = weight_bias
        if e_score_correction_bias is not None:
            self.register_buffer("e_score_correction_bias", e_score_correction_bias)
        else:
            self.e_score_correction_bias = None
        self.spec = spec
        self.top_k = spec.top_k
        self.num_experts, self.hidden_dim = weight.shape

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = hidden_states.reshape(-1, self.hidden_dim)
        if self.spec.mode == "sigmoid":
            logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        else:
            logits = F.linear(x, self.weight, self.bias)
        s = self.spec
        if torch.is_grad_enabled() and logits.requires_grad:
            # marlin::moe_route has no autograd formula; the pure-torch kernel is the same
            # arithmetic in differentiable torch ops (the weights' gradient reaches x and the router)
            weights, ids = route_reference(logits, self.e_score_correction_bias, s.top_k, s.mode, s.renormalize,
                                           s.n_group, s.topk_group, s.scaling)
        else:
            weights, ids = ops.moe_route(logits, s.top_k, s.mode, s.renormalize, self.e_score_correction_bias,
                                         s.n_group, s.topk_group, s.scaling)
        return logits, weights, ids

    def extra_repr(self) -> str:
        s = self.spec
        extra = f", n_group={s.n_group}, topk_group={s.topk_group}" if s.n_group > 1 else ""
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, top_k={s.top_k}, mode={s.mode!r}, "
                f"renormalize={s.renormalize}, scaling={s.scaling}{extra}")


def _candidates(router: nn.Module) -> list[RouteSpec]:
    """Routing settings the router's attributes allow (checked against the router by a probe)."""
    top_k = getattr(router, "top_k", None)
    if not isinstance(top_k, int):
        return []
    if isinstance(getattr(router, "e_score_correction_bias", None), torch.Tensor):
        n_group = getattr(router, "num_group", getattr(router, "n_group", 1)) or 1
        norms = [bool(router.norm_topk_prob)] if hasattr(router, "norm_topk_prob") else [True, False]
        return [RouteSpec(top_k, "sigmoid", norm, int(n_group), int(getattr(router, "topk_group", 1) or 1),
                          float(getattr(router, "routed_scaling_factor", 1.0) or 1.0)) for norm in norms]
    norms = [bool(router.norm_topk_prob)] if hasattr(router, "norm_topk_prob") else [True, False]
    return [RouteSpec(top_k, "softmax_topk", norm) for norm in norms]


def _choice_scores(spec: RouteSpec, logits: torch.Tensor, score_bias: torch.Tensor | None) -> torch.Tensor:
    """The scores top-k ranks under ``spec`` (fp32, as moe_route computes them)."""
    if spec.mode == "softmax_topk":  # probabilities: saturated logits tie at 0 (underflow)
        return torch.softmax(logits.float(), dim=-1)
    if spec.mode == "topk_softmax":
        return logits.float()
    s = torch.sigmoid(logits.float())
    return s if score_bias is None else s + score_bias.float()


def _same_routing(ref: tuple, ours: tuple, spec: RouteSpec, score_bias: torch.Tensor | None) -> bool:
    """Same experts per token (as sets: some routers return them unsorted) and the same weights.

    Half-precision logits tie often; a tie may be broken either way (torch.topk's order is
    unspecified), so a token whose chosen sets differ passes only when the differing experts'
    choice scores are exactly equal (the sorted scores of both choices agree)."""
    if not (isinstance(ref, tuple) and len(ref) == 3):
        return False
    rw, ri = ref[1], ref[2]
    ow, oi = ours[1], ours[2]
    if not (isinstance(ri, torch.Tensor) and tuple(ri.shape) == tuple(oi.shape)):
        return False
    ri = ri.long()
    r_sorted, o_sorted = ri.sort(-1)[0], oi.sort(-1)[0]
    differ = (r_sorted != o_sorted).any(-1)
    if differ.any():
        score = _choice_scores(spec, ours[0], score_bias)[differ]
        if not torch.equal(score.gather(-1, ri[differ]).sort(-1)[0], score.gather(-1, oi[differ]).sort(-1)[0]):
            return False
    # weights compared sorted by value (a tie swaps ids, not values); transformers may round
    # them to the activations' dtype (Qwen-MoE)
    tol = 1e-5 if rw.dtype == torch.float32 else 1e-2
    return torch.allclose(rw.float().sort(-1)[0], ow.sort(-1)[0], rtol=tol, atol=tol)


def router_for(router: nn.Module) -> tuple[MarlinRouter | None, str]:
    """A :class:`MarlinRouter` that routes exactly as ``router`` does on random probe tokens, or
    ``(None, reason)``. The probe draws from its own generator (the global RNG is untouched)."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or weight.device.type == "meta":
        return None, "no materialized 2-D weight [E, H]"
    bias = getattr(router, "bias", None)
    bias = bias if isinstance(bias, nn.Parameter) else None
    score_bias = getattr(router, "e_score_correction_bias", None)
    gen = torch.Generator().manual_seed(0)
    dtype = weight.dtype if weight.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    probe = torch.randn(PROBE_TOKENS, weight.shape[1], generator=gen).to(device=weight.device, dtype=dtype)
    was_training = router.training
    router.eval()
    try:
        with torch.no_grad():
            ref = router(probe)
            for spec in _candidates(router):
                try:
                    cand = MarlinRouter(weight, spec, score_bias, bias)
                    if _same_routing(ref, cand(probe), spec, score_bias):
                        return cand, ""
                except ValueError as err:  # moe_route rejects the settings (e.g. > 1024 experts)
                    return None, str(err)
    except Exception as err:  # noqa: BLE001 (a router we cannot call on a probe stays as it is)
        return None, f"probe failed: {type(err).__name__}: {err}"
    finally:
        router.train(was_training)
    return None, "its routing is none of marlin.moe_route's modes on the probe tokens"


def convert_routers(model: nn.Module, names: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Swap the routers of ``model``'s sparse MoE blocks (the ``gate`` next to an ``experts``
    module; or the modules named in ``names``) for :class:`MarlinRouter`, in place.

    Returns ``(converted names, {name: reason} of routers left as they were)``; the latter is
    logged once at INFO.
    """
    from .quantize import replace_module  # noqa: PLC0415 (quantize imports this module)

    if names is None:
        names = []
        for name, module in model.named_modules():
            gate = getattr(module, "gate", None)
            if isinstance(gate, nn.Module) and not isinstance(gate, (MarlinRouter, nn.Linear)) \
                    and isinstance(getattr(module, "experts", None), nn.Module):
                names.append(f"{name}.gate" if name else "gate")
    converted: list[str] = []
    kept: dict[str, str] = {}
    for name in names:
        router = model.get_submodule(name)
        if isinstance(router, MarlinRouter):
            continue
        new, reason = router_for(router)
        if new is None:
            kept[name] = f"{type(router).__name__}: {reason}"
            continue
        replace_module(model, name, new)
        converted.append(name)
    if kept:
        log.info("metal_marlin_torch: routers left on transformers' code: %s", kept)
    return converted, kept
