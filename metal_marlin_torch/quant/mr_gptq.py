"""MR-GPTQ: block Hadamard rotation of the inputs + GPTQ (Egiazarian et al., 2025, "Bridging
the gap between promise and performance for microscaling FP4 quantization").

Per layer: rotate the weight rows along K (``W' = hadamard(W * signs, b)``) and the input
Hessian (``H' = R^T H R``), GPTQ-quantize ``W'`` against ``H'``, and store the rotation in the
layer (``rotation_block``, ``rotation_signs``) so :class:`MarlinLinear` rotates its input
online. Without a Hessian the same function gives "RTN + rotation", the baseline that shows
what the rotation alone does to a format.

:func:`quantize_linear` is the one per-layer entry point of the model driver for every method:
``rtn`` (no Hessian, no rotation), ``gptq`` (Hessian), ``mr-gptq`` (Hessian + rotation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import formats as F
from ..dtypes import DTypeConfig, resolve
from ..nn.config import LayerPlan
from ..nn.linear import MarlinLinear
from .gptq import gptq_quantize
from .hadamard import choose_block, random_signs, rotate, rotate_hessian
from .rtn import rtn_search
from .scale_search import DEFAULT_GRID, DEFAULT_MIN_SHRINK

DEFAULT_ROTATION_BLOCK = 128


@dataclass(frozen=True)
class Rotation:
    """A layer's input rotation: ``block`` (0 = none) and optional ``signs [K]``."""

    block: int = 0
    signs: torch.Tensor | None = None


def rotation_for(k: int, block: int = DEFAULT_ROTATION_BLOCK, signs: bool = False, seed: int = 0) -> Rotation:
    """The rotation for ``k`` inputs: block by :func:`~.hadamard.choose_block`, optional seeded signs."""
    b = choose_block(k, block)
    if not b:
        return Rotation()
    return Rotation(b, random_signs(k, seed) if signs else None)


def quantize_linear(
    linear: nn.Linear,
    plan: LayerPlan,
    dtype_config: DTypeConfig | None = None,
    hessian: torch.Tensor | None = None,
    rotation: Rotation | None = None,
    gptq_options: dict[str, Any] | None = None,
) -> MarlinLinear:
    """Quantize one ``nn.Linear`` into a :class:`MarlinLinear` (the linear is not modified).

    Args:
        linear: the layer.
        plan: format and group size.
        dtype_config: dtypes of the new layer (scales, activations); None = the default.
        hessian: ``[K, K]`` input Hessian of the *unrotated* inputs -> GPTQ; None -> RTN.
        rotation: input rotation (MR-GPTQ, or RTN + rotation); None = none.
        gptq_options: keyword options of :func:`~.gptq.gptq_quantize` (damp, block_size, ...);
            with ``rtn: True`` round to nearest with the scale search instead (``scale_search``,
            ``search_grid``, ``min_shrink``), weighted by ``diag(hessian)`` when one is given.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"quantize_linear: expected nn.Linear, got {type(linear).__name__}")
    dcfg = resolve(dtype_config)
    rotation = rotation or Rotation()
    w = linear.weight.detach().float()
    if rotation.block:
        w = rotate(w, rotation.block, rotation.signs)
    sdt = dcfg.torch_scales
    opts = dict(gptq_options or {})
    if opts.pop("rtn", False):  # RTN with the scale search, importance-weighted by diag(H) if given
        imp = None
        if hessian is not None:
            h = hessian.to(device=w.device, dtype=torch.float32)
            imp = torch.diagonal(rotate_hessian(h, rotation.block, rotation.signs) if rotation.block else h)
        grid = int(opts.get("search_grid", DEFAULT_GRID)) if opts.get("scale_search", True) else 1
        qt = rtn_search(w, plan.format, plan.group_size, sdt, imp, grid,
                        float(opts.get("min_shrink", DEFAULT_MIN_SHRINK)))
    elif hessian is None:
        qt = F.quantize(w, plan.format, plan.group_size, sdt)
    else:
        h = hessian.to(device=w.device, dtype=torch.float32)
        if rotation.block:
            h = rotate_hessian(h, rotation.block, rotation.signs)
        qt = gptq_quantize(w, h, plan.format, plan.group_size, sdt, **opts).qt
    layer = MarlinLinear.like(linear, plan.format, plan.group_size, dcfg, rotation.block, device=w.device)
    layer.load_quantized(qt, bias=linear.bias, rotation_block=rotation.block,
                         rotation_signs=rotation.signs)
    return layer
