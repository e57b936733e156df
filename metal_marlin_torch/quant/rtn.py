"""Round to nearest with MSE-optimal group parameters, plain or importance-weighted.

Plain RTN takes each group's parameters from its extremes (absmax or min/max). The shrink
search of :mod:`.scale_search` (GPTQ's) picks, per group, the candidate parameters with the
least squared error instead: no data needed, a few passes over the weights.

With calibration activations the error can be weighted by each input column's importance
``E[x_k^2]`` (the diagonal of the layer's input Hessian ``X^T X / T``; llama.cpp calls its
collection an "importance matrix"): the layer's expected output error of a weight error
``d`` is ``sum_k E[x_k^2] d_k^2`` when inputs are uncorrelated, so the search then
minimizes that instead of the plain MSE. Collecting it costs one pass over the
calibration data; no Cholesky, no column loop, so a model quantizes in seconds.
"""

from __future__ import annotations

import torch

from .. import formats as F
from ..formats import QuantizedTensor
from .scale_search import DEFAULT_GRID, DEFAULT_MIN_SHRINK, search_group_params


def rtn_search(
    w: torch.Tensor, format: str, group_size: int = 128, scale_dtype: torch.dtype = torch.float16,
    importance: torch.Tensor | None = None, grid: int = DEFAULT_GRID, min_shrink: float = DEFAULT_MIN_SHRINK,
) -> QuantizedTensor:
    """Round-to-nearest ``w [N, K]`` with searched group parameters (module doc).

    Args:
        w: the weight (any float dtype).
        format, group_size, scale_dtype: as :func:`metal_marlin_torch.formats.quantize`.
        importance: optional non-negative ``[K]`` (per input column, e.g. ``diag(H)``) or
            ``[N, K]`` (per weight, e.g. a Fisher diagonal) error weights; None = plain MSE.
        grid, min_shrink: the search's candidates (:func:`~.scale_search.search_group_params`;
            ``grid=1`` gives the format's own parameters, i.e. plain RTN).
    """
    fmt = F.get_format(format)
    if w.dim() != 2 or not w.dtype.is_floating_point:
        raise ValueError(f"rtn_search: w must be a 2-D float tensor [N, K], got {w.dtype} {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("rtn_search: w contains NaN or Inf")
    n, k = w.shape
    g = fmt.check_group_size(group_size, k)
    weights = None
    if importance is not None:
        if tuple(importance.shape) not in ((k,), (n, k)):
            raise ValueError(f"rtn_search: importance must be [{k}] or [{n}, {k}], got {tuple(importance.shape)}")
        imp = importance.detach().to(device=w.device, dtype=torch.float32).clamp_min(0)
        weights = imp.view(1, k // g, g) if imp.dim() == 1 else imp.view(n, k // g, g)
    groups = w.detach().float().view(n, k // g, g)
    sdt = fmt.scale_dtype(scale_dtype)
    params = search_group_params(fmt, groups, sdt, weights, grid, min_shrink)
    codes = fmt.encode(groups, params).view(n, k)
    return QuantizedTensor(weight=F.pack(codes, fmt.bits), scales=params.scales, biases=params.biases,
                           global_scale=params.global_scale, format=fmt.name, group_size=group_size,
                           shape=(n, k))
