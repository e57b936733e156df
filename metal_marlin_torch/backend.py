"""What runs where: :func:`backend_info` reports the Metal extension, its kernel families and each
op's kernel per device type."""

from __future__ import annotations

from typing import Any

import torch

from . import _metal_sources, _native
from .ops import active_kernels, registry
from .ops import cpu as _cpu
from .ops import cuda as _cuda


def family_report() -> dict[str, dict[str, Any]]:
    """Kernel family -> how its ops run on MPS: ``state`` is "metal" (compiled), "not compiled yet"
    (compiled on first use), "rejected" (the compiler's ``message``; its ops run pure torch), or
    "torch" (no Metal extension: ``message`` says why); ``bf16`` is "metal" or "torch" (a bf16 call
    fell back: no ``bfloat`` on this OS). ``kernel_prefixes`` says which kernels it holds."""
    status = _native.family_status()
    out: dict[str, dict[str, Any]] = {}
    for fam in _metal_sources.kernel_families():
        st = status.get(fam.name)
        if st is None:
            entry = {"state": "torch", "bf16": "torch", "message": str(_native.STATE["error"] or "")}
        else:
            state = {"compiled": "metal", "not_compiled": "not compiled yet"}.get(st["state"], st["state"])
            entry = {"state": state, "bf16": "torch" if st["bf16"] == "fallback" else "metal",
                     "message": st["message"]}
        entry["kernel_prefixes"] = list(fam.kernel_prefixes)
        out[fam.name] = entry
    return out


def backend_info() -> dict[str, Any]:
    """A dict: torch version, devices present, whether the Metal extension is loaded (and why
    not, where it was built), the state of each Metal kernel family (:func:`family_report`), and
    for each device type the kernel each ``marlin`` op uses there ("metal" for the extension's
    Metal kernels, which fall back per family as ``metal_families`` says, "metal-emulator" for CPU
    ops routed by ``emulator.use()``, "cpu_cxx" for the C++ CPU gemm, "triton" for the CUDA one,
    otherwise "torch")."""
    devices = {"cpu": True, "cuda": torch.cuda.is_available(),
               "mps": torch.backends.mps.is_available()}
    kernels = {d: active_kernels(d) for d in ("cpu", "cuda", "mps")}
    for op in registry.METAL_OPS:
        kernels["mps"][op] = "metal"
    msl = None
    if _native.STATE["loaded"]:
        msl = str(torch.ops.marlin_metal._msl_version())
    return {
        "torch": torch.__version__,
        "devices": devices,
        "metal_extension": bool(_native.STATE["loaded"]),
        "metal_extension_error": _native.STATE["error"],
        "metal_extension_path": _native.STATE["path"],
        "metal_msl_version": msl,
        "metal_ops": list(registry.METAL_OPS),
        "metal_families": family_report(),
        "kernels": kernels,
        "cuda_fast_path": _cuda.info(),
        "cpu_kernel": _cpu.info(),  # the C++ gemm of ops/cpu (built on first CPU gemm)
    }
