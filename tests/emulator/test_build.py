"""The emulator build: cached objects, and a clear error without clang 19."""

from __future__ import annotations

from pathlib import Path

import pytest

from metal_marlin_torch import emulator

KERNELS = Path(__file__).parent / "kernels" / "engine.metal"


@pytest.mark.skipif(not emulator.available(), reason="needs clang-19 (apt-get install clang-19)")
def test_kernel_objects_come_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("METAL_MARLIN_EMU_CACHE", str(tmp_path))
    b = emulator._Builder(emulator.compiler())
    obj, names = b.kernel_object(KERNELS, [])
    stat = obj.stat()
    again, names_again = b.kernel_object(KERNELS, [])
    assert again == obj and names_again == names and "emu_positions" in names
    assert again.stat().st_mtime_ns == stat.st_mtime_ns  # not rebuilt
    assert obj.parent == tmp_path / "objs"
    assert not list((tmp_path / "objs").glob("*.tmp*"))  # writes are atomic (temp + rename)


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(emulator, "compiler", lambda: None)
    with pytest.raises(emulator.EmulatorError, match="apt-get install clang-19"):
        emulator.build_library([KERNELS], "marlin_emu_never_built", with_ops=False)
