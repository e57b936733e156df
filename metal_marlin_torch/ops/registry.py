"""Which kernel runs each ``marlin`` op on each device type.

The pure-torch kernels are registered with the dispatcher for CPU and CUDA (and for MPS when
the compiled Metal extension is absent). Each registered function looks up the active kernel
here, so a faster backend (the CUDA Triton kernels) or a verification backend (the Metal
emulator's ``marlin_emu`` ops, under ``metal_marlin_torch.emulator.use()``) can take over an
op for a device type without redefining schemas. :func:`active_kernels` reports the choice.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch

from .._native import load_extension, note_fallback
from . import attention, kv, layer, layer_cpu, moe, moe_route, reference, sampling
from .library import LIB, NAMESPACE, SCHEMAS

log = logging.getLogger("metal_marlin_torch")

REFERENCE: dict[str, Callable] = {
    "gemm": reference.gemm,
    "gemm_prepared": reference.gemm_prepared,
    "dequantize": reference.dequantize,
    "quantize": reference.quantize,
    "fake_quantize": reference.fake_quantize,
    "hadamard": reference.hadamard,
    "moe_gemm": moe.moe_gemm,
    "moe_gemm_backward": moe.moe_gemm_backward,
    "moe_route": moe_route.moe_route,
    **kv.REFERENCE,  # quantized KV cache ops
    **layer.REFERENCE,  # decoder-layer ops: norms, gated activations, RoPE
    **sampling.REFERENCE,  # token sampling
    **attention.REFERENCE,  # attention over unquantized K/V
}
# CPU kernels computing an op's math faster than its oracle (torch's fused CPU functions, issue
# 22 item 7); the oracle in REFERENCE stays the tests' reference and the fallback of marlin_torch.
CPU_KERNELS: dict[str, Callable] = {
    **layer_cpu.KERNELS,  # decoder-layer ops: F.rms_norm, F.layer_norm, in-place products
}
_active: dict[tuple[str, str], tuple[str, Callable]] = {}


def set_kernel(op: str, device_type: str, fn: Callable, name: str) -> None:
    """Make ``fn`` (same signature as the op) the kernel of ``op`` on ``device_type``."""
    if op not in SCHEMAS:
        raise ValueError(f"set_kernel: unknown op {op!r}; expected one of {sorted(SCHEMAS)}")
    _active[(op, device_type)] = (name, fn)


def reset_kernel(op: str, device_type: str) -> None:
    """Back to the pure-torch kernel."""
    _active.pop((op, device_type), None)


@contextlib.contextmanager
def override(kernels: dict[str, Callable], device_type: str, name: str) -> Iterator[None]:
    """Temporarily route ``kernels`` (op name -> function) on ``device_type``."""
    saved = {op: _active.get((op, device_type)) for op in kernels}
    try:
        for op, fn in kernels.items():
            set_kernel(op, device_type, fn, name)
        yield
    finally:
        for op, prev in saved.items():
            if prev is None:
                reset_kernel(op, device_type)
            else:
                _active[(op, device_type)] = prev


def active_kernels(device_type: str) -> dict[str, str]:
    """Op name -> name of the kernel that runs it on ``device_type``."""
    return {op: _active.get((op, device_type), ("torch",))[0] for op in SCHEMAS}


def _routed(op: str, device_type: str) -> Callable:
    ref = CPU_KERNELS.get(op, REFERENCE[op]) if device_type == "cpu" else REFERENCE[op]

    def kernel(*args):
        entry = _active.get((op, device_type))
        return ref(*args) if entry is None else entry[1](*args)

    kernel.__name__ = f"{op}_{device_type}"
    return kernel


def register_torch_kernels(device_types: tuple[str, ...], ops=SCHEMAS) -> None:
    """Register the routed (pure-torch by default) kernels of ``ops`` for ``device_types``."""
    for device_type in device_types:
        key = {"cpu": "CPU", "cuda": "CUDA", "mps": "MPS"}[device_type]
        for op in ops:
            LIB.impl(op, _routed(op, device_type), key)


# The pure-torch kernels the C++ op wrappers fall back to when a kernel family cannot run on
# the backend (csrc/ops/registration.h: rejected by the Metal compiler, or bf16 without bfloat):
# marlin_torch::<op>, the same schemas, for MPS (the Metal glue) and CPU (the emulator). They
# report the fallback (logged once per family, shown by backend_info()) and run the reference.
FALLBACK_NAMESPACE = "marlin_torch"
_FALLBACK_LIB = torch.library.Library(FALLBACK_NAMESPACE, "DEF")


def _fallback(op: str, device_type: str) -> Callable:
    ref = REFERENCE[op]

    def kernel(*args):
        note_fallback(op, device_type)
        return ref(*args)

    kernel.__name__ = f"{op}_{device_type}_fallback"
    return kernel


for _op, _schema in SCHEMAS.items():
    _FALLBACK_LIB.define(_schema)
    for _dt, _key in (("cpu", "CPU"), ("mps", "MPS")):
        _FALLBACK_LIB.impl(_op, _fallback(_op, _dt), _key)


def _has_metal_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", "MPS")


register_torch_kernels(("cpu", "cuda"))
load_extension()  # metal_marlin_torch._C registers its Metal kernels for MPS (macOS arm64 only)
# Ops with a Metal kernel (from _C) keep it; the others (all of them without the extension, and
# e.g. moe_gemm_backward, which has no Metal kernel yet) run on MPS tensors through their pure-torch kernels.
METAL_OPS: tuple[str, ...] = tuple(op for op in SCHEMAS if _has_metal_kernel(op))
register_torch_kernels(("mps",), [op for op in SCHEMAS if op not in METAL_OPS])
if torch.backends.mps.is_available() and len(METAL_OPS) < len(SCHEMAS):
    log.info("metal_marlin_torch: MPS ops without a Metal kernel use the pure-torch kernels: %s",
             ", ".join(op for op in SCHEMAS if op not in METAL_OPS))
