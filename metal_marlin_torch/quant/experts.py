"""GPTQ for fused mixture-of-experts modules: one Hessian per expert, from the tokens routed to it.

An expert ``e`` of a transformers experts module sees only the rows whose top-k choice
contains ``e``, so its input Hessian is ``H_e = X_e^T X_e / T_e`` over those rows (not over
every token): that is the distribution whose output error GPTQ should minimize. The driver
(:mod:`.driver`) calls :func:`quantize_experts` for each planned experts module of a block,
after the block's linear layers (true-sequential: the experts' inputs come from the already
quantized attention), in two passes over the calibration inputs:

1. a forward pre-hook on the experts module reads ``(hidden_states, top_k_index, ...)`` and adds
   each expert's routed rows to its up-projection Hessian; every expert's ``gate_up_proj``
   (or ``up_proj``) is quantized;
2. the same hook computes each expert's down-projection input from the *quantized* up
   projection (its dequantized weight, the model's own gate function) and adds it to the
   expert's ``down_proj`` Hessian; every ``down_proj`` is quantized.

Each hook stops the forward pass (nothing after the experts is needed). An expert that received
fewer than ``min_tokens`` calibration rows falls back to round-to-nearest (a Hessian of so few
rows is mostly damping) and is reported by name with its count. MR-GPTQ's input rotation is not
applied to experts (``moe_gemm`` has no online rotation): with ``mr-gptq`` the experts get plain
GPTQ, which the report says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..dtypes import DTypeConfig
from ..nn.config import LayerPlan
from ..nn.experts import DOWN, MarlinExperts, experts_shape
from ..nn.linear import MarlinLinear
from .mr_gptq import Rotation

DEFAULT_MIN_TOKENS = 32  # fewer routed calibration rows than this: RTN for that expert


class _Stop(Exception):
    """Ends a calibration forward pass once the experts module's input has been read."""


def _routed(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [T, H], ids [T, k])`` from an experts module call ``(hidden_states, top_k_index, top_k_weights)``."""
    names = ("hidden_states", "top_k_index")
    vals = list(args[:2]) + [kwargs[n] for n in names[len(args[:2]):]]
    x, ids = vals
    return x.reshape(-1, x.shape[-1]), ids.reshape(x.reshape(-1, x.shape[-1]).shape[0], -1)


def _expert_weight(experts: nn.Module, proj: str, e: int, transposed: bool) -> torch.Tensor:
    w = getattr(experts, proj)[e].detach()
    return w.T if transposed else w


def _collect(block: nn.Module, experts: nn.Module, inputs: list[tuple[tuple, dict]], run: Callable,
             add: Callable[[int, torch.Tensor], None]) -> None:
    """Run the block over ``inputs``; for each call of ``experts`` call ``add(e, rows_e)`` for
    every expert ``e`` with rows (the hook raises :class:`_Stop` after reading)."""
    num = experts_shape(experts).num_experts

    def grab(module, args, kwargs):  # noqa: ARG001 (hook signature)
        x, ids = _routed(args, kwargs)
        for e in torch.unique(ids).tolist():
            if 0 <= e < num:  # ids == num_experts: transformers' expert-parallel sentinel
                add(e, x[(ids == e).any(-1)])
        raise _Stop

    handle = experts.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for args, kwargs in inputs:
            try:
                run(args, kwargs)
            except _Stop:
                continue
            raise ValueError("quantize_experts: the experts module did not run in its block's forward pass")
    finally:
        handle.remove()


def expert_hidden(experts: nn.Module, e: int, rows: torch.Tensor, w_up: torch.Tensor | None = None) -> torch.Tensor:
    """Expert ``e``'s hidden activation (the input of its ``down_proj``) for its routed ``rows
    [T, H]``, in float32: the up projection ``w_up [N, H]`` (default: the module's own dense
    weight), its bias, then the model's gate (``_apply_gate``, or ``act_fn(gate) * up``)."""
    shape = experts_shape(experts)
    if w_up is None:
        w_up = _expert_weight(experts, shape.up_name, e, shape.is_transposed)
    up = rows.float() @ w_up.float().T
    if shape.has_bias:
        up = up + getattr(experts, f"{shape.up_name}_bias")[e].float()
    if not shape.has_gate:
        return experts.act_fn(up)
    gate_fn = getattr(type(experts), "_apply_gate", None)
    if gate_fn is not None:
        return gate_fn(experts, up)
    gate, lin = up.chunk(2, dim=-1)
    return experts.act_fn(gate) * lin


def _quantize_projection(
    experts: nn.Module, proj: str, plan: LayerPlan, sums: list[torch.Tensor | None], counts: list[int],
    min_tokens: int, dcfg: DTypeConfig, gptq_opts: dict[str, Any], layer_fn: Callable[..., MarlinLinear],
    transposed: bool, rtn: dict[int, int],
) -> list[MarlinLinear]:
    """One :class:`MarlinLinear` per expert: GPTQ against its Hessian, or RTN under ``min_tokens``."""
    out = []
    for e in range(len(sums)):
        w = _expert_weight(experts, proj, e, transposed).float()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device)
        lin.weight.data = w
        if counts[e] >= min_tokens:
            h = sums[e] / counts[e]
            out.append(layer_fn(lin, plan, dcfg, h, Rotation(), gptq_opts))
        else:
            rtn[e] = counts[e]
            out.append(layer_fn(lin, plan, dcfg, None, Rotation(), None))
    return out


def _load(target: MarlinExperts, proj: str, layers: list[MarlinLinear]) -> None:
    for suffix, attr in (("", "weight"), ("_scales", "scales"), ("_biases", "biases"),
                         ("_global_scale", "global_scale")):
        parts = [getattr(q, attr) for q in layers]
        if parts[0] is not None:
            if attr == "global_scale":
                parts = [p.reshape(1) for p in parts]
            setattr(target, proj + suffix, torch.stack(parts).to(getattr(target, f"{proj}_scales").device))


def quantize_experts(
    block: nn.Module,
    name: str,
    plans: dict[str, LayerPlan],
    inputs: list[tuple[tuple, dict]],
    run: Callable[[tuple, dict], Any],
    dcfg: DTypeConfig,
    gptq_opts: dict[str, Any],
    layer_fn: Callable[..., MarlinLinear],
    min_tokens: int = DEFAULT_MIN_TOKENS,
) -> tuple[MarlinExperts, dict[str, Any]]:
    """GPTQ-quantize the experts module ``block.<name>`` (module docstring) and return
    ``(MarlinExperts, report)``; the block is not modified.

    ``run(args, kwargs)`` runs the block on one calibration batch (the driver's device moves
    included). ``report``: ``{"tokens": [rows per expert], "rtn": {projection: {expert: rows}}}``.
    """
    experts = block.get_submodule(name)
    shape = experts_shape(experts)
    device = getattr(experts, DOWN).device
    up_name = shape.up_name
    n_exp = shape.num_experts
    report: dict[str, Any] = {"rtn": {}}

    def accumulate(k: int, rows_fn: Callable[[int, torch.Tensor], torch.Tensor]):
        sums: list[torch.Tensor | None] = [None] * n_exp
        counts = [0] * n_exp

        def add(e: int, rows: torch.Tensor) -> None:
            r = rows_fn(e, rows).detach().float().reshape(-1, k)
            sums[e] = r.T @ r if sums[e] is None else sums[e].addmm_(r.T, r)
            counts[e] += r.shape[0]
        _collect(block, experts, inputs, run, add)
        return sums, counts

    q = MarlinExperts.like(experts, plans, dcfg, device=device)
    # pass 1: each expert's routed rows -> its up projection's Hessian
    sums, counts = accumulate(shape.hidden_dim, lambda e, rows: rows)
    report["tokens"] = counts
    rtn: dict[int, int] = {}
    ups = _quantize_projection(experts, up_name, plans[up_name], sums, counts, min_tokens, dcfg, gptq_opts,
                               layer_fn, shape.is_transposed, rtn)
    report["rtn"][up_name] = rtn
    _load(q, up_name, ups)
    del sums
    w_up = [layer.dequantized_weight(torch.float32) for layer in ups]

    def down_input(e: int, rows: torch.Tensor) -> torch.Tensor:
        # the expert's hidden activation with its quantized up projection (true-sequential)
        return expert_hidden(experts, e, rows, w_up[e])

    # pass 2: each expert's hidden activations -> its down projection's Hessian
    sums, counts = accumulate(shape.intermediate_dim, down_input)
    rtn = {}
    downs = _quantize_projection(experts, DOWN, plans[DOWN], sums, counts, min_tokens, dcfg, gptq_opts,
                                 layer_fn, shape.is_transposed, rtn)
    report["rtn"][DOWN] = rtn
    _load(q, DOWN, downs)
    if shape.has_bias:
        with torch.no_grad():
            for proj in shape.projections():
                getattr(q, f"{proj}_bias").copy_(getattr(experts, f"{proj}_bias"))
    return q, report
