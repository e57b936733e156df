"""Scales refined against the model: after GPTQ or RTN, with every code fixed, tune each
quantized layer's group scales and biases so the *block's output* matches the dense model's
(the idea of MLX's DWQ and of AutoRound's scale tuning, done block by block).

GPTQ and RTN choose a layer's parameters one layer at a time, each from its own error; the
block's output then carries every layer's error through attention, the MLP nonlinearity and the
residual stream. Here the block is run on the calibration inputs that reach it through the
*already quantized* blocks before it, and its scales and biases are moved by Adam to minimize
the mean squared difference to the *dense* block's output on the *dense* inputs
(:func:`refine_block`). So a block also corrects part of the error the blocks before it left.

Parametrization (why it trains well with one learning rate for every layer): the weight of
group ``j`` of row ``n`` is ``w = s * u + b`` with ``u`` the decoded code at scale 1 (affine:
the integer code; NormalFloat: the codebook value), and the trained values are
``s = s0 * (1 + a)`` and ``b = b0 + s0 * c`` with ``a = c = 0`` at the start. ``a`` and ``c``
are relative to the group's own step, so Adam's step (about ``lr`` per iteration) means the
same thing for a layer with scales of 1e-3 and one with 1e-1. Formats whose scales are not a
free float (mxfp4's E8M0 exponents, nvfp4's E4M3 scales under a tensor scale) are left as
they are (logged). Rotated layers (MR-GPTQ) train in the rotated basis: the block sees
``W = W' M`` with ``M`` the inverse rotation as a matrix.

Memory: one block (its dense weights, the decoded ``u`` and the trained parameters) plus the
calibration activations the driver already keeps, plus one set of dense target outputs.
Cost: ``steps`` forward and backward passes of one block on ``batch`` windows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import formats as F
from ..formats import GroupParams
from ..formats.base import round_scale
from ..nn.linear import MarlinLinear
from ..nn.quantize import replace_module
from .hadamard import unrotate

log = logging.getLogger("metal_marlin_torch")

DEFAULT_STEPS = 64
DEFAULT_LR = 2e-3
DEFAULT_BATCH = 2


@dataclass
class RefineOptions:
    """Settings of :func:`refine_block` (``QuantConfig.method_options`` keys ``refine_steps``,
    ``refine_lr``, ``refine_batch``).

    Attributes:
        steps: Adam steps per block (each one forward and backward pass on ``batch`` windows).
        lr: Adam's learning rate on the relative parameters ``a``, ``c`` (module doc); decayed
            to zero by a cosine schedule over the steps.
        batch: calibration windows per step.
    """

    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    batch: int = DEFAULT_BATCH

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"refine: steps must be an int >= 0, got {self.steps!r}")
        if not isinstance(self.lr, (int, float)) or not 0.0 < float(self.lr) < 1.0:
            raise ValueError(f"refine: lr must be a number in (0, 1), got {self.lr!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"refine: batch must be a positive int, got {self.batch!r}")


def refinable(fmt: F.WeightFormat) -> bool:
    """Whether ``fmt``'s stored scales (and biases) are free floats a gradient step can move:
    not E8M0/E4M3 scales, no tensor-wide scale."""
    return fmt.fixed_scale_dtype is None and not fmt.has_global_scale


class _Refinable(nn.Module):
    """A :class:`MarlinLinear` with its codes frozen and its scales/biases trainable (module doc).

    ``weight()`` is ``(s0 (1 + a)) * u + (b0 + s0 c)`` per group, rotated back when the layer has
    an input rotation; ``forward`` is a dense linear with it."""

    def __init__(self, layer: MarlinLinear) -> None:
        super().__init__()
        fmt = F.get_format(layer.format)
        n, k = layer.out_features, layer.in_features
        t = layer._canonical_tensors()
        g = F.resolve_group_size(layer.group_size, k)
        codes = F.unpack(t["weight"], fmt.bits, k).view(n, k // g, g)
        s0 = t["scales"].float()
        b0 = t["biases"].float() if t.get("biases") is not None else None
        ones = torch.ones_like(s0)
        unit = GroupParams(ones, torch.zeros_like(s0) if b0 is not None else None, None)
        self.register_buffer("u", fmt.decode(codes, unit))  # [N, n_groups, G] at scale 1, bias 0
        self.register_buffer("s0", s0)
        self.register_buffer("b0", b0)
        self.a = nn.Parameter(torch.zeros_like(s0))
        self.c = nn.Parameter(torch.zeros_like(s0)) if b0 is not None else None
        self.shape = (n, k)
        self.bias = layer.bias
        m = None
        if layer.rotation_block:
            eye = torch.eye(k, dtype=torch.float32, device=s0.device)
            m = unrotate(eye, layer.rotation_block, layer.rotation_signs)  # W = W' @ M
        self.register_buffer("m", m)
        # the decomposition must reproduce the layer's weight before any step, or the format's
        # decode is not affine in (scale, bias) and training would change what the codes mean
        w_layer = layer.dequantized_weight(torch.float32)
        if not torch.allclose(self._rotated_weight(), w_layer, rtol=1e-5, atol=1e-6):
            raise ValueError(f"refine: format {layer.format!r} does not decode as scale * code + bias")

    def scales(self) -> torch.Tensor:
        return self.s0 * (1.0 + self.a)

    def biases(self) -> torch.Tensor | None:
        return None if self.c is None else self.b0 + self.s0 * self.c

    def _rotated_weight(self) -> torch.Tensor:
        w = self.u * self.scales().unsqueeze(-1)
        b = self.biases()
        if b is not None:
            w = w + b.unsqueeze(-1)
        return w.reshape(self.shape)

    def weight(self) -> torch.Tensor:
        w = self._rotated_weight()
        return w if self.m is None else w @ self.m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.weight(), b).to(x.dtype)


def _batch_of(obj: Any) -> int | None:
    return obj.shape[0] if isinstance(obj, torch.Tensor) and obj.dim() > 0 else None


def _take(obj: Any, batch: int, idx: slice) -> Any:
    """``obj`` (tensors in tuples, lists, dicts) with every tensor whose first dimension is the
    calibration batch cut to ``idx``; tensors broadcast over the batch (dimension 1: rotary
    tables, position ids) are kept whole."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if obj.dim() > 0 and obj.shape[0] == batch else obj
    if isinstance(obj, tuple):
        return tuple(_take(o, batch, idx) for o in obj)
    if isinstance(obj, list):
        return [_take(o, batch, idx) for o in obj]
    if isinstance(obj, dict):
        return {k: _take(v, batch, idx) for k, v in obj.items()}
    return obj


def minibatches(inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor], size: int,
                 hidden_of: Callable[[tuple, dict], torch.Tensor]) -> list[tuple[tuple, dict, torch.Tensor]]:
    """The driver's calibration batches cut into pieces of at most ``size`` windows."""
    out = []
    for (args, kwargs), target in zip(inputs, targets, strict=True):
        b = _batch_of(hidden_of(args, kwargs))
        if b is None or b <= size:
            out.append((args, kwargs, target))
            continue
        for start in range(0, b, size):
            idx = slice(start, min(start + size, b))
            out.append((_take(args, b, idx), _take(kwargs, b, idx), target[idx]))
    return out


def refine_block(
    block: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor],
    options: RefineOptions, device: torch.device | str,
    run: Callable[[nn.Module, tuple, dict], torch.Tensor],
    hidden_of: Callable[[tuple, dict], torch.Tensor],
) -> dict[str, float]:
    """Tune the scales and biases of ``block``'s :class:`MarlinLinear` layers in place (codes
    unchanged) so ``run(block, args, kwargs)`` approaches ``targets`` (module doc).

    Args:
        block: a block whose selected linears are already quantized.
        inputs: the driver's calibration batches ``(args, kwargs)`` reaching the block.
        targets: the dense block's outputs, one per batch (same shapes as the block's output).
        options: :class:`RefineOptions`.
        device: compute device.
        run: ``run(block, args, kwargs) -> hidden output`` (moves arguments to ``device``).
        hidden_of: the hidden-state tensor among a batch's arguments (to find its batch size).

    Returns:
        ``{"loss_before": ..., "loss_after": ...}``: the relative squared error
        ``|out - target|^2 / |target|^2`` over all batches before and after (after >
        before cannot be kept: the parameters are then left as they were).
    """
    layers = {n: m for n, m in block.named_modules() if isinstance(m, MarlinLinear)}
    train: dict[str, _Refinable] = {}
    for name, layer in layers.items():
        if not refinable(F.get_format(layer.format)):
            log.info("refine: %s (%s) keeps its scales: they are not free floats", name, layer.format)
            continue
        train[name] = _Refinable(layer)
    if not train or options.steps == 0:
        return {"loss_before": math.nan, "loss_after": math.nan}
    with trained_in_place(block, train, layers):
        loss_before = _loss(block, inputs, targets, run)
        params = [p for m in train.values() for p in m.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=float(options.lr))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: 0.5 * (1.0 + math.cos(math.pi * i / options.steps)))
        pieces = minibatches(inputs, targets, options.batch, hidden_of)
        order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(0)).tolist()
        with torch.enable_grad():
            for step in range(options.steps):
                args, kwargs, target = pieces[order[step % len(order)]]
                out = run(block, args, kwargs).float()
                t = target.to(out.device).float()
                loss = (out - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-30)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        loss_after = _loss(block, inputs, targets, run)
        keep = loss_after < loss_before
        if keep:
            for name, mod in train.items():
                _install(layers[name], mod)
        else:
            log.info("refine: block loss %.4g did not improve on %.4g; parameters left as they were",
                     loss_after, loss_before)
    return {"loss_before": loss_before, "loss_after": loss_after if keep else loss_before}


@contextmanager
def trained_in_place(block: nn.Module, train: dict[str, nn.Module],
                     layers: dict[str, MarlinLinear]) -> Iterator[None]:
    """Inside: every parameter ``block`` had is frozen and ``train``'s modules stand in for the
    layers of the same names (only their own parameters get gradients); on exit, also on error,
    ``layers`` are back in place and the parameters' ``requires_grad`` as it was. Shared by
    :func:`refine_block` and learned rounding (:mod:`.autoround`)."""
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    for name, mod in train.items():
        replace_module(block, name, mod)
    try:
        yield
    finally:
        for name, layer in layers.items():
            replace_module(block, name, layer)
        for p, r in frozen:
            p.requires_grad_(r)


def _loss(block: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor],
          run: Callable[[nn.Module, tuple, dict], torch.Tensor]) -> float:
    num = 0.0
    den = 0.0
    with torch.no_grad():
        for (args, kwargs), target in zip(inputs, targets, strict=True):
            out = run(block, args, kwargs).float()
            t = target.to(out.device).float()
            num += float((out - t).pow(2).sum())
            den += float(t.pow(2).sum())
    return num / max(den, 1e-30)


def _install(layer: MarlinLinear, mod: _Refinable) -> None:
    """Write ``mod``'s trained scales/biases into ``layer``, rounded to its scale dtype; the
    packed codes are the layer's own tensor, untouched."""
    t = layer._canonical_tensors()
    sdt = t["scales"].dtype
    with torch.no_grad():
        scales = round_scale(mod.scales().detach(), sdt)
        b = mod.biases()
        biases = None if b is None else round_scale(b.detach(), sdt, what="bias")
    qt = F.QuantizedTensor(weight=t["weight"], scales=scales, biases=biases, global_scale=layer.global_scale,
                           format=layer.format, group_size=layer.group_size,
                           shape=(layer.out_features, layer.in_features))
    layer.load_quantized(qt, rotation_block=layer.rotation_block, rotation_signs=layer.rotation_signs)
