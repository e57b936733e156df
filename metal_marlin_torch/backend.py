"""What runs where: :func:`backend_info` reports the compiled extension and each op's kernel."""

from __future__ import annotations

from typing import Any

import torch

from . import _native
from .ops import active_kernels, registry
from .ops import cpu as _cpu
from .ops import cuda as _cuda


def backend_info() -> dict[str, Any]:
    """A dict: torch version, devices present, whether the Metal extension is loaded (and why
    not), and for each device type the kernel each ``marlin`` op uses there ("metal" for the
    extension's Metal kernels, "metal-emulator" for CPU ops routed by ``emulator.use()``,
    otherwise "torch"; "cpu_cxx" for the C++ CPU gemm, "triton" for the CUDA one)."""
    devices = {"cpu": True, "cuda": torch.cuda.is_available(),
               "mps": torch.backends.mps.is_available()}
    kernels = {d: active_kernels(d) for d in ("cpu", "cuda", "mps")}
    for op in registry.METAL_OPS:
        kernels["mps"][op] = "metal"
    return {
        "torch": torch.__version__,
        "devices": devices,
        "metal_extension": bool(_native.STATE["loaded"]),
        "metal_extension_error": _native.STATE["error"],
        "metal_ops": list(registry.METAL_OPS),
        "kernels": kernels,
        "cuda_fast_path": _cuda.info(),
        "cpu_kernel": _cpu.info(),  # the C++ gemm of ops/cpu (built on first CPU gemm)
    }
