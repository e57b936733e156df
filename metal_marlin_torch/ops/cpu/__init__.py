"""CPU kernel of ``marlin::gemm``: a fused dequantize-GEMV and, for prefill, a GEMM over weight
panels decoded in cache, in C++ built on first use (issue 24 item 4).

The pure-torch kernel (:mod:`..reference`) dequantizes the whole weight on every call, so on CPU
every format ran slower than dense fp32. Here ``gemm_cpu.cpp`` (plain C++17, no torch headers)
reads the canonical packed weight (docs/FORMAT.md) directly:

* up to :data:`GEMV_MAX_M` activation rows: a fused dequantize-GEMV (``marlin_cpu_gemv``):
  16 codes at a time decoded in SIMD registers (AVX2 + FMA on x86-64, NEON on arm64; shifts
  and masks, 16-entry tables looked up in registers), FMA into float32 partial sums, the group
  scale applied once per group (affine biases as ``b * sum(x)``); 3-bit formats and other ISAs
  decode a row through byte tables, then an auto-vectorized dot product;
* more rows (prefill): a GEMM in the same library (``marlin_cpu_gemm``). Work units of
  :data:`PANEL_ROWS` weight rows x up to :data:`PANEL_ACTS` activation rows; a thread decodes
  its unit's weights :data:`PANEL_CODES` codes at a time into a float32 buffer of its own
  (96 KB: it stays in L2) with the same SIMD decoders, and multiplies that panel by the
  activations with a register-blocked microkernel (6 weight rows x 2-4 vectors of activation
  rows held in registers: AVX2, AVX-512 or NEON through vector extensions). The weight is
  never decoded whole, nor written to memory decoded: the previous path (32 MB tiles decoded,
  then ``torch.mm``) reached 0.44-0.83x dense fp32 at M = 64.

Threads: ``torch.get_num_threads()`` for layers of at least :data:`PARALLEL_MIN_WEIGHTS`
weights (below, one thread: waking a worker costs more than it saves). Where the build has
OpenMP (GCC and a ``libgomp`` in ``torch/lib``) both paths run on torch's own OpenMP pool:
after each torch op its threads spin for a while (libgomp's default), so they take our chunks
at once, where a second set of threads competed with them for the cores (on the idle 16-core
Xeon the GEMV on an own pool had medians 2-5x above its fastest rounds, and the prefill
decode 0.29-0.67x dense). Elsewhere (clang, macOS), or for the GEMV with
``METAL_MARLIN_CPU_GEMV_THREADS=pool``, rows are cut into chunks that the calling thread and a
pool of sleeping workers take from one counter; the caller never waits for a worker that has
not started, which wins on an oversubscribed machine, where an OpenMP join waits for a thread
without a core (2 cores at load 9: 6.5 against 19.7 ms a call, gemm_cpu.cpp's ``Pool``).

Build: the system C++ compiler (``$CXX``, else ``c++``, ``g++``, ``clang++``, ``clang++-19``) with ``-O3`` and
the host's vector ISA (``-march=native`` on x86-64, ``-mcpu=native`` on arm64; retried without
it if refused). About 2-3 s, cached under ``~/.cache/metal_marlin_torch/cpu`` (override:
``METAL_MARLIN_CPU_CACHE``) keyed by the source, the compiler's version, the flags and the
machine. Without a compiler, or if the build fails, the pure-torch kernel stays, logged once
at INFO; :func:`info` (in ``backend_info()``) says which and why, and which vector path the
build has (``isa``). ``METAL_MARLIN_CPU_KERNEL=0`` turns the C++ kernel off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import cache
from pathlib import Path

import torch

from ... import formats as F
from ..._files import cache_dir
from .. import reference

log = logging.getLogger("metal_marlin_torch")

SOURCE = Path(__file__).with_name("gemm_cpu.cpp")
KERNEL_NAME = "cpu_cxx"
GEMV_MAX_M = 8  # above: the prefill GEMM (panels decoded in cache, microkernel); docs/CUDA.md 7.4
PANEL_ROWS = 48  # weight rows decoded per prefill work unit (a multiple of the microkernel's 6)
PANEL_MIN_ROWS = 12  # ... fewer (down to this) when a layer has too few units for the threads
PANEL_CODES = 512  # codes (K) per decoded panel: 48 x 512 fp32 = 96 KB, in L2
PANEL_ACTS = 256  # activation rows per work unit: a weight is decoded once per this many rows
UNITS_PER_THREAD = 4  # panels shrink (to PANEL_MIN_ROWS) until each thread has this many units
PARALLEL_MIN_WEIGHTS = 1 << 18  # smaller layers run on one thread (a 256 x 1024 int4 GEMV
#                                  takes ~20 us, a worker's wake-up ~5-50 us)
GEMV_THREADS_ENV = "METAL_MARLIN_CPU_GEMV_THREADS"  # "openmp" (default) or "pool": which pool the
#   GEMV's chunks run on where the build has OpenMP. Measured (docs/CUDA.md 7.4): the idle 16-core
#   Xeon, M = 1, interleaved with torch ops, OpenMP against the own pool: 16 threads 2.75-3.13x
#   dense fp32 on the wide layers against 1.32-4.14x with medians 2-5x above the fastest round;
#   2 threads 2.17-2.37x against 1.50-2.24x. The own pool wins on an oversubscribed machine (2
#   cores at load 9, 2 threads: 6.5 against 19.7 ms median, dense fp32 18.6 ms).
SCALE_KINDS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_STATE: dict[str, object] = {"lib": None, "error": None, "path": None, "compiler": None,
                             "threads": None, "isa": None, "gemv_openmp": False, "lanes": None}


def cache_root() -> Path:
    """Where the compiled CPU kernel is cached: METAL_MARLIN_CPU_CACHE, else
    ~/.cache/metal_marlin_torch/cpu (a per-user temp folder when home is not writable)."""
    return cache_dir("cpu", "METAL_MARLIN_CPU_CACHE")


def compiler() -> str | None:
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++", "clang++-19"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _native_flags() -> list[list[str]]:
    m = platform.machine().lower()
    native = ["-mcpu=native"] if m in ("arm64", "aarch64") else ["-march=native"]
    return [native, []]  # the second: if the compiler refuses the first


def torch_libgomp() -> Path | None:
    """The OpenMP runtime torch's CPU kernels run on (Linux wheels ship ``libgomp*.so*`` in
    ``torch/lib``), so that the prefill tile decode can share torch's thread pool instead of
    competing with it."""
    lib = Path(torch.__file__).parent / "lib"
    found = sorted(lib.glob("libgomp*.so*")) if lib.is_dir() else []
    return found[0] if found else None


def _variants(version: str) -> list[tuple[str, list[str], list[str]]]:
    """(name, compile flags, link inputs) to try in order: with OpenMP on torch's libgomp (GCC
    only: clang's OpenMP calls another runtime; used for the prefill tile decode), then
    without; each with the host's vector ISA, then without it."""
    out = []
    gomp = torch_libgomp()
    for extra in _native_flags():
        # -ffp-contract=fast: the prefill microkernel's a * b + c on vector types become FMAs
        # (GCC's ISO mode, -std=c++17, otherwise keeps them apart)
        base = ["-O3", "-std=c++17", "-fPIC", "-pthread", "-ffp-contract=fast", *extra]
        if gomp is not None and "clang" not in version.lower():
            out.append(("openmp", [*base, "-fopenmp"], [str(gomp), f"-Wl,-rpath,{gomp.parent}"]))
        out.append(("pool", base, []))
    return out


def _build(cxx: str) -> Path:
    src = SOURCE.read_bytes()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    last_error = ""
    for name, flags, link in _variants(version):
        key = hashlib.sha256(b"\0".join([src, version.encode(), " ".join(flags + link).encode(),
                                         platform.machine().encode(), platform.node().encode()]))
        lib = cache_root() / f"libmarlin_cpu-{name}-{key.hexdigest()[:16]}.so"
        if lib.exists():
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
        # per-process temporaries: concurrent first uses (pytest-xdist workers, several
        # processes) each compile and link their own files, then rename into place. (A shared
        # ``.o`` let one process link another's half-written object: a library without its
        # symbols, seen on the H200 host with 8 xdist workers.)
        tmp = lib.with_name(f"{lib.name}.tmp{os.getpid()}")
        obj = lib.with_name(f"{lib.name}.tmp{os.getpid()}.o")
        # compile and link apart: linking with -fopenmp would add the system's -lgomp, a second
        # OpenMP runtime beside torch's
        steps = [[cxx, *flags, "-c", str(SOURCE), "-o", str(obj)],
                 [cxx, "-shared", "-pthread", str(obj), *link, "-o", str(tmp)]]
        ok = True
        for cmd in steps:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                ok, last_error = False, proc.stderr.strip()[-2000:]
                break
        obj.unlink(missing_ok=True)
        if ok:
            os.replace(tmp, lib)  # atomic: a concurrent build writes the same bytes
            return lib
        tmp.unlink(missing_ok=True)
    raise RuntimeError(f"{cxx} failed: {last_error}")


def load() -> ctypes.CDLL | None:
    """The built library (building it on first call), or None with :func:`info`'s reason."""
    if _STATE["lib"] is not None or _STATE["error"] is not None:
        return _STATE["lib"]  # type: ignore[return-value]
    if os.environ.get("METAL_MARLIN_CPU_KERNEL", "1") == "0":
        _STATE["error"] = "turned off (METAL_MARLIN_CPU_KERNEL=0)"
        return None
    mode = os.environ.get(GEMV_THREADS_ENV, "openmp")
    if mode not in ("openmp", "pool"):
        raise ValueError(f"{GEMV_THREADS_ENV} must be 'openmp' or 'pool', got {mode!r}")
    cxx = compiler()
    _STATE["compiler"] = cxx
    try:
        if cxx is None:
            raise RuntimeError("no C++ compiler found ($CXX, c++, g++, clang++)")
        path = _build(cxx)
        lib = ctypes.CDLL(str(path))
        abi = getattr(lib, "marlin_cpu_abi_version", None)  # absent from a broken library
        if abi is None or abi() != 4:
            raise RuntimeError(f"{path} is not this version's kernel library (no ABI version 4): delete it")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        _STATE["error"] = f"{type(exc).__name__}: {exc}"
        log.info("metal_marlin_torch: the C++ CPU gemm kernel is unavailable (%s); CPU gemm uses "
                 "the pure-torch kernel", _STATE["error"])
        from .. import registry

        registry.reset_kernel("gemm", "cpu")
        return None
    i64, vp, ci = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.marlin_cpu_gemv.argtypes = [vp, i64, i64, vp, i64, i64, i64, vp, vp, ci, i64, i64, ci, vp,
                                    vp, vp, i64, ci, ci]
    lib.marlin_cpu_gemv.restype = None
    lib.marlin_cpu_gemm.argtypes = [vp, i64, i64, vp, i64, i64, i64, vp, vp, ci, i64, i64, ci, vp,
                                    vp, vp, i64, i64, i64, i64, ci, ci]
    lib.marlin_cpu_gemm.restype = None
    lib.marlin_cpu_dequant.argtypes = [vp, i64, i64, i64, vp, vp, ci, i64, i64, ci, vp, i64, i64,
                                       vp, i64, ci]
    lib.marlin_cpu_dequant.restype = None
    _STATE["lib"], _STATE["path"] = lib, str(path)
    lib.marlin_cpu_isa.restype = ctypes.c_char_p
    _STATE["isa"] = lib.marlin_cpu_isa().decode()
    lib.marlin_cpu_openmp.restype = ctypes.c_int
    omp = bool(lib.marlin_cpu_openmp())
    _STATE["gemv_openmp"] = omp and mode == "openmp"
    _STATE["threads"] = (f"GEMV: {'torch OpenMP pool' if _STATE['gemv_openmp'] else 'own pool'}; "
                         f"prefill: {'torch OpenMP pool' if omp else 'own pool'}")
    _STATE["lanes"] = lib.marlin_cpu_prefill_lanes()
    return lib


def info() -> dict:
    """Whether the C++ CPU kernel is built and loaded here, and why not (for backend_info)."""
    return {"loaded": _STATE["lib"] is not None, "error": _STATE["error"], "library": _STATE["path"],
            "compiler": _STATE["compiler"], "threads": _STATE.get("threads"),
            "isa": _STATE.get("isa"),
            "gemv_max_m": GEMV_MAX_M, "prefill_lanes": _STATE.get("lanes")}


@cache
def _lut(format: str) -> torch.Tensor:
    """The format's code values at unit scale (q itself for the affine integers)."""
    from ..cuda.layout import _code_values

    return torch.tensor(_code_values(F.get_format(format)), dtype=torch.float32)


def _operands(weight, scales, biases, global_scale, format):
    """Contiguous operands in what the kernel reads: float (fp32 / fp16 / bf16) scales and
    biases as stored, or float32 effective scales for E8M0 / E4M3-with-tensor-scale."""
    from ..cuda.layout import kernel_scales

    if scales.dtype not in SCALE_KINDS or global_scale is not None:
        scales = kernel_scales(format, scales, global_scale)
    if biases is not None and biases.dtype != scales.dtype:
        # The kernel reads both with one storage kind: widen both to float32, which holds every
        # fp16 and bf16 value exactly (casting fp16 biases to bf16 scales' type would round them).
        scales, biases = scales.to(torch.float32), biases.to(torch.float32)
    return (weight.contiguous(), scales.contiguous(),
            None if biases is None else biases.contiguous())


def _panel_rows(n: int, m: int, threads: int) -> int:
    """Weight rows per prefill work unit: :data:`PANEL_ROWS`, fewer (multiples of 6, down to
    :data:`PANEL_MIN_ROWS`) until the layer has :data:`UNITS_PER_THREAD` units a thread, so
    that the last units do not leave most threads idle (4096 rows at 16 threads: 24 rows)."""
    rows = PANEL_ROWS
    m_units = -(-m // PANEL_ACTS)
    while rows > PANEL_MIN_ROWS and -(-n // rows) * m_units < UNITS_PER_THREAD * threads:
        rows -= 6
    return rows


def gemm(x, weight, scales, biases, global_scale, bias, format, group_size):
    """The CPU kernel of ``marlin::gemm`` (same arguments and checks as the pure-torch one)."""
    fmt = reference.check_gemm_args(x, weight, scales, biases, global_scale, bias, format, group_size)
    lib = load()
    if lib is None or x.dtype == torch.float64:
        return reference.gemm(x, weight, scales, biases, global_scale, bias, format, group_size)
    k = x.shape[-1]
    n = weight.shape[0]
    g = fmt.check_group_size(group_size, k)
    w, s, b = _operands(weight, scales, biases, global_scale, format)
    lut = _lut(format)
    x2 = x.reshape(-1, k)
    if x2.dtype != torch.float32 or not x2.is_contiguous():  # each a few us per call at M = 1
        x2 = x2.to(torch.float32).contiguous()
    m = x2.shape[0]
    threads = torch.get_num_threads() if n * k >= PARALLEL_MIN_WEIGHTS else 1
    common = (w.data_ptr(), n, w.shape[1], k, s.data_ptr(), None if b is None else b.data_ptr(),
              SCALE_KINDS[s.dtype], k // g, g, fmt.bits, lut.data_ptr())
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    omp = int(bool(_STATE["gemv_openmp"]))
    y = torch.empty(m, n, dtype=torch.float32)
    bias_ptr = None if bias32 is None else bias32.data_ptr()
    if m and n and m <= GEMV_MAX_M:
        lib.marlin_cpu_gemv(x2.data_ptr(), m, k, *common, bias_ptr, y.data_ptr(), n, threads, omp)
    elif m and n:
        # prefill always on the OpenMP pool where built (work of milliseconds: a join's cost is small)
        lib.marlin_cpu_gemm(x2.data_ptr(), m, k, *common, bias_ptr, y.data_ptr(), n,
                            _panel_rows(n, m, threads), PANEL_CODES, PANEL_ACTS, threads, 1)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)


def register() -> None:
    """Make :func:`gemm` the CPU kernel of ``torch.ops.marlin.gemm`` (the library is built on
    its first call; if that fails the pure-torch kernel is put back, logged once)."""
    if os.environ.get("METAL_MARLIN_CPU_KERNEL", "1") == "0":
        return
    from .. import registry

    registry.set_kernel("gemm", "cpu", gemm, KERNEL_NAME)


__all__ = ["GEMV_MAX_M", "KERNEL_NAME", "PANEL_ACTS", "PANEL_CODES", "PANEL_ROWS", "PARALLEL_MIN_WEIGHTS",
           "gemm", "info", "load", "register"]
