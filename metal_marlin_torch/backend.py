"""What runs where: :func:`backend_info` reports the compiled extension and each op's kernel."""

from __future__ import annotations

from typing import Any

import torch

from .ops import active_kernels
from .ops import cuda as _cuda
from .ops.registry import TORCH_ON_MPS


def _metal_extension() -> bool:
    # the pure-torch MPS registrations also count as MPS kernels for the dispatcher: exclude them
    return "gemm" not in TORCH_ON_MPS and torch._C._dispatch_has_kernel_for_dispatch_key("marlin::gemm", "MPS")


def backend_info() -> dict[str, Any]:
    """A dict: torch version, devices present, whether the Metal extension is loaded, and for
    each device type the kernel each ``marlin`` op uses there."""
    metal = _metal_extension()
    devices = {"cpu": True, "cuda": torch.cuda.is_available(),
               "mps": torch.backends.mps.is_available()}
    kernels = {d: active_kernels(d) for d in ("cpu", "cuda")}
    kernels["mps"] = {op: kernel if op in TORCH_ON_MPS else "metal" for op, kernel in active_kernels("mps").items()}
    return {"torch": torch.__version__, "devices": devices, "metal_extension": metal,
            "kernels": kernels, "cuda_fast_path": _cuda.info()}
