"""`backend_info` reports what runs where; loading the Metal extension, and its failures."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from metal_marlin_torch import _metal_sources, _native, backend_info, build
from metal_marlin_torch.ops.library import SCHEMAS


def test_pure_torch_mps_kernels_are_not_reported_as_metal():
    # regression: the pure-torch kernels registered for MPS made the extension look loaded
    info = backend_info()
    if not info["metal_extension"]:
        assert set(info["kernels"]["mps"].values()) == {"torch"}
    # moe_gemm_backward has no Metal kernel in any build yet (moe_gemm has, issue 21)
    assert info["kernels"]["mps"]["moe_gemm_backward"] == "torch"
    assert info["torch"] == torch.__version__


@pytest.mark.skipif(sys.platform == "darwin", reason="the extension exists only on macOS")
def test_reports_pure_torch_without_the_extension():
    info = backend_info()
    assert info["metal_extension"] is False
    assert "not macOS arm64" in info["metal_extension_error"]
    assert info["metal_ops"] == [] and info["metal_msl_version"] is None
    for device in ("cuda", "mps"):
        assert info["kernels"][device] == {op: "torch" for op in SCHEMAS}
    # on CPU only gemm has a compiled kernel (ops/cpu, C++ built on first use)
    cpu_gemm = "cpu_cxx" if info["cpu_kernel"]["error"] is None else "torch"
    assert info["kernels"]["cpu"] == {op: cpu_gemm if op == "gemm" else "torch" for op in SCHEMAS}
    assert info["devices"]["cpu"] is True
    fams = info["metal_families"]
    assert list(fams) == [f.name for f in _metal_sources.kernel_families()]
    assert all(f["state"] == "torch" and "not macOS arm64" in f["message"] for f in fams.values())


@pytest.fixture
def mac(monkeypatch):
    """A pretend macOS arm64 with MPS, before the extension was loaded."""
    monkeypatch.setattr(_native, "STATE", {"loaded": False, "error": None, "path": None, "built_now": False})
    monkeypatch.setattr(build, "macos_arm64", lambda *a: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    return monkeypatch


def test_a_broken_extension_is_reported_not_hidden(mac, caplog, tmp_path):
    lib = tmp_path / "marlin_metal_0.so"
    lib.write_bytes(b"not a library")
    mac.setattr(build, "ensure_built", lambda **kw: build.BuildResult(lib, False, None, {}))
    with caplog.at_level(logging.WARNING, logger="metal_marlin_torch"):
        assert _native.load_extension() is False
    assert str(lib) in _native.STATE["error"] and "pure-torch" in caplog.text


def test_no_xcode_tools_is_one_clear_message_and_a_working_fallback(mac, caplog):
    mac.setattr(build.shutil, "which", lambda name: None)  # no xcode-select, no clang++
    mac.setenv("METAL_MARLIN_BUILD", "1")
    with caplog.at_level(logging.WARNING, logger="metal_marlin_torch"):
        assert _native.load_extension() is False
        assert _native.load_extension() is False  # decided once: no second message
    assert "xcode-select --install" in _native.STATE["error"]
    assert len([r for r in caplog.records if "xcode-select" in r.getMessage()]) == 1
    fams = backend_info()["metal_families"]
    assert all(f["state"] == "torch" and "xcode-select --install" in f["message"] for f in fams.values())


def test_a_build_error_does_not_break_the_import(mac, caplog):
    def boom(**kw):
        raise RuntimeError("Error building extension 'marlin_metal_x': metal_launcher.mm:12: error: ...")

    mac.setattr(build, "ensure_built", boom)
    with caplog.at_level(logging.WARNING, logger="metal_marlin_torch"):
        assert _native.load_extension() is False
    assert "metal_launcher.mm:12" in _native.STATE["error"] and "marlin doctor" in caplog.text


def test_no_mps_means_no_build(monkeypatch):
    monkeypatch.setattr(_native, "STATE", {"loaded": False, "error": None, "path": None, "built_now": False})
    monkeypatch.setattr(build, "macos_arm64", lambda *a: True)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(build, "ensure_built", lambda **kw: pytest.fail("built without MPS"))
    assert _native.load_extension() is False and "MPS is not available" in _native.STATE["error"]


def test_family_rows_parse():
    rows = ["gemv\trejected\tmetal\tprogram_source:1:2: error: x\nnote: y", "kv\tcompiled\tfallback\t"]
    got = _native.parse_family_rows(rows)
    assert got["gemv"] == {"state": "rejected", "bf16": "metal", "message": "program_source:1:2: error: x\nnote: y"}
    assert got["kv"]["bf16"] == "fallback"


def test_sources_root_is_the_checkout_here():
    assert _metal_sources.source_root() == Path(__file__).resolve().parents[1]
