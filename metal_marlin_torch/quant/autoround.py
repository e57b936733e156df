"""Learnable rounding (AutoRound): per-weight rounding offsets, and each group's scale and bias,
learned block by block by signed gradient descent against the dense block's output.

GPTQ and RTN fix every code from the layer's own error. AutoRound (Cheng et al., "Optimize
Weight Rounding via Signed Gradient Descent", 2023) instead asks, for each weight, whether to
round up or down so that the *block's output* is closest to the dense block's: each weight gets
an offset ``V`` in ``[-0.5, 0.5]`` added before rounding, learned by signed gradient descent
(``V -= lr * sign(dL/dV)``, the rounding passed through by a straight-through estimator), then
the codes are fixed. Here the block runs on the calibration inputs that reach it through the
already quantized blocks, and the loss is the relative squared error to the *dense* block's
output on the *dense* inputs (as in :mod:`.refine`), so a block also corrects part of the error
the blocks before it left.

Rounding in index space (why one code path serves int2..int8 and nf3/nf4): the format's values
at scale 1 and bias 0 (its codebook ``u_0 < u_1 < ... < u_{L-1}``; affine: ``u_j = j``) are
sorted, and a weight ``w`` of a group with scale ``s`` and bias ``b`` sits at the fractional
index ``p`` where the piecewise-linear interpolation of the codebook equals ``(w - b) / s``.
The code is ``j = clamp(round(c + V), 0, L - 1)``, with the *centre* ``c`` from the base
method: ``c = j0 + clamp(p - j0, -0.49, 0.49)`` for its code ``j0``. So ``V = 0`` gives back
the base method's codes exactly (GPTQ's or RTN's), a weight can move to either neighbouring
codebook value, and the move towards the dense weight's side is the nearer one. For NormalFloat
this is rounding between the two neighbouring codebook values, with the gradient scaled by the
local spacing of the codebook.

Scale and bias (``options.scales``, AutoRound's learned clipping range in this
parametrization): ``s = s0 * (1 + a)``, ``b = b0 + s0 * c`` with ``a = c = 0`` at the start, as
in :mod:`.refine`, trained by the same signed steps; the codes' centres stay those of ``s0``,
``b0``.

Formats whose decode is not ``scale * value + bias`` with free float scales (fp4 with its two
zeros, mxfp4's E8M0 and nvfp4's E4M3 scales, fp8) keep the base method's result, logged and
listed in the report. Rotated layers (MR-GPTQ) learn in the rotated basis.

Memory: one block (dense weights, centres, offsets and their gradients: about 4 floats per
weight) plus the calibration activations the driver keeps and one set of dense targets.
Cost: ``steps`` forward and backward passes of one block on ``batch`` windows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import formats as F
from ..formats import GroupParams
from ..formats.base import round_scale
from ..nn.linear import MarlinLinear
from .hadamard import rotate, unrotate
from .refine import minibatches, trained_in_place

log = logging.getLogger("metal_marlin_torch")

# chosen on pylm-s's held-out *calibration* windows at a 3.5-bit budget (benchmarks/autoround_tune.py,
# results/autoround_tune.json): 50 steps at 1/steps = 0.02 left the KL where GPTQ had it (0.0524 ->
# 0.0525; every step moves every group's scale by 2 %), 0.005 lowered it to 0.0433
DEFAULT_STEPS = 50
DEFAULT_LR = 5e-3
DEFAULT_BATCH = 4
INITS = ("gptq", "rtn")
LOSSES = ("mse", "token")
CENTRE_MARGIN = 0.49  # |c - j0| <= this: round(c) is j0 whatever the rounding of ties


@dataclass
class AutoRoundOptions:
    """Settings of :func:`autoround_block` (``QuantConfig.method_options`` keys ``autoround_steps``,
    ``autoround_lr``, ``autoround_batch``, ``autoround_scales``, ``autoround_init``).

    Attributes:
        steps: signed-gradient steps per block (each one forward and backward pass on
            ``batch`` windows); 0 keeps the base method's result.
        lr: step size of the signed descent, decayed linearly to zero; None = ``1 / steps``
            (AutoRound's default, which with few steps and small batches moves too much here).
        batch: calibration windows per step.
        scales: also learn each group's scale and bias (relative, see the module doc).
        init: the base method whose codes are the starting point: ``gptq`` (GPTQ with the
            driver's GPTQ options) or ``rtn`` (round to nearest with the scale search).
        loss: ``mse`` (AutoRound's: the squared error over every output element, relative to
            the target's mean square) or ``token`` (each token's squared error relative to its
            own target's: a few tokens with huge hidden states, e.g. an attention sink, do not
            outweigh the rest, as the next block's RMS/LayerNorm would not let them).
    """

    steps: int = DEFAULT_STEPS
    lr: float | None = DEFAULT_LR
    batch: int = DEFAULT_BATCH
    scales: bool = True
    init: str = "gptq"
    loss: str = "mse"

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"autoround: steps must be an int >= 0, got {self.steps!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not 0.0 < float(self.lr) <= 1.0):
            raise ValueError(f"autoround: lr must be a number in (0, 1] or None, got {self.lr!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise ValueError(f"autoround: batch must be a positive int, got {self.batch!r}")
        if not isinstance(self.scales, bool):
            raise ValueError(f"autoround: scales must be a bool, got {self.scales!r}")
        if self.init not in INITS:
            raise ValueError(f"autoround: init must be one of {INITS}, got {self.init!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"autoround: loss must be one of {LOSSES}, got {self.loss!r}")

    @property
    def step_size(self) -> float:
        return float(self.lr) if self.lr is not None else 1.0 / max(self.steps, 1)


def sorted_codebook(fmt: F.WeightFormat) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(values, codes)``: the format's values at scale 1 and bias 0 in increasing order and the
    code of each; None when the format has no such table (tensor-wide or non-float scales,
    repeated values such as fp4's two zeros, or more than 256 codes)."""
    if fmt.fixed_scale_dtype is not None or fmt.has_global_scale or fmt.bits > 8:
        return None
    codes = torch.arange(1 << fmt.bits).view(1, 1, -1)
    unit = GroupParams(torch.ones(1, 1), torch.zeros(1, 1) if fmt.has_biases else None, None)
    values = fmt.decode(codes, unit).reshape(-1).float()
    values, order = torch.sort(values)
    if not bool((values[1:] > values[:-1]).all()):
        return None
    return values, order


def supported(format: str) -> bool:
    """Whether :func:`autoround_block` can learn the rounding of layers in ``format``."""
    return sorted_codebook(F.get_format(format)) is not None


class _Rounding(nn.Module):
    """A :class:`MarlinLinear` whose codes are ``clamp(round(c + V))`` in the sorted codebook and
    whose scales and biases are ``s0 (1 + a)``, ``b0 + s0 c_b`` (module doc); ``forward`` is a
    dense linear with the weight that gives (straight-through gradients to ``V``)."""

    def __init__(self, layer: MarlinLinear, dense: torch.Tensor, scales: bool) -> None:
        super().__init__()
        fmt = F.get_format(layer.format)
        table = sorted_codebook(fmt)
        if table is None:
            raise ValueError(f"autoround: format {layer.format!r} has no codebook of values at a free float scale")
        values, order = table
        n, k = layer.out_features, layer.in_features
        dev = layer.weight.device
        t = layer._canonical_tensors()
        g = F.resolve_group_size(layer.group_size, k)
        codes = F.unpack(t["weight"], fmt.bits, k).view(n, k // g, g).long().to(dev)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel())
        values = values.to(dev)
        self.register_buffer("values", values)
        self.register_buffer("codes_of", order.to(dev))  # sorted index -> code
        steps = values[1:] - values[:-1]
        # d(value)/d(index) at each index: the mean of the two neighbouring spacings
        slope = torch.cat([steps[:1], 0.5 * (steps[1:] + steps[:-1]), steps[-1:]])
        self.register_buffer("slope", slope)
        s0 = t["scales"].float().to(dev)
        b0 = t["biases"].float().to(dev) if t.get("biases") is not None else None
        self.register_buffer("s0", s0)
        self.register_buffer("b0", b0)
        w = dense.detach().float().to(dev)
        if layer.rotation_block:
            w = rotate(w, layer.rotation_block, layer.rotation_signs)
        x = w.view(n, k // g, g)
        if b0 is not None:
            x = x - b0.unsqueeze(-1)
        safe = torch.where(s0 == 0, torch.ones_like(s0), s0)
        x = x / safe.unsqueeze(-1)
        j0 = rank.to(dev)[codes].float()
        centre = j0 + (self._index(x) - j0).clamp(-CENTRE_MARGIN, CENTRE_MARGIN)
        self.register_buffer("centre", centre)
        self.v = nn.Parameter(torch.zeros_like(centre))
        self.a = nn.Parameter(torch.zeros_like(s0)) if scales else None
        self.c = nn.Parameter(torch.zeros_like(s0)) if scales and b0 is not None else None
        self.shape = (n, k)
        self.bias = layer.bias
        self.register_buffer("m", unrotate(torch.eye(k, device=dev), layer.rotation_block, layer.rotation_signs)
                             if layer.rotation_block else None)  # W = W' @ M
        # V = 0 must give back the layer's own weight, or the codebook does not describe the format
        with torch.no_grad():
            same = torch.allclose(self.weight(), layer.dequantized_weight(torch.float32), rtol=1e-5, atol=1e-6)
        if not same:
            raise ValueError(f"autoround: format {layer.format!r} does not decode as scale * value + bias")

    def _index(self, x: torch.Tensor) -> torch.Tensor:
        """The fractional index where the piecewise-linear codebook equals ``x`` (clamped)."""
        vals = self.values
        lo = (torch.searchsorted(vals, x.contiguous(), right=True) - 1).clamp(0, vals.numel() - 2)
        left = vals[lo]
        frac = (x - left) / (vals[lo + 1] - left)
        return (lo.float() + frac).clamp(0.0, float(vals.numel() - 1))

    def indices(self) -> torch.Tensor:
        """The sorted-codebook index of every weight, ``int64 [N, n_groups, G]``."""
        return torch.round(self.centre + self.v.detach()).clamp(0, self.values.numel() - 1).long()

    def scales(self) -> torch.Tensor:
        return self.s0 if self.a is None else self.s0 * (1.0 + self.a)

    def biases(self) -> torch.Tensor | None:
        if self.b0 is None:
            return None
        return self.b0 if self.c is None else self.b0 + self.s0 * self.c

    def weight(self) -> torch.Tensor:
        z = self.centre + self.v
        idx = self.indices()
        # straight-through: the value is the codebook's at the rounded index, the gradient that
        # of the codebook's local slope (zero where the clamp holds the index at an end)
        inside = (z > -0.5) & (z < self.values.numel() - 0.5)
        u = self.values[idx] + (z - z.detach()) * (self.slope[idx] * inside)
        w = u * self.scales().unsqueeze(-1)
        b = self.biases()
        if b is not None:
            w = w + b.unsqueeze(-1)
        w = w.reshape(self.shape)
        return w if self.m is None else w @ self.m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.float()
        return nn.functional.linear(x.float(), self.weight(), b).to(x.dtype)

    def install(self, layer: MarlinLinear) -> int:
        """Write the learned codes, scales and biases into ``layer`` (scales rounded to its scale
        dtype); returns how many codes changed."""
        fmt = F.get_format(layer.format)
        t = layer._canonical_tensors()
        n, k = self.shape
        codes = self.codes_of[self.indices()].reshape(n, k)
        old = F.unpack(t["weight"], fmt.bits, k).long().to(codes.device)
        sdt = t["scales"].dtype
        with torch.no_grad():
            scales = round_scale(self.scales().detach(), sdt)
            b = self.biases()
            biases = None if b is None else round_scale(b.detach(), sdt, what="bias")
        qt = F.QuantizedTensor(weight=F.pack(codes.to(torch.int32), fmt.bits).to(t["weight"].device),
                               scales=scales.to(t["scales"].device),
                               biases=None if biases is None else biases.to(t["scales"].device),
                               global_scale=layer.global_scale, format=layer.format,
                               group_size=layer.group_size, shape=(n, k))
        layer.load_quantized(qt, bias=layer.bias, rotation_block=layer.rotation_block,
                             rotation_signs=layer.rotation_signs)
        return int((codes != old.view(n, k)).sum())


def _error(out: torch.Tensor, target: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(numerator, denominator)`` of the relative error ``kind`` (:class:`AutoRoundOptions`)."""
    t = target.to(out.device).float()
    sq = (out.float() - t).pow(2)
    if kind == "token":
        per_token = sq.sum(-1) / t.pow(2).sum(-1).clamp_min(1e-30)
        return per_token.sum(), torch.tensor(float(per_token.numel()))
    return sq.sum(), t.pow(2).sum().clamp_min(1e-30)


def _loss(block: nn.Module, inputs: list[tuple[tuple, dict]], targets: list[torch.Tensor],
          run: Callable[[nn.Module, tuple, dict], torch.Tensor], kind: str = "mse") -> float:
    """The relative error ``kind`` over every batch."""
    num = den = 0.0
    with torch.no_grad():
        for (args, kwargs), target in zip(inputs, targets, strict=True):
            a, b = _error(run(block, args, kwargs), target, kind)
            num += float(a)
            den += float(b)
    return num / max(den, 1e-30)


def autoround_block(
    block: nn.Module, dense: dict[str, torch.Tensor], inputs: list[tuple[tuple, dict]],
    targets: list[torch.Tensor], options: AutoRoundOptions,
    run: Callable[[nn.Module, tuple, dict], torch.Tensor],
    hidden_of: Callable[[tuple, dict], torch.Tensor],
    sign: Callable[[torch.Tensor], torch.Tensor] = torch.sign,
) -> dict[str, Any]:
    """Learn the rounding (and scales) of ``block``'s quantized layers in place (module doc).

    Args:
        block: a block whose linears named in ``dense`` are :class:`MarlinLinear` already
            (quantized by the base method: the starting codes).
        dense: layer name (inside the block) -> its dense weight ``[N, K]`` before quantization.
        inputs: the driver's calibration batches ``(args, kwargs)`` reaching the block.
        targets: the dense block's outputs, one per batch.
        options: :class:`AutoRoundOptions`.
        run: ``run(block, args, kwargs) -> hidden output`` (moves arguments to the device).
        hidden_of: the hidden-state tensor among a batch's arguments (its batch size).
        sign: the step direction from a gradient (tests substitute others).

    Returns:
        ``{"loss_before", "loss_after", "changed": codes changed, "weights": weights learned,
        "kept_base": [layers left to the base method: format not supported]}``. The losses are
        relative squared errors over all batches; a result no better than the start is not
        kept (the layers are left as the base method made them).
    """
    layers = {n: m for n, m in block.named_modules() if isinstance(m, MarlinLinear) and n in dense}
    train: dict[str, _Rounding] = {}
    kept_base = []
    for name, layer in layers.items():
        if not supported(layer.format):
            log.info("autoround: %s (%s) keeps the base method's codes: the format has no codebook at a free "
                     "float scale", name, layer.format)
            kept_base.append(name)
            continue
        train[name] = _Rounding(layer, dense[name], options.scales)
    report: dict[str, Any] = {"loss_before": math.nan, "loss_after": math.nan, "changed": 0,
                              "weights": sum(m.v.numel() for m in train.values()), "kept_base": kept_base}
    if not train or options.steps == 0:
        return report
    with trained_in_place(block, train, layers):
        loss_before = _loss(block, inputs, targets, run, options.loss)
        params = [p for m in train.values() for p in m.parameters() if p.requires_grad]
        pieces = minibatches(inputs, targets, options.batch, hidden_of)
        order = torch.randperm(len(pieces), generator=torch.Generator().manual_seed(0)).tolist()
        lr = options.step_size
        with torch.enable_grad():
            for step in range(options.steps):
                args, kwargs, target = pieces[order[step % len(order)]]
                num, den = _error(run(block, args, kwargs), target, options.loss)
                loss = num / den
                for p in params:
                    p.grad = None
                loss.backward()
                rate = lr * (1.0 - step / options.steps)  # linear decay, as AutoRound
                with torch.no_grad():
                    for m in train.values():
                        for p, bound in ((m.v, 0.5), (m.a, 0.5), (m.c, 1.0)):
                            if p is not None and p.grad is not None:
                                p.sub_(rate * sign(p.grad)).clamp_(-bound, bound)
        loss_after = _loss(block, inputs, targets, run, options.loss)
        keep = loss_after < loss_before
        if keep:
            for name, mod in train.items():
                report["changed"] += mod.install(layers[name])
        else:
            log.info("autoround: block loss %.4g did not improve on %.4g; the base method's codes are kept",
                     loss_after, loss_before)
    report["loss_before"] = loss_before
    report["loss_after"] = loss_after if keep else loss_before
    return report
