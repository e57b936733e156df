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
