"""Block Hadamard rotations of the input dimension (QuaRot / MR-GPTQ style).

A rotation of the inputs of a linear layer by an orthonormal ``R`` leaves the layer's output
unchanged, ``(x R)(W R)^T = x W^T``, while spreading each weight row's outliers over ``b``
inputs, which shrinks group absmax values and so the quantization error. We use
``R = diag(signs) · blockdiag(H_b, ..., H_b)`` with ``H_b`` the normalized Sylvester
Walsh-Hadamard matrix (symmetric and orthonormal, so ``H_b^T = H_b = H_b^{-1}``), applied by the
fast transform ``torch.ops.marlin.hadamard`` in O(K log b) per row.

The layer stores ``W' = hadamard(W * signs, b)`` (rows rotated along K) and rotates its input
online the same way (docs/FORMAT.md §5, :meth:`MarlinLinear.rotate_input`).

**Dimensions that are not a power of two.** The rotation block must be a power of two dividing
``K``. :func:`choose_block` takes the requested block ``b`` and returns the largest power of two
``<= b`` that divides ``K`` (e.g. K = 384 with b = 128 -> 128; K = 1536 with b = 1024 -> 512;
K = 100 with b = 128 -> 4). If that is smaller than ``min_block`` (default 8) the layer is not
rotated at all (returns 0): a tiny Hadamard block barely disperses outliers and is not worth the
online transform. No padding is ever applied.
"""

from __future__ import annotations

import math

import torch

from ..ops import hadamard as _fwht

DEFAULT_MIN_BLOCK = 8


def _check_block(block: int, what: str = "block") -> None:
    if not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"{what} must be a power of two >= 1, got {block!r}")


def hadamard_matrix(
    n: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix ``H_n`` (``H_2n = [[H, H], [H, -H]] / sqrt 2``).

    Built explicitly (O(n^2) memory); meant for tests and small blocks. The fast path is
    ``torch.ops.marlin.hadamard``.
    """
    _check_block(n, "n")
    h = torch.ones(1, 1, dtype=torch.float64, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (h / math.sqrt(n)).to(dtype)


def choose_block(k: int, block: int, min_block: int = DEFAULT_MIN_BLOCK) -> int:
    """Rotation block for ``k`` inputs: the largest power of two ``<= block`` dividing ``k``,
    or 0 (no rotation) when that is below ``min_block`` (module docstring)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"choose_block: k must be a positive int, got {k!r}")
    _check_block(block, "rotation block")
    b = block
    while b > 1 and k % b:
        b //= 2
    return b if b >= min_block else 0


def random_signs(k: int, seed: int = 0, device: torch.device | str | None = None) -> torch.Tensor:
    """``float32 [k]`` of +-1 drawn from a seeded generator (the same on every device)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"random_signs: k must be a positive int, got {k!r}")
    gen = torch.Generator().manual_seed(int(seed))
    bits = torch.randint(0, 2, (k,), generator=gen)
    return (1.0 - 2.0 * bits.float()).to(device)


def _check_signs(signs: torch.Tensor | None, k: int, where: str) -> None:
    if signs is not None and tuple(signs.shape) != (k,):
        raise ValueError(f"{where}: signs must have shape ({k},), got {tuple(signs.shape)}")


def rotate(x: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``hadamard(x * signs, block)`` along the last dim, in fp32 (rows of W or activations)."""
    _check_signs(signs, x.shape[-1], "rotate")
    x = x.float()
    if signs is not None:
        x = x * signs.to(device=x.device, dtype=torch.float32)
    return _fwht(x, block)


def unrotate(y: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`rotate`: ``hadamard(y, block) * signs`` (H is its own inverse)."""
    _check_signs(signs, y.shape[-1], "unrotate")
    x = _fwht(y.float(), block)
    if signs is not None:
        x = x * signs.to(device=x.device, dtype=torch.float32)
    return x


def rotate_hessian(h: torch.Tensor, block: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``R^T H R`` for ``R = diag(signs) blockdiag(H_b)``: the Hessian of the rotated inputs.

    ``H = X^T X`` for inputs ``X [T, K]``; the rotated inputs are ``X R``, so their Hessian is
    ``R^T X^T X R``. Computed as two fast transforms (H_b is symmetric).
    """
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"rotate_hessian: h must be square [K, K], got {tuple(h.shape)}")
    a = rotate(h, block, signs)  # rows transformed along the last dim: H R
    return rotate(a.T.contiguous(), block, signs).T  # (H R)^T R = R^T H R (symmetric)
