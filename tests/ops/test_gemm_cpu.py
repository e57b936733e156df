"""The C++ CPU kernel of ``marlin.gemm`` (issue 24 item 4) against the pure-torch op.

Every format at every group size it allows, M from 1 (the fused GEMV) to past GEMV_MAX_M (weight
panels decoded in cache and multiplied by the C++ microkernel), K off the vector width, batched
3-D inputs, fp32 / bf16 / fp16 activations. The oracle is ``ops.reference.gemm`` (fp32
dequantize, fp32 matmul). The build happens on the first call and is cached (a second or two
with gcc on x86-64).
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import pytest
import torch

from metal_marlin_torch import formats as F
from metal_marlin_torch import ops
from metal_marlin_torch.ops import cpu, reference

needs_kernel = pytest.mark.skipif(cpu.compiler() is None, reason="needs a C++ compiler")
TOL = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative, by x dtype
CASES = [(f, g) for f in sorted(F.FORMATS) for g in F.get_format(f).group_sizes]


def _rel(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


@needs_kernel
@pytest.mark.parametrize("fmt,group", CASES)
def test_cpu_kernel_matches_reference(fmt, group):
    torch.manual_seed(0)
    for n, k in [(40, 512), (33, 96)]:  # 96: not a whole 64-code step; 33 rows: not a tile
        if group != -1 and k % group:
            continue
        weight, scales, biases, gscale = ops.quantize(torch.randn(n, k), fmt, group)
        bias = torch.randn(n)
        for m in (1, 3, cpu.GEMV_MAX_M + 1, 70):  # GEMV, GEMV with row blocks, prefill panels
            x = torch.randn(m, k) / k**0.5
            y = cpu.gemm(x, weight, scales, biases, gscale, bias, fmt, group)
            ref = reference.gemm(x, weight, scales, biases, gscale, bias, fmt, group)
            assert y.dtype == torch.float32 and y.shape == (m, n)
            assert y.is_contiguous()  # regression: a transposed view broke compiled graphs
            assert _rel(y, ref) < TOL[torch.float32], (n, k, m)


@needs_kernel
@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int3", 32), ("nf4", -1), ("int8", 64),
                                       ("fp4", 32), ("mxfp4", 32), ("int2", 64), ("int5", 32),
                                       ("int6", -1)])
def test_prefill_panels_match_reference(monkeypatch, fmt, group):
    """Prefill (``marlin_cpu_gemm``) in panels shrunk so that small shapes cross every panel
    edge: 13-row panels (two whole 6-row microkernel blocks and one of 1), 64-code K blocks
    (the last one partial at K = 1088; inside 128-code groups; 3-bit rows inside 3-word
    units), 16 activation rows a unit (M = 9: one partial unit, M = 70: five, the last of 6
    rows), 101 weight rows (the last panel of 10). Per-channel scales included."""
    monkeypatch.setattr(cpu, "PANEL_ROWS", 13)
    monkeypatch.setattr(cpu, "PANEL_MIN_ROWS", 13)
    monkeypatch.setattr(cpu, "PANEL_CODES", 64)
    monkeypatch.setattr(cpu, "PANEL_ACTS", 16)
    torch.manual_seed(3)
    n, k = 101, 1088
    weight, scales, biases, gscale = ops.quantize(torch.randn(n, k), fmt, group)
    bias = torch.randn(n)
    for m in (9, 70):
        x = torch.randn(m, k) / k**0.5
        y = cpu.gemm(x, weight, scales, biases, gscale, bias, fmt, group)
        ref = reference.gemm(x, weight, scales, biases, gscale, bias, fmt, group)
        assert y.shape == (m, n) and y.is_contiguous()
        assert _rel(y, ref) < TOL[torch.float32], m


@needs_kernel
@pytest.mark.parametrize("fmt,group", [("int4", 128), ("nf4", 64), ("int8", -1)])
def test_results_do_not_depend_on_the_thread_count(monkeypatch, fmt, group):
    """Every output is computed by one thread in a fixed order (a GEMV row, a prefill panel), so
    1, 2 and 3 threads give the same bits, at M = 1, 5 (GEMV), 33 and 64 (prefill)."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN_WEIGHTS", 0)
    threads = torch.get_num_threads()
    torch.manual_seed(7)
    n, k = 250, 512
    weight, scales, biases, gscale = ops.quantize(torch.randn(n, k), fmt, group)
    try:
        for m in (1, 5, 33, 64):
            x = torch.randn(m, k) / k**0.5
            ys = []
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                ys.append(cpu.gemm(x, weight, scales, biases, gscale, None, fmt, group))
            assert torch.equal(ys[0], ys[1]) and torch.equal(ys[0], ys[2]), m
            ref = reference.gemm(x, weight, scales, biases, gscale, None, fmt, group)
            assert _rel(ys[0], ref) < TOL[torch.float32], m
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("openmp", [False, True])  # own pool, torch's OpenMP pool
def test_gemv_thread_pools_give_the_same_bits(monkeypatch, openmp):
    """The GEMV on either pool (``METAL_MARLIN_CPU_GEMV_THREADS``) at 2 and 3 threads gives
    the bits of one thread."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN_WEIGHTS", 0)
    cpu.load()
    monkeypatch.setitem(cpu._STATE, "gemv_openmp", openmp)
    threads = torch.get_num_threads()
    torch.manual_seed(8)
    weight, scales, biases, _ = ops.quantize(torch.randn(333, 256), "int4", 64)
    x = torch.randn(3, 256) / 16
    try:
        torch.set_num_threads(1)
        one = cpu.gemm(x, weight, scales, biases, None, None, "int4", 64)
        for t in (2, 3):
            torch.set_num_threads(t)
            assert torch.equal(cpu.gemm(x, weight, scales, biases, None, None, "int4", 64), one), t
    finally:
        torch.set_num_threads(threads)
    assert _rel(one, reference.gemm(x, weight, scales, biases, None, None, "int4", 64)) < TOL[torch.float32]


def test_bad_gemv_threads_setting_is_named(monkeypatch):
    monkeypatch.setattr(cpu, "_STATE", dict(cpu._STATE, lib=None, error=None))
    monkeypatch.setenv(cpu.GEMV_THREADS_ENV, "spin")
    with pytest.raises(ValueError, match="METAL_MARLIN_CPU_GEMV_THREADS must be 'openmp' or 'pool', "
                                         "got 'spin'"):
        cpu.load()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 20])
def test_cpu_kernel_16bit_batched_and_no_bias(dtype, m):
    torch.manual_seed(1)
    weight, scales, biases, _ = ops.quantize(torch.randn(64, 256), "int4", 64)
    x = (torch.randn(2, m, 256) / 16).to(dtype)
    y = torch.ops.marlin.gemm(x, weight, scales, biases, None, None, "int4", 64)
    ref = reference.gemm(x, weight, scales, biases, None, None, "int4", 64)
    assert y.dtype == dtype and y.shape == (2, m, 64)
    assert _rel(y, ref) < TOL[dtype]


@needs_kernel
@pytest.mark.parametrize(("scale_dtype", "bias_dtype"), [(torch.bfloat16, torch.float16),
                                                          (torch.float16, torch.bfloat16),
                                                          (torch.float16, torch.float32)])
@pytest.mark.parametrize("m", [1, cpu.GEMV_MAX_M + 1])
def test_cpu_kernel_scales_and_biases_of_different_dtypes(scale_dtype, bias_dtype, m):
    # Regression: biases of another dtype than the scales were cast to the scales' dtype, so
    # fp16 biases next to bf16 scales lost 3 mantissa bits (found by the emulator's gemm tests).
    torch.manual_seed(2)
    weight, scales, biases, _ = ops.quantize(torch.randn(24, 128), "int4", 32)
    scales, biases = scales.to(scale_dtype), biases.to(bias_dtype)
    x = torch.randn(m, 128) / 128**0.5
    y = cpu.gemm(x, weight, scales, biases, None, None, "int4", 32)
    ref = reference.gemm(x, weight, scales, biases, None, None, "int4", 32)
    assert _rel(y, ref) < TOL[torch.float32]


@needs_kernel
def test_registered_as_cpu_gemm_and_reported():
    x = torch.randn(1, 128)
    weight, scales, biases, _ = ops.quantize(torch.randn(8, 128), "int4", 128)
    torch.ops.marlin.gemm(x, weight, scales, biases, None, None, "int4", 128)
    assert ops.active_kernels("cpu")["gemm"] == cpu.KERNEL_NAME
    assert cpu.info()["loaded"] and cpu.info()["error"] is None


@needs_kernel
def test_decode_does_not_dequantize_the_whole_weight(monkeypatch):
    """M <= GEMV_MAX_M runs the fused GEMV, more rows the panel GEMM: neither calls the
    pure-torch dequantize nor decodes the whole weight (``marlin_cpu_dequant``)."""
    weight, scales, biases, _ = ops.quantize(torch.randn(16, 128), "fp4", 32)

    def forbidden(*a, **k):
        raise AssertionError("the whole weight was dequantized")

    monkeypatch.setattr(F.get_format("fp4"), "dequantize_packed", forbidden)
    lib = cpu.load()
    monkeypatch.setattr(lib, "marlin_cpu_dequant", forbidden)
    y = cpu.gemm(torch.randn(cpu.GEMV_MAX_M, 128), weight, scales, None, None, None, "fp4", 32)
    assert torch.isfinite(y).all()
    # nor does prefill: it decodes panels inside marlin_cpu_gemm
    y = cpu.gemm(torch.randn(70, 128), weight, scales, None, None, None, "fp4", 32)
    assert torch.isfinite(y).all()


def test_missing_compiler_falls_back_with_a_logged_reason(monkeypatch, caplog):
    monkeypatch.setattr(cpu, "_STATE", {"lib": None, "error": None, "path": None, "compiler": None,
                                         "threads": None})
    monkeypatch.setattr(cpu, "compiler", lambda: None)
    reset = []
    monkeypatch.setattr(ops.registry, "reset_kernel", lambda op, dev: reset.append((op, dev)))
    weight, scales, biases, _ = ops.quantize(torch.randn(8, 128), "int4", 128)
    x = torch.randn(2, 128)
    with caplog.at_level(logging.INFO, logger="metal_marlin_torch"):
        y = cpu.gemm(x, weight, scales, biases, None, None, "int4", 128)
    torch.testing.assert_close(y, reference.gemm(x, weight, scales, biases, None, None, "int4", 128))
    assert "no C++ compiler" in cpu.info()["error"]
    assert reset == [("gemm", "cpu")]
    assert any("pure-torch" in r.getMessage() for r in caplog.records)


def test_cpu_kernel_rejects_bad_input_like_the_op():
    weight, scales, biases, _ = ops.quantize(torch.randn(8, 128), "int4", 128)
    with pytest.raises(ValueError, match="x must be float16/bfloat16/float32"):
        cpu.gemm(torch.randint(0, 3, (1, 128)), weight, scales, biases, None, None, "int4", 128)


@needs_kernel
@pytest.mark.parametrize("fmt", sorted(f for f in F.FORMATS if -1 in F.get_format(f).group_sizes))
@pytest.mark.parametrize("k", [100, 37, 16])
def test_gemv_per_channel_odd_k_tails(fmt, k):
    """Per-channel rows whose K is not a whole number of 16-code SIMD blocks: the GEMV decodes
    the blocks in registers and the last K % 16 codes one at a time (K = 100: 6 blocks and a
    4-code tail; K = 37: an odd tail that ends inside a word; K = 16: one block, no tail)."""
    torch.manual_seed(5)
    n = 24
    weight, scales, biases, gscale = ops.quantize(torch.randn(n, k), fmt, -1)
    bias = torch.randn(n)
    for m in (1, 2, 5, cpu.GEMV_MAX_M):  # 1-4 rows share a decode; 5 and 8: a second block
        x = torch.randn(m, k) / k**0.5
        y = cpu.gemm(x, weight, scales, biases, gscale, bias, fmt, -1)
        ref = reference.gemm(x, weight, scales, biases, gscale, bias, fmt, -1)
        assert _rel(y, ref) < TOL[torch.float32], (k, m)


@needs_kernel
@pytest.mark.parametrize("fmt,group", [("int4", 32), ("fp4", 128), ("nf4", 64), ("int8", 32),
                                       ("int2", 64), ("int3", 32), ("fp8_e4m3", 32),
                                       ("nvfp4", 16), ("mxfp4", 32)])
def test_threaded_rows_match_reference(monkeypatch, fmt, group):
    """Rows shared between threads in chunks (torch's OpenMP pool or gemm_cpu.cpp's Pool): 301
    rows at 3 threads are 19 GEMV chunks of 16 rows, the last one short, or prefill panels of
    24 rows (12 units for 3 threads), the last of 13; every row must be written once, by whichever thread took its
    chunk."""
    monkeypatch.setattr(cpu, "PARALLEL_MIN_WEIGHTS", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        torch.manual_seed(6)
        n, k = 301, 256
        weight, scales, biases, gscale = ops.quantize(torch.randn(n, k), fmt, group)
        for m in (1, 3, cpu.GEMV_MAX_M + 1):
            x = torch.randn(m, k) / k**0.5
            for _ in range(3):  # repeated calls reuse the pool's workers
                y = cpu.gemm(x, weight, scales, biases, gscale, None, fmt, group)
                ref = reference.gemm(x, weight, scales, biases, gscale, None, fmt, group)
                assert _rel(y, ref) < TOL[torch.float32], m
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_build_uses_the_hosts_vector_path():
    """The library is built for the host's ISA (-march=native / -mcpu=native): on an x86-64
    CPU with AVX2 and FMA the GEMV takes the AVX2 path, on arm64 NEON."""
    cpu.load()
    isa = cpu.info()["isa"]
    machine = platform.machine().lower()
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("flags")), "")
    except OSError:
        pass
    if machine in ("x86_64", "amd64") and " avx2" in flags and " fma" in flags:
        assert isa == "avx2+fma"
    elif machine in ("arm64", "aarch64"):
        assert isa == "neon"
    else:
        assert isa in ("avx2+fma", "neon", "portable")



def test_concurrent_builds_use_their_own_temporaries(tmp_path, monkeypatch):
    """Processes building the kernel into one empty cache at the same time (pytest-xdist workers
    on a fresh machine) must compile and link into files of their own, then rename: with one
    shared object file, a process linked another's half-written ``.o`` into a library without
    its symbols (seen with 8 workers on the H200 host). Two builds as two process ids, the
    compiler replaced by a recorder: no file one writes may be a file the other writes."""
    import subprocess  # noqa: PLC0415

    written: dict[int, set[str]] = {}
    pid = {"now": 0}

    def fake_run(cmd, **kwargs):  # noqa: ARG001
        if "--version" in cmd:
            return subprocess.CompletedProcess(cmd, 0, stdout="c++ (test) 1.0\n", stderr="")
        out = Path(cmd[cmd.index("-o") + 1])
        written.setdefault(pid["now"], set()).add(str(out))
        out.write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, stdout="", stderr="")

    monkeypatch.setattr(cpu.subprocess, "run", fake_run)
    monkeypatch.setattr(cpu.os, "getpid", lambda: pid["now"])
    monkeypatch.setenv("METAL_MARLIN_CPU_CACHE", str(tmp_path))
    for p in (101, 202):
        pid["now"] = p
        for f in tmp_path.glob("*.so"):  # each "process" finds an empty cache
            f.unlink()
        cpu._build("c++")
    assert len(written[101]) >= 2 and len(written[202]) >= 2  # an object and a library each
    assert not written[101] & written[202], written
    assert not [f for f in tmp_path.iterdir() if ".tmp" in f.name]  # temporaries renamed or removed
