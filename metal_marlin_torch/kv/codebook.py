"""Lloyd–Max codebooks for the coordinates of a rotated, normalized KV vector.

After the normalized Walsh–Hadamard rotation a key or value block ``y`` of ``B`` coordinates is
divided by its norm, so ``y / ||y||`` lies on the unit sphere ``S^(B-1)``. The rotation spreads
each vector's energy over all coordinates, and we model the result as a uniformly random point
of the sphere (TurboQuant's model; exact for a random rotation). One coordinate of such a point,
scaled by ``sqrt(B)`` to unit variance, has the density

    f_B(t) ∝ (1 - t²/B)^((B-3)/2),   |t| < sqrt(B),

which tends to N(0, 1) as B grows (B = 64: kurtosis 3·B/(B+2) ≈ 2.91 instead of 3). The
codebook for ``bits`` is the Lloyd–Max quantizer of ``f_B`` with ``2^bits`` levels: the levels
that minimise the mean squared error, the fixed point of Lloyd's iteration (cells = midpoints
between levels, level = centroid of its cell).

Choice, and why: we use the exact sphere marginal for the actual block size rather than the
Gaussian limit, since the block is known when the cache is built and the small-B marginal has
lighter tails (its outermost levels sit further in). ``distribution="gaussian"`` gives the
classic N(0, 1) Lloyd–Max quantizer (Max 1960), used by the tests as a check of the solver.

Numerics: the densities are integrated on a fine grid through the angle ``θ`` with
``t = sqrt(B) cos θ`` (density ∝ sin^(B-2) θ, bounded for every B >= 2), in float64 with
cumulative sums, so one Lloyd step costs a few interpolations per level. The start is the
Panter–Dite high-resolution solution (level density ∝ f^(1/3)), refined by 50 Lloyd steps and
then by Newton's method on the fixed-point equation (plain Lloyd needs tens of thousands of
steps for 256 levels). Results are cached per ``(bits, block, distribution)``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

_GRID = 1 << 18
_LLOYD_STEPS = 50
_NEWTON_STEPS = 50
_TOL = 1e-9


def _grid(block: int, distribution: str) -> tuple[np.ndarray, np.ndarray]:
    """Increasing points ``t`` and their probability weights (sum 1)."""
    if distribution == "sphere":
        theta = (np.arange(_GRID, dtype=np.float64) + 0.5) * (math.pi / _GRID)
        t = -math.sqrt(block) * np.cos(theta)  # increasing in theta
        log_w = (block - 2) * np.log(np.sin(theta))
    elif distribution == "gaussian":
        half = 9.0
        t = (np.arange(_GRID, dtype=np.float64) + 0.5) * (2 * half / _GRID) - half
        log_w = -0.5 * t * t
    else:
        raise ValueError(f"lloyd_max_codebook: distribution must be 'sphere' or 'gaussian', got {distribution!r}")
    w = np.exp(log_w - log_w.max())
    return t, w / w.sum()


def _density(t: np.ndarray, block: int, distribution: str) -> np.ndarray:
    """The normalized density at ``t`` (used only for the Newton Jacobian)."""
    if distribution == "gaussian":
        return np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    log_c = math.lgamma(block / 2) - math.lgamma((block - 1) / 2) - 0.5 * math.log(math.pi * block)
    inside = np.clip(1.0 - t * t / block, 1e-300, None)
    return np.exp(log_c + 0.5 * (block - 3) * np.log(inside))


def _lloyd(t: np.ndarray, w: np.ndarray, levels: int, density) -> np.ndarray:
    """Lloyd–Max levels: a few plain Lloyd steps, then Newton on ``c = centroid(cells(c))``.

    Plain Lloyd converges very slowly for many levels (the tail levels creep), so after a
    warm start the fixed point is solved by Newton's method; its Jacobian is tridiagonal, from
    d centroid / d edge = f(edge) * (edge - centroid) / mass.
    """
    cw = np.concatenate(([0.0], np.cumsum(w)))
    cm = np.concatenate(([0.0], np.cumsum(w * t)))
    idx = np.arange(len(t) + 1, dtype=np.float64)
    centers = idx[:-1] + 0.5

    def centroids(c: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        mids = (c[1:] + c[:-1]) * 0.5
        # grid index of each cell edge (fractional: a cell edge splits a grid point linearly)
        edges = np.concatenate(([0.0], np.interp(mids, t, centers), [float(len(t))]))
        mass = np.diff(np.interp(edges, idx, cw))
        moment = np.diff(np.interp(edges, idx, cm))
        return np.where(mass > 0, moment / np.maximum(mass, 1e-300), c), mass, mids

    # Panter–Dite start: levels at equal quantiles of f^(1/3)
    w3 = np.cbrt(w)
    c = np.interp((np.arange(levels) + 0.5) / levels, np.cumsum(w3) / w3.sum(), t)
    for _ in range(_LLOYD_STEPS):
        c = centroids(c)[0]
    for _ in range(_NEWTON_STEPS):
        cen, mass, mids = centroids(c)
        resid = c - cen
        if np.max(np.abs(resid)) < _TOL:
            break
        f = density(mids)
        up = f * (mids - cen[:-1]) / mass[:-1]  # d cen_i / d mid_i   (upper edge of cell i)
        lo = f * (cen[1:] - mids) / mass[1:]  # d cen_{i+1} / d mid_i (lower edge of cell i+1)
        jac = np.eye(levels)
        k = np.arange(levels - 1)
        # mid_i = (c_i + c_{i+1}) / 2
        jac[k, k] -= 0.5 * up
        jac[k, k + 1] -= 0.5 * up
        jac[k + 1, k] -= 0.5 * lo
        jac[k + 1, k + 1] -= 0.5 * lo
        step = np.linalg.solve(jac, resid)
        new = c - step
        c = new if np.all(np.diff(new) > 0) else c - 0.5 * step
    return (c - c[::-1]) * 0.5  # exact symmetry (the densities are even)


@functools.cache
def _codebook(bits: int, block: int, distribution: str) -> tuple[float, ...]:
    t, w = _grid(block, distribution)
    return tuple(_lloyd(t, w, 2 ** bits, lambda x: _density(x, block, distribution)).tolist())


def lloyd_max_codebook(bits: int, block: int, distribution: str = "sphere") -> torch.Tensor:
    """float32 ``[2^bits]`` increasing levels for ``sqrt(B) * y / ||y||`` (see module doc).

    Args:
        bits: code width, 1..8.
        block: coordinates per norm ``B`` (>= 2); ignored for ``distribution="gaussian"``.
        distribution: ``"sphere"`` (the marginal of a uniform point of S^(B-1), scaled by
            sqrt(B)) or ``"gaussian"`` (N(0, 1)).
    """
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"lloyd_max_codebook: bits must be an int in 1..8, got {bits!r}")
    if distribution == "sphere" and (not isinstance(block, int) or block < 2):
        raise ValueError(f"lloyd_max_codebook: block must be an int >= 2, got {block!r}")
    key_block = block if distribution == "sphere" else 0
    return torch.tensor(_codebook(bits, key_block, distribution), dtype=torch.float32)


def expected_mse(codebook: torch.Tensor, block: int, distribution: str = "sphere") -> float:
    """Mean squared error of nearest-level quantization under the model distribution."""
    t, w = _grid(block, distribution)
    c = codebook.double().numpy()
    mids = (c[1:] + c[:-1]) * 0.5
    q = c[np.searchsorted(mids, t)]
    return float(np.sum(w * (t - q) ** 2))
