"""`backend_info` reports what runs where; the compiled Metal extension's loading."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from metal_marlin_torch import _native, backend_info
from metal_marlin_torch.ops.library import SCHEMAS


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


@pytest.mark.skipif(sys.platform == "darwin", reason="the extension exists only on macOS builds")
def test_reports_pure_torch_without_the_extension():
    info = backend_info()
    assert info["metal_extension"] is False
    assert "not built" in info["metal_extension_error"]
    assert info["metal_ops"] == []
    for device in ("cuda", "mps"):
        assert info["kernels"][device] == {op: "torch" for op in SCHEMAS}
    # on CPU only gemm has a compiled kernel (ops/cpu, C++ built on first use)
    cpu_gemm = "cpu_cxx" if info["cpu_kernel"]["error"] is None else "torch"
    assert info["kernels"]["cpu"] == {op: cpu_gemm if op == "gemm" else "torch" for op in SCHEMAS}
    assert info["devices"]["cpu"] is True


def test_a_broken_extension_is_reported_not_hidden(monkeypatch, caplog):
    monkeypatch.setattr(_native, "STATE", {"loaded": False, "error": None})
    monkeypatch.setattr(_native.importlib.util, "find_spec", lambda name: object())

    def broken(name):
        raise ImportError("dlopen: symbol not found: _MTLCreateSystemDefaultDevice")

    monkeypatch.setattr(_native.importlib, "import_module", broken)
    with caplog.at_level(logging.WARNING, logger="metal_marlin_torch"):
        assert _native.load_extension() is False
    assert "symbol not found" in _native.STATE["error"]
    assert "failed to load" in caplog.text
