"""MSL emulator: run the project's Metal kernels and their host code on CPU tensors.

No machine here has an Apple GPU, so the kernels in ``shaders/*.metal`` are verified by
compiling them, unchanged, as C++20 with clang against the project's own MSL shim headers
(``csrc/emu/msl``) and running every simulated GPU thread as a fiber (``csrc/emu/runtime.cpp``).
The same per-op host code that the Objective-C++ glue drives on MPS (``csrc/ops``) is driven
here by an emulating ``Launcher`` and registered for CPU tensors as ``torch.ops.marlin_emu.*``.

    with metal_marlin_torch.emulator.use():
        y = model(x)          # every torch.ops.marlin.* call with a kernel runs emulated

Build: :func:`load` compiles on first use and caches objects and the library under
``~/.cache/metal_marlin_torch/emu`` (override with ``METAL_MARLIN_EMU_CACHE``), keyed by the
hash of every input, so later processes load in well under a second. It needs clang 19
(``clang++-19``, or ``METAL_MARLIN_EMU_CXX``). docs/METAL.md describes what the emulator checks
(barrier and simd divergence, out-of-bounds device access, uninitialized threadgroup memory) and
what it does not model (timing, memory ordering beyond barriers, address-space typing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ._files import cache_dir, write_atomic

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
CSRC = REPO / "csrc"
SHADERS = REPO / "shaders"
MSL_SHIM = CSRC / "emu" / "msl"

# Builtin attributes the trampolines can bind (runtime.h: metal_emu::Builtin).
BUILTINS = {
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
    "threads_per_grid",
    "thread_index_in_threadgroup",
    "thread_index_in_simdgroup",
    "simdgroup_index_in_threadgroup",
    "threads_per_simdgroup",
    "simdgroups_per_threadgroup",
}

# Kernel translation units: float16 arithmetic rounds after every operation as on the GPU
# (clang's default keeps float excess precision across an expression).
KERNEL_FLAGS = [
    "-std=c++20",
    "-fms-extensions",
    "-O1",
    "-fPIC",
    "-fvisibility=hidden",
    "-fexcess-precision=16",
    "-fno-strict-aliasing",
    "-ffp-contract=off",
    "-fstack-clash-protection",  # big private arrays touch the fiber's guard page first
    "-U_FORTIFY_SOURCE",
    "-Wno-unknown-attributes",
    "-Wno-ignored-attributes",
    "-Wno-duplicate-decl-specifier",
    "-D__METAL_VERSION__=310",
    "-DMETAL_EMU=1",
    # Every load and store that may reach shared memory calls the runtime (race check, exact
    # bounds, traffic counters): thread sanitizer's instrumentation with our own callbacks
    # (runtime.cpp), no sanitizer runtime. Reads before writes are kept (counters), function
    # entry/exit and atomics are not instrumented (atomics are not races).
    "-fsanitize=thread",
    "-mllvm", "-tsan-instrument-func-entry-exit=0",
    "-mllvm", "-tsan-instrument-atomics=0",
    "-mllvm", "-tsan-instrument-read-before-write=1",
    # Dereferencing a pointer not aligned for its type (a float4 load at a 4-byte aligned
    # address) calls the runtime, which reports it as the GPU would misbehave on it.
    "-fsanitize=alignment",
    # Line tables name the source line of a reported access.
    "-gline-tables-only",
]
# Host files only check arguments and copy buffers: -O0 halves their compile time.
HOST_FLAGS = [
    "-std=c++17",
    "-O0",
    "-fPIC",
    "-fvisibility=hidden",
    "-fvisibility-inlines-hidden",
    "-U_FORTIFY_SOURCE",
    "-Wno-unused-parameter",
]


# The runtime (scheduler, fault handler) is hot and shared: optimized, symbols visible.
RUNTIME_FLAGS = ["-O2", "-fvisibility=default"]

# Headers every host file includes (csrc/ops, csrc/emu), precompiled once per torch version.
TORCH_PCH_HEADER = """
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/Optional.h>
#include <torch/library.h>
"""


class EmulatorError(RuntimeError):
    """The emulator could not be built (no clang 19, a kernel that does not compile, ...)."""


def compiler() -> str | None:
    """Path of the clang++ used for the emulator, or None when it is not installed."""
    env = os.environ.get("METAL_MARLIN_EMU_CXX")
    if env:
        return env if shutil.which(env) else None
    return shutil.which("clang++-19")


def cache_root() -> Path:
    """Where objects and libraries are cached: METAL_MARLIN_EMU_CACHE, else
    ~/.cache/metal_marlin_torch/emu, else (home not writable) a per-user temp directory."""
    return cache_dir("emu", "METAL_MARLIN_EMU_CACHE")


def _sha(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()



def _run(cmd: Sequence[str], what: str) -> str:
    proc = subprocess.run(list(cmd), capture_output=True, text=True)
    if proc.returncode != 0:
        raise EmulatorError(f"{what} failed:\n{' '.join(cmd)}\n{proc.stderr[-8000:]}")
    return proc.stdout


# ---------------------------------------------------------------------------------------------
# Source translation: .metal (preprocessed) -> C++ with threadgroup storage and trampolines.

_TG_DECL = re.compile(
    r"\bthreadgroup\s+(?P<decl>[^;{}()=,\[\]]*?)\s*(?P<dims>(?:\[[^\]]*\]\s*)*);"
)
_KERNEL = re.compile(r"\bkernel\s+void\s+(?P<name>\w+)\s*\(")
_PARAM = re.compile(
    r"^(?P<type>.*?)\b(?P<name>\w+)\s*\[\[\s*(?P<attr>\w+)\s*(?:\(\s*(?P<idx>\d+)\s*\))?\s*\]\]\s*$",
    re.S,
)


@dataclass(frozen=True)
class KernelParam:
    name: str
    attr: str
    index: int | None


def _matching_paren(text: str, open_pos: int) -> int:
    depth = 0
    for i in range(open_pos, len(text)):
        c = text[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
    raise EmulatorError("unbalanced parentheses in a kernel signature")


def _split_params(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in text:
        if c in "(<[{":
            depth += 1
        elif c in ")>]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        parts.append("".join(cur))
    return [p.strip() for p in parts]


def parse_kernels(pre: str, origin: str) -> dict[str, list[KernelParam]]:
    """Kernel names and their attributed parameters, from preprocessed MSL."""
    kernels: dict[str, list[KernelParam]] = {}
    for m in _KERNEL.finditer(pre):
        close = _matching_paren(pre, m.end() - 1)
        params = []
        for p in _split_params(pre[m.end() : close]):
            pm = _PARAM.match(p)
            if not pm:
                raise EmulatorError(
                    f"{origin}: kernel {m['name']}: parameter '{p}' needs an attribute such as "
                    "[[buffer(0)]] or [[thread_position_in_grid]]"
                )
            attr = pm["attr"]
            if attr == "buffer":
                if pm["idx"] is None:
                    raise EmulatorError(f"{origin}: kernel {m['name']}: buffer() needs an index")
                params.append(KernelParam(pm["name"], attr, int(pm["idx"])))
            elif attr in BUILTINS:
                params.append(KernelParam(pm["name"], attr, None))
            else:
                raise EmulatorError(
                    f"{origin}: kernel {m['name']}: attribute [[{attr}]] of '{pm['name']}' is "
                    "not supported by the emulator"
                )
        if m["name"] in kernels:
            raise EmulatorError(f"{origin}: kernel {m['name']} defined twice")
        kernels[m["name"]] = params
    return kernels


def _rewrite_threadgroup(pre: str) -> str:
    """`threadgroup T x[N];` -> a reference to an array in the running group's threadgroup
    arena (csrc/emu/runtime.cpp): the first thread to reach the declaration places it (16-byte
    aligned, red zones between arrays so an access past one array is reported rather than
    landing in the next) and poisons it; every thread of the group gets the same storage."""
    ids = iter(range(1 << 30))

    def decl(m: re.Match[str]) -> str:
        name = re.findall(r"\w+", m["decl"])[-1]
        type_text = m["decl"][: m["decl"].rindex(name)].strip()
        n = next(ids)
        alias = f"emu_tg_type_{n}"
        return (
            f"using {alias} = {type_text}{m['dims']}; "
            f"{alias}& {name} = *static_cast<{alias}*>("
            f'::metal_emu::threadgroup_alloc(sizeof({alias}), "{name}", {n}));'
        )

    out = _TG_DECL.sub(decl, pre)
    return re.sub(r"\bthreadgroup\b", "", out)  # pointer parameters and casts


def translate(pre: str, origin: str) -> tuple[str, list[str]]:
    """Preprocessed .metal -> emulator C++ translation unit, and its kernel names."""
    kernels = parse_kernels(pre, origin)
    body = _rewrite_threadgroup(pre)
    body = _KERNEL.sub(lambda m: f"static void {m['name']}(", body)
    tramp = ["\n// Trampolines (helpers from csrc/emu/trampoline.h, included by the shim).\n"]
    for name, params in kernels.items():
        args = []
        for i, p in enumerate(params):
            t = f"::metal_emu::param_t<decltype(&{name}), {i}>"
            if p.attr == "buffer":
                args.append(f'::metal_emu::bind_buffer<{t}>(a, {p.index}, "{p.name}")')
            else:
                args.append(f"::metal_emu::bind_builtin<{t}>(::metal_emu::Builtin::{p.attr})")
        joined = ",\n      ".join(args)
        tramp.append(
            f"static void emu_tramp_{name}(const ::metal_emu::KernelArgs& a) {{\n"
            f"  (void)a;\n  {name}(\n      {joined});\n}}\n"
            f'static ::metal_emu::KernelRegistrar emu_reg_{name}("{name}", &emu_tramp_{name});\n'
        )
    return body + "".join(tramp), list(kernels)


# ---------------------------------------------------------------------------------------------
# Build.


def _torch_flags() -> tuple[list[str], list[str]]:
    from torch.utils import cpp_extension  # noqa: PLC0415 (heavy, only at build time)

    inc = [f"-isystem{p}" for p in cpp_extension.include_paths()]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    inc.append(f"-D_GLIBCXX_USE_CXX11_ABI={abi}")
    libs = cpp_extension.library_paths()
    link = [f"-L{p}" for p in libs] + [f"-Wl,-rpath,{p}" for p in libs]
    link += ["-lc10", "-ltorch_cpu", "-ltorch"]
    return inc, link


def _header_digest(*dirs: Path) -> str:
    h = hashlib.sha256()
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix in {".h", ".inc", ""} and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(REPO)).encode())
                h.update(p.read_bytes())
    return h.hexdigest()


class _Builder:
    def __init__(self, cxx: str) -> None:
        self.cxx = cxx
        self.version = _run([cxx, "--version"], "clang --version")
        self.objs = cache_root() / "objs"
        self.objs.mkdir(parents=True, exist_ok=True)

    def _compile(self, src_text: str, flags: list[str], label: str) -> Path:
        key = _sha(self.version, " ".join(flags), src_text)
        obj = self.objs / f"{key[:32]}.o"
        if obj.exists():
            return obj
        with tempfile.TemporaryDirectory() as td:
            src = Path(td) / (label.replace("/", "_") + ".cpp")
            src.write_text(src_text)
            tmp_obj = Path(td) / "out.o"
            _run([self.cxx, *flags, "-c", str(src), "-o", str(tmp_obj)], f"compiling {label}")
            write_atomic(obj, tmp_obj.read_bytes())
        return obj

    def kernel_object(self, metal: Path, extra_includes: Sequence[Path]) -> tuple[Path, list[str]]:
        inc = [f"-I{MSL_SHIM}", f"-I{SHADERS}", *[f"-I{p}" for p in extra_includes]]
        pre = _run(
            [self.cxx, "-E", "-x", "c++", *KERNEL_FLAGS, *inc, str(metal)],
            f"preprocessing {metal.name}",
        )
        text, names = translate(pre, str(metal))
        flags = [*KERNEL_FLAGS, "-x", "c++", f"-I{CSRC / 'emu'}"]
        return self._compile(text, flags, metal.name), names

    def torch_pch(self) -> Path:
        """Precompiled torch headers shared by every host translation unit: parsing them is
        most of each host file's compile time (about 15 s each on a CI core)."""
        inc, _ = _torch_flags()
        flags = [*HOST_FLAGS, *inc]
        key = _sha(self.version, " ".join(flags), TORCH_PCH_HEADER, torch.__version__)
        pch = self.objs / f"{key[:32]}.pch"
        if pch.exists():
            return pch
        hdr = self.objs / f"{key[:32]}.h"  # the PCH refers to its header: keep it
        write_atomic(hdr, TORCH_PCH_HEADER.encode())
        with tempfile.TemporaryDirectory() as td:
            tmp = Path(td) / "out.pch"
            _run([self.cxx, *flags, "-fpch-instantiate-templates", "-x", "c++-header", str(hdr), "-o", str(tmp)],
                 "precompiling torch headers")
            write_atomic(pch, tmp.read_bytes())
        return pch

    def host_object(self, src: Path, defines: Sequence[str], digest: str, pch: Path | None) -> Path:
        inc, _ = _torch_flags()
        flags = [*HOST_FLAGS, *inc, f"-I{CSRC}", f"-I{REPO}", *defines]
        if pch is not None:
            flags += ["-include-pch", str(pch)]
        # Headers are folded into the key through `digest`; the text is compiled by path so
        # that diagnostics name the real file.
        key_text = src.read_text() + digest
        key = _sha(self.version, " ".join(flags), str(src), key_text)
        obj = self.objs / f"{key[:32]}.o"
        if obj.exists():
            return obj
        with tempfile.TemporaryDirectory() as td:
            tmp_obj = Path(td) / "out.o"
            _run([self.cxx, *flags, "-c", str(src), "-o", str(tmp_obj)], f"compiling {src.name}")
            write_atomic(obj, tmp_obj.read_bytes())
        return obj

    def runtime_library(self, digest: str) -> Path:
        """The fiber runtime as its own shared library, linked by every emulator library, so a
        process has one kernel registry and one fault handler however many are loaded."""
        obj = self.host_object(CSRC / "emu" / "runtime.cpp", RUNTIME_FLAGS, digest, None)
        lib = cache_root() / "lib" / f"libmarlin_emu_runtime-{_sha(self.version, obj.name)[:16]}.so"
        return self._shared_library(lib, [str(obj), "-lpthread"], "linking the emulator runtime")

    def link(self, objs: Sequence[Path], name: str) -> Path:
        _, link = _torch_flags()
        key = _sha(self.version, name, *[o.name for o in objs])
        lib = cache_root() / "lib" / f"{name}-{key[:16]}.so"
        return self._shared_library(lib, [*map(str, objs), *link], f"linking {name}")

    def _shared_library(self, lib: Path, args: Sequence[str], what: str) -> Path:
        """``lib`` from the cache, or linked now from ``args`` (objects and flags) and cached."""
        if lib.exists():
            return lib
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as td:
            tmp = Path(td) / "lib.so"
            _run([self.cxx, "-shared", *args, "-o", str(tmp)], what)
            write_atomic(lib, tmp.read_bytes())
        return lib


@dataclass
class EmulatorLibrary:
    """A loaded emulator build: its torch.ops namespace and the kernels it instantiated."""

    namespace: str
    path: Path
    kernels: tuple[str, ...]

    @property
    def ops(self):  # noqa: ANN201 (torch's op namespace object)
        return getattr(torch.ops, self.namespace)

    def launch(
        self,
        kernel: str,
        buffers: dict[int, torch.Tensor],
        grid: Sequence[int],
        threadgroup: Sequence[int],
        *,
        dispatch_threads: bool = True,
        access: dict[int, str] | None = None,
    ) -> None:
        """Run one kernel on CPU tensors bound by buffer index (tests of the engine itself).

        `access[i]` is "r", "w" or "rw" (default "rw"): "w" buffers start poisoned (0xFF bytes),
        "r" buffers are checked to be unchanged by the kernel.
        """
        idx = sorted(buffers)
        acc = access or {}
        modes = [acc.get(i, "rw") for i in idx]
        for m in modes:
            if m not in ("r", "w", "rw"):
                raise ValueError(f"access must be 'r', 'w' or 'rw', got {m!r}")
        g = list(grid) + [1] * (3 - len(grid))
        t = list(threadgroup) + [1] * (3 - len(threadgroup))
        self.ops._launch(kernel, [buffers[i] for i in idx], idx, g, t, dispatch_threads, modes)


_lock = threading.Lock()
_loaded: dict[str, EmulatorLibrary] = {}


def _all_files(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.glob(pattern) if p.is_file())


def build_library(
    metal_sources: Sequence[Path],
    namespace: str,
    *,
    with_ops: bool,
    extra_includes: Sequence[Path] = (),
) -> EmulatorLibrary:
    """Compile (or fetch from the cache) and load an emulator library.

    `with_ops` adds the op host code (csrc/ops) and registers the marlin_emu operators; test
    kernel libraries use only the raw `_launch` entry point.
    """
    with _lock:
        if namespace in _loaded:
            return _loaded[namespace]
        cxx = compiler()
        if cxx is None:
            raise EmulatorError(
                "the MSL emulator needs clang 19 (apt-get install clang-19, or set "
                "METAL_MARLIN_EMU_CXX to a clang++ of version 19 or newer)"
            )
        b = _Builder(cxx)
        digest = _header_digest(CSRC, SHADERS)
        # Only the raw entry points depend on the namespace: the other objects are shared by
        # every emulator library (and cached once).
        host_srcs = [(CSRC / "emu" / "emu_launcher.cpp", []),
                     (CSRC / "emu" / "register_raw.cpp", [f"-DMETAL_EMU_NS={namespace}"])]
        if with_ops:
            host_srcs += [(p, []) for p in _all_files(CSRC / "ops", "*.cpp")]
            host_srcs += [(CSRC / "emu" / "register_ops.cpp", [])]
        workers = max(1, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            # Kernel files compile while the torch headers are precompiled.
            kfuts = [pool.submit(b.kernel_object, m, extra_includes) for m in metal_sources]
            runtime = pool.submit(b.runtime_library, digest)
            pch = b.torch_pch()
            hfuts = [pool.submit(b.host_object, s, d, digest, pch) for s, d in host_srcs]
            kres = [f.result() for f in kfuts]
            # The runtime library is linked by its absolute path: the loader finds it (once).
            objs = [o for o, _ in kres] + [f.result() for f in hfuts] + [runtime.result()]
        lib = b.link(objs, namespace)
        torch.ops.load_library(str(lib))
        names = tuple(sorted(n for _, ns in kres for n in ns))
        out = EmulatorLibrary(namespace, lib, names)
        _loaded[namespace] = out
        return out


def load() -> EmulatorLibrary:
    """Build (cached) and load the emulator with every kernel in shaders/ and the marlin_emu ops."""
    return build_library(_all_files(SHADERS, "*.metal"), "marlin_emu", with_ops=True)


def available() -> bool:
    """True when the emulator can be built here (clang 19 present)."""
    return compiler() is not None


def kernel_names() -> tuple[str, ...]:
    """Every kernel instantiated in shaders/*.metal (as the emulator compiled them)."""
    return load().kernels


def host_kernel_names() -> tuple[str, ...]:
    """Every kernel name the host dispatchers in csrc/ops can ask for."""
    return tuple(load().ops._host_kernel_names())


# ---------------------------------------------------------------------------------------------
# Profiling: memory-traffic and lane-activity counters per launch.


@dataclass
class LaunchProfile:
    """Counters of one emulated kernel launch (:func:`profile`). They come from the same
    instrumentation as the race check, so they count what the kernel's code does, not what a
    GPU's caches make of it (docs/METAL.md, "What the counters mean").

    An *instruction* is one memory access site executed by one simdgroup: the same code address,
    its n-th execution by each lane (so a loop iteration of 32 lanes is one instruction).
    """

    kernel: str
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    dispatch_threads: bool
    buffers: dict[int, dict]        # index -> name, size, read, written, unique_read (bytes)
    device_instructions: int
    lines64: int                    # distinct 64-byte lines summed over device instructions
    lines128: int
    ideal_lines64: int              # ceil(distinct bytes an instruction moves / 64), summed
    ideal_lines128: int
    tg_instructions: int
    tg_wavefronts: int              # 32 banks x 4 bytes: serialized passes, summed
    bank_conflicts: int             # passes beyond the minimum for the words touched
    simd_ops: int
    simd_lanes: int                 # active lanes summed over simd operations
    phases: list[dict]              # per barrier interval: site, thread_slots, threads_active, ...

    @property
    def device_bytes_read(self) -> int:
        return sum(b["read"] for b in self.buffers.values())

    @property
    def device_bytes_written(self) -> int:
        return sum(b["written"] for b in self.buffers.values())

    @property
    def coalescing64(self) -> float:
        """Ideal / actual 64-byte lines (1.0: every instruction touches the fewest lines)."""
        return self.ideal_lines64 / self.lines64 if self.lines64 else 1.0

    @property
    def coalescing128(self) -> float:
        return self.ideal_lines128 / self.lines128 if self.lines128 else 1.0

    @property
    def simd_active_lanes(self) -> float:
        """Mean fraction of a simdgroup's 32 lanes active at its simd operations."""
        return self.simd_lanes / (32 * self.simd_ops) if self.simd_ops else 1.0

    @classmethod
    def from_json(cls, text: str) -> LaunchProfile:
        d = json.loads(text)
        for p in d["phases"]:
            p["threads_active_fraction"] = p["threads_active"] / p["thread_slots"] if p["thread_slots"] else 0.0
        return cls(
            kernel=d["kernel"], grid=tuple(d["grid"]), threadgroup=tuple(d["threadgroup"]),
            dispatch_threads=d["dispatch_threads"], buffers={int(k): v for k, v in d["buffers"].items()},
            device_instructions=d["device_instructions"], lines64=d["lines64"], lines128=d["lines128"],
            ideal_lines64=d["ideal_lines64"], ideal_lines128=d["ideal_lines128"],
            tg_instructions=d["tg_instructions"], tg_wavefronts=d["tg_wavefronts"],
            bank_conflicts=d["bank_conflicts"], simd_ops=d["simd_ops"], simd_lanes=d["simd_lanes"],
            phases=d["phases"],
        )


@contextlib.contextmanager
def profile() -> Iterator[list[LaunchProfile]]:
    """Count memory traffic and lane activity of every emulated launch inside the block.

        with emulator.profile() as launches:
            torch.ops.marlin_emu.gemm(x, ...)
        launches[0].coalescing64, launches[0].buffers[1]["read"]

    Launches run on one worker thread while profiling (slower). The list is filled when the
    block exits.
    """
    ops = load().ops
    launches: list[LaunchProfile] = []
    ops._profile_take()  # drop records of an earlier, interrupted block
    ops._profile(True)
    try:
        yield launches
    finally:
        ops._profile(False)
        launches.extend(LaunchProfile.from_json(t) for t in ops._profile_take())


# ---------------------------------------------------------------------------------------------
# Routing torch.ops.marlin.* through marlin_emu.


def emulated_ops() -> tuple[str, ...]:
    """The marlin ops that have an emulated Metal kernel (a CPU kernel in marlin_emu)."""
    from .ops.library import SCHEMAS  # noqa: PLC0415 (ops imports are cheap; avoids a cycle)

    load()
    cpu = set(torch._C._dispatch_get_registrations_for_dispatch_key("CPU"))
    return tuple(op for op in SCHEMAS if f"marlin_emu::{op}" in cpu)


@dataclass
class EmulatorSession:
    """What :func:`use` yields: the ops it routes, and every routed call's op name in order."""

    ops: tuple[str, ...]
    calls: list[str]


@contextlib.contextmanager
def use() -> Iterator[EmulatorSession]:
    """Route every ``torch.ops.marlin.*`` call on CPU tensors through the emulated Metal kernels.

    Uses the ops registry's override hook (metal_marlin_torch.ops.registry), so autograd,
    fake tensors and the Python wrappers behave exactly as without it; only the CPU kernel
    changes. Ops without an emulated kernel keep the pure-torch one (listed by
    :func:`emulated_ops`; ``backend_info()`` shows the routing while the context is active).
    """
    from .ops import registry  # noqa: PLC0415

    lib = load()
    session = EmulatorSession(emulated_ops(), [])

    def route(op: str):  # noqa: ANN202
        target = getattr(lib.ops, op)

        def kernel(*args):  # noqa: ANN002, ANN202
            session.calls.append(op)
            return target(*args)

        return kernel

    with registry.override({op: route(op) for op in session.ops}, "cpu", "metal-emulator"):
        yield session


__all__ = [
    "EmulatorError",
    "EmulatorLibrary",
    "EmulatorSession",
    "LaunchProfile",
    "emulated_ops",
    "available",
    "build_library",
    "compiler",
    "host_kernel_names",
    "kernel_names",
    "load",
    "profile",
    "translate",
    "use",
]

if sys.platform == "win32":  # pragma: no cover (ucontext and mmap guard pages are POSIX)
    log.debug("metal_marlin_torch.emulator is not supported on Windows")
