"""CUDA fast path of ``marlin::gemm``: Triton kernels (docs/CUDA.md).

:func:`register` makes them the CUDA kernel of ``torch.ops.marlin.gemm`` when Triton and a CUDA
device are present; otherwise the pure-torch kernel stays, and :func:`info` says why. Triton is
imported on the first call only, so importing the package stays cheap.

    >>> from metal_marlin_torch.ops import cuda
    >>> cuda.info()  # {'available': True, 'triton': '3.6.0', 'reason': '', 'registered': True}
    >>> pw = cuda.prepare_cuda_weight(w, s, b, None, "int4", 128, 4096)  # once per layer
    >>> y = cuda.gemm_prepared(x, pw, bias)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging

import torch

from .dispatch import (
    DEQUANT_MIN_M,
    GEMV_MAX_M,
    GemmConfig,
    GemvConfig,
    LayerPlan,
    MmaGemvConfig,
    PreparedWeight,
    choose_path,
    clear_weight_cache,
    gemm,
    gemm_prepared,
    gemm_prepared_op,
    interpreting,
    mma_gemv_tma_unavailable_reason,
    mma_gemv_unavailable_reason,
    prepare_cuda_weight,
    set_fast_launch,
    set_weight_cache,
)

log = logging.getLogger("metal_marlin_torch")
KERNEL_NAME = "triton"
_registered = False


def unavailable_reason() -> str:
    """Empty when the Triton kernels can run here, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (torch.cuda.is_available() or interpreting()):
        return "no CUDA device"
    return ""


def triton_version() -> str | None:
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None


def register() -> bool:
    """Route ``torch.ops.marlin.gemm`` on CUDA tensors to the Triton kernels if they can run
    here; returns whether they were registered. Idempotent."""
    global _registered
    reason = unavailable_reason()
    if reason:
        if torch.cuda.is_available():
            log.info("metal_marlin_torch: CUDA gemm uses the pure-torch kernel (%s)", reason)
        return False
    from .. import registry

    registry.set_kernel("gemm", "cuda", gemm, KERNEL_NAME)
    registry.set_kernel("gemm_prepared", "cuda", gemm_prepared_op, KERNEL_NAME)
    _registered = True
    return True


def registered() -> bool:
    """The Triton kernels run ``torch.ops.marlin.gemm`` on CUDA tensors in this process."""
    return _registered


def info() -> dict:
    """What the CUDA fast path can do here: Triton version, availability and why not,
    whether it is registered, the M thresholds of the dispatch, and whether the Gluon
    tensor-core GEMV (2-8 rows of int4) can run (``mma_gemv``: available, reason; ``tma``:
    whether its TMA-fed kernel runs, which also takes one row on large layers)."""
    reason = unavailable_reason()
    dev = torch.device("cuda") if torch.cuda.is_available() else None
    mma_reason = reason or mma_gemv_unavailable_reason(dev)
    tma_reason = mma_reason or mma_gemv_tma_unavailable_reason(dev)
    return {"available": not reason, "reason": reason, "triton": triton_version(),
            "registered": _registered, "gemv_max_m": GEMV_MAX_M,
            "dequant_min_m": DEQUANT_MIN_M,
            "mma_gemv": {"available": not mma_reason, "reason": mma_reason,
                         "tma": {"available": not tma_reason, "reason": tma_reason}}}


__all__ = [
    "LayerPlan", "gemm_prepared_op", "registered", "set_fast_launch",
    "DEQUANT_MIN_M", "GEMV_MAX_M", "GemmConfig", "GemvConfig", "KERNEL_NAME", "MmaGemvConfig",
    "PreparedWeight",
    "choose_path", "clear_weight_cache", "gemm", "gemm_prepared", "info", "prepare_cuda_weight",
    "register", "set_weight_cache", "triton_version", "unavailable_reason",
]
