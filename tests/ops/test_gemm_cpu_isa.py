"""The CPU kernel's C++ (``ops/cpu/gemm_cpu.cpp``) against a scalar reference without torch, per
vector path: ``gemm_cpu_check.cpp`` built for this host (AVX2 on x86-64 CI) and, where an arm64
cross compiler and qemu-user are installed, for arm64 (the NEON path), run under qemu. It covers
every width (2/3/4/8 bits), identity and arbitrary value tables, fp32/fp16/bf16 scales, affine
biases, groups of 16-128 and per-channel K off the 16-code step, 1-8 rows and 1-3 threads
(GEMV) and 9-70 rows with panel sizes that leave partial blocks (prefill)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from metal_marlin_torch.ops import cpu

CHECK = Path(__file__).with_name("gemm_cpu_check.cpp")


def _build_and_run(cmd: list[str], run: list[str], exe: Path) -> str:
    build = subprocess.run([*cmd, "-O2", "-std=c++17", "-pthread", str(CHECK), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    proc = subprocess.run([*run, str(exe)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.skipif(cpu.compiler() is None, reason="needs a C++ compiler")
def test_host_build_matches_scalar_reference(tmp_path):
    out = _build_and_run([cpu.compiler(), *cpu._native_flags()[0]], [], tmp_path / "check")
    assert out.startswith("isa ")


@pytest.mark.skipif(cpu.compiler() is None, reason="needs a C++ compiler")
def test_prefill_microkernel_at_avx512_width_matches_scalar_reference(tmp_path):
    """The prefill microkernel is written once in vector extensions for every width; the
    AVX-512 build's (64-byte vectors, 4 per row block: 64 activation rows a packed block) runs
    only on AVX-512 hosts, so its code is also built here at that width (the compiler splits
    the vectors) and checked, tails included (70 rows: one block of 64 and one of 16)."""
    out = _build_and_run([cpu.compiler(), *cpu._native_flags()[0], "-DMARLIN_VEC_BYTES=64",
                          "-Wno-psabi"], [], tmp_path / "check64")
    assert "lanes 16" in out.splitlines()[0]


_CROSS = shutil.which("aarch64-linux-gnu-g++")
_QEMU = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")


@pytest.mark.skipif(_CROSS is None or _QEMU is None,
                    reason="needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt: g++-aarch64-linux-gnu "
                           "qemu-user-static) to run the NEON path")
def test_arm64_neon_build_matches_scalar_reference(tmp_path):
    out = _build_and_run([_CROSS, "-static"], [_QEMU], tmp_path / "check_arm64")
    assert out.startswith("isa neon")
