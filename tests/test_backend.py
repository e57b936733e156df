"""`backend_info` reports what runs where."""

from __future__ import annotations

import torch

from metal_marlin_torch import backend_info


def _has_metal_gemm() -> bool:
    # the compiled extension is a module of the package; without it no Metal kernel can exist
    try:
        import metal_marlin_torch._C  # noqa: F401
    except ImportError:
        return False
    return True


def test_pure_torch_mps_kernels_are_not_reported_as_metal():
    # regression: the pure-torch kernels registered for MPS made the extension look loaded
    info = backend_info()
    assert info["metal_extension"] == _has_metal_gemm()
    if not _has_metal_gemm():
        assert set(info["kernels"]["mps"].values()) == {"torch"}
    # moe_gemm has no Metal kernel in any build yet
    assert info["kernels"]["mps"]["moe_gemm"] == "torch"
    assert info["torch"] == torch.__version__
