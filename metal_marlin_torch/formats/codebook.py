"""Nearest-value search in a small sorted codebook, with ties toward the smaller magnitude."""

from __future__ import annotations

import torch


def nearest_index(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the entry of sorted ``values`` nearest to each element of ``x``.

    ``torch.bucketize`` against the midpoints finds the nearest entry; exactly on a midpoint
    ``right=False`` picks the lower entry and ``right=True`` the upper one, so choosing by the
    sign of ``x`` sends ties toward zero (smaller magnitude), as docs/FORMAT.md §3 specifies.
    Values beyond the ends clamp to the end entries.
    """
    mids = (values[1:] + values[:-1]) / 2
    lower = torch.bucketize(x, mids, right=False)
    upper = torch.bucketize(x, mids, right=True)
    return torch.where(x < 0, upper, lower)
