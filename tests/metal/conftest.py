"""The emulated Metal backend (torch.ops.marlin_emu) for the kernel-vs-torch tests."""

from __future__ import annotations

import pytest

from metal_marlin_torch import emulator

needs_emulator = pytest.mark.skipif(
    not emulator.available(), reason="needs clang-19 (apt-get install clang-19) for the MSL emulator"
)


@pytest.fixture(scope="session")
def emu():
    """torch.ops.marlin_emu, built (or loaded from the cache) once per session."""
    if not emulator.available():
        pytest.skip("needs clang-19 (apt-get install clang-19) for the MSL emulator")
    return emulator.load().ops


@pytest.fixture(params=["forward", "reverse"])
def thread_order(request, monkeypatch):
    """Run the emulated threads of each group first-to-last or last-to-first between
    rendezvous: Metal guarantees no order, so a missing barrier shows up in one of the two."""
    if request.param == "reverse":
        monkeypatch.setenv("METAL_MARLIN_EMU_ORDER", "reverse")
    return request.param
