"""backend_info() and the loading of the compiled Metal extension."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from metal_marlin_torch import _native, backend_info
from metal_marlin_torch.ops.library import SCHEMAS


@pytest.mark.skipif(sys.platform == "darwin", reason="the extension exists only on macOS builds")
def test_reports_pure_torch_without_the_extension():
    info = backend_info()
    assert info["metal_extension"] is False
    assert "not built" in info["metal_extension_error"]
    assert info["metal_ops"] == []
    for device in ("cpu", "cuda", "mps"):
        assert info["kernels"][device] == {op: "torch" for op in SCHEMAS}
    assert info["torch"] == torch.__version__ and info["devices"]["cpu"] is True


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
