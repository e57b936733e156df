"""MSE-optimal group parameters: a shrink-factor grid search over each format's own scale rule.

The formats choose a group's parameters from its extremes (absmax, or min and max). For coarse
grids (E2M1, NF3, 2-3-bit integers) clipping a few large weights to shrink the scale lowers the
error of all the others, so we try ``alpha`` in a small grid (1.0 down to ``min_shrink``), plus
two expansions: 1.05 (a scale rounded down to fp16 or E4M3 clips the group's largest value
slightly) and, for MXFP4's power-of-two E8M0 scale, 2.0 (the OCP rule ``floor(log2 absmax) - 2``
clips values between 6 and 8 times the scale; the next exponent does not). We build
the parameters the format would choose for the group scaled by ``alpha`` (so every candidate is
a valid stored scale: fp16/fp32, E8M0, E4M3) and keep, per group, the candidate with the least
(optionally weighted) squared error. Vectorized over all groups; one pass per candidate.
"""

from __future__ import annotations

import torch

from ..formats import GroupParams, WeightFormat
from ..formats.base import safe_divisor
from ..formats.fp4 import E2M1_MAX, NVFP4, _E2M1Format, e2m1_round

DEFAULT_GRID = 16
DEFAULT_MIN_SHRINK = 0.6


def candidate_params(
    fmt: WeightFormat, groups: torch.Tensor, scale_dtype: torch.dtype, alpha: float,
    base: GroupParams | None = None,
) -> GroupParams:
    """The parameters ``fmt`` would choose for ``groups * alpha``.

    For nvfp4 the per-tensor ``global_scale`` of ``base`` (alpha = 1) is kept: only the per-16
    E4M3 scales shrink (scaling the whole tensor would rescale both and change nothing).
    """
    if fmt.has_global_scale:
        if not isinstance(fmt, NVFP4):
            raise ValueError(f"candidate_params: no scale search rule for format {fmt.name!r}")
        base = base or fmt.group_params(groups, scale_dtype)
        g = base.global_scale
        block = groups.abs().amax(-1) * alpha / (E2M1_MAX * g)
        scales = block.clamp(max=NVFP4.E4M3_MAX).to(torch.float8_e4m3fn)
        return GroupParams(scales, None, g)
    return fmt.group_params(groups * alpha, scale_dtype)


def _select(mask: torch.Tensor, new: torch.Tensor | None, old: torch.Tensor | None) -> torch.Tensor | None:
    if new is None:
        return old
    if new.dtype in (torch.uint8, torch.float8_e4m3fn):  # torch.where has no float8 kernel on CPU
        return torch.where(mask, new.view(torch.uint8), old.view(torch.uint8)).view(new.dtype)
    return torch.where(mask, new, old)


def search_group_params(
    fmt: WeightFormat,
    groups: torch.Tensor,
    scale_dtype: torch.dtype,
    weights: torch.Tensor | None = None,
    grid: int = DEFAULT_GRID,
    min_shrink: float = DEFAULT_MIN_SHRINK,
) -> GroupParams:
    """Per-group parameters of float32 ``groups [N, n_groups, G]`` minimizing squared error.

    Args:
        fmt: the weight format.
        groups: the weights, grouped.
        scale_dtype: requested scale storage dtype (formats with a fixed one ignore it).
        weights: optional non-negative importance ``[n_groups, G]`` or ``[N, n_groups, G]``
            (e.g. the Hessian diagonal: GPTQ's output error per input); None = plain MSE.
        grid: number of shrink candidates, ``alpha = linspace(1, min_shrink, grid)`` (1 = RTN's
            params; grid 1 returns them), plus the expansions of the module docstring.
        min_shrink: smallest shrink factor tried.
    """
    if groups.dim() != 3:
        raise ValueError(f"search_group_params: groups must be [N, n_groups, G], got {tuple(groups.shape)}")
    if not isinstance(grid, int) or grid < 1:
        raise ValueError(f"search_group_params: grid must be a positive int, got {grid!r}")
    if not 0.0 < min_shrink <= 1.0:
        raise ValueError(f"search_group_params: min_shrink must be in (0, 1], got {min_shrink!r}")
    groups = groups.float()
    base = fmt.group_params(groups, fmt.scale_dtype(scale_dtype))
    best = base
    if grid == 1:
        return best

    e2m1 = isinstance(fmt, _E2M1Format)

    def error(p: GroupParams) -> torch.Tensor:
        if e2m1:  # the values of decode(encode(...)) without building codes (bitwise, up to the sign of 0)
            eff = fmt._effective_scale(p).unsqueeze(-1)
            d = e2m1_round(groups / safe_divisor(eff)) * eff - groups
        else:
            d = fmt.decode(fmt.encode(groups, p), p) - groups
        d = d * d
        if weights is not None:
            d = d * weights
        return d.sum(-1)

    best_err = error(base)
    # Every format's group parameters depend only on each group's smallest and largest value
    # (absmax rules: the larger magnitude of the two; affine rules: both), and for alpha > 0
    # rounding commutes with the scaling (min(g * alpha) == min(g) * alpha in float32), so the
    # candidates are built from [N, n_groups, 2] extremes instead of the whole groups times
    # alpha: the same parameters bit for bit (the test compares), without G/2 times the work.
    extremes = torch.stack((groups.amin(-1), groups.amax(-1)), -1)
    alphas = torch.linspace(1.0, min_shrink, grid)[1:].tolist() + [1.05]
    if fmt.fixed_scale_dtype == torch.uint8:  # E8M0: one exponent up
        alphas.append(2.0)
    for alpha in alphas:
        cand = candidate_params(fmt, extremes, fmt.scale_dtype(scale_dtype), alpha, base)
        err = error(cand)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = GroupParams(
            _select(better, cand.scales, best.scales),
            _select(better, cand.biases, best.biases),
            best.global_scale,
        )
    return best
