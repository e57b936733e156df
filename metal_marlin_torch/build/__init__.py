"""Build the Metal extension against the running torch: at first use, or ahead of time.

``pip install`` never compiles anything (so pip's default build isolation works, and the package is
pure Python on every platform). On macOS arm64 the first ``import metal_marlin_torch`` with MPS
available builds the Objective-C++ glue (csrc/metal) and the op host code (csrc/ops) with
``torch.utils.cpp_extension.load`` against the torch that is running, caches the result under
``~/.cache/metal_marlin_torch/ext/<key>`` (``METAL_MARLIN_EXT_CACHE``), and loads it; later
processes load the cached library. The key hashes torch's version, Python's, the macOS version
and every source, so an upgrade of any of them rebuilds once. Ahead of time::

    python -m metal_marlin_torch.build      # or: marlin build

Without Xcode's command-line tools there is no C++ compiler: the build is skipped with one message
saying what to install, and the MPS ops run their pure-torch kernels (``marlin doctor`` shows it).
``METAL_MARLIN_BUILD=0`` skips the build on purpose.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import _metal_sources
from .._files import cache_dir

log = logging.getLogger("metal_marlin_torch")

EXTRA_CFLAGS = ["-std=c++20", "-fobjc-arc", "-Wno-unused-parameter", "-Wno-unused-command-line-argument"]
EXTRA_LDFLAGS = ["-framework", "Metal", "-framework", "Foundation"]


def macos_arm64(system: str | None = None, machine: str | None = None) -> bool:
    """True on Apple Silicon macOS (the only place a Metal extension is built)."""
    return (system or sys.platform) == "darwin" and (machine or platform.machine()) == "arm64"


def macos_version() -> tuple[int, int]:
    """(major, minor) of macOS; (0, 0) elsewhere."""
    ver = platform.mac_ver()[0]
    if not ver:
        return 0, 0
    parts = [int(p) for p in ver.split(".")[:2] if p.isdigit()]
    return (parts + [0, 0])[0], (parts + [0, 0])[1]


def cache_root() -> Path:
    """Where built extensions live: METAL_MARLIN_EXT_CACHE, else ~/.cache/metal_marlin_torch/ext
    (a per-user temp folder when home is not writable)."""
    return cache_dir("ext", "METAL_MARLIN_EXT_CACHE")


def sources(root: Path | None = None) -> list[Path]:
    """The extension's compiled sources: the glue (csrc/metal/*.mm) and the host code (csrc/ops/*.cpp)."""
    root = root or _metal_sources.source_root()
    return sorted((root / "csrc" / "metal").glob("*.mm")) + sorted((root / "csrc" / "ops").glob("*.cpp"))


def _inputs(root: Path) -> list[Path]:
    # Everything that changes the build: compiled sources, headers, shaders.
    files = [p for d in ("csrc/ops", "csrc/metal", "shaders") for p in sorted((root / d).rglob("*"))
             if p.is_file() and p.suffix in {".h", ".cpp", ".mm", ".metal"}]
    return [p for p in files if "syntax_stubs" not in p.parts]


def build_key(torch_version: str, python: str, macos: tuple[int, int], root: Path | None = None) -> str:
    """16 hex digits naming one build: torch and Python versions, macOS version (it picks the MSL
    version and whether bf16 kernels exist), compiler flags, and the text of every source."""
    root = root or _metal_sources.source_root()
    h = hashlib.sha256()
    for part in (torch_version, python, f"{macos[0]}.{macos[1]}", " ".join(EXTRA_CFLAGS + EXTRA_LDFLAGS)):
        h.update(part.encode() + b"\0")
    for p in _inputs(root):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def toolchain_problem() -> str | None:
    """None when a C++ compiler (Xcode command-line tools) and ninja are present; else what to do.

    On macOS /usr/bin/clang++ exists even without the tools (it only offers to install them), so
    ``xcode-select -p`` decides."""
    if shutil.which("xcode-select") is None or subprocess.run(
            ["xcode-select", "-p"], capture_output=True).returncode != 0:
        return ("Xcode command-line tools are not installed (no C++ compiler): run `xcode-select --install`, "
                "then `python -m metal_marlin_torch.build`")
    if shutil.which("clang++") is None:
        return "clang++ not found on PATH: run `xcode-select --install`, then `python -m metal_marlin_torch.build`"
    from torch.utils.cpp_extension import is_ninja_available  # noqa: PLC0415

    if not is_ninja_available():
        return "ninja is not installed (torch's extension builder needs it): run `pip install ninja`"
    return None


@dataclass
class BuildResult:
    """What :func:`ensure_built` did: the library (None when not built) and why not."""

    path: Path | None
    built_now: bool
    problem: str | None
    metallibs: dict[str, str]


def ensure_built(verbose: bool = False, force: bool = False) -> BuildResult:
    """Build (or find in the cache) the Metal extension for the running torch; do not load it.

    Raises nothing for an expected problem (not macOS arm64, no compiler, METAL_MARLIN_BUILD=0):
    returns it in ``problem``. A compiler error in our C++ is raised (a bug to report)."""
    if not macos_arm64():
        return BuildResult(None, False, f"not macOS arm64 ({sys.platform}/{platform.machine()}): no Metal", {})
    if os.environ.get("METAL_MARLIN_BUILD", "1") == "0":
        return BuildResult(None, False, "METAL_MARLIN_BUILD=0", {})
    import torch  # noqa: PLC0415
    from torch.utils import cpp_extension  # noqa: PLC0415

    root = _metal_sources.source_root()
    macos = macos_version()
    key = build_key(torch.__version__, platform.python_version(), macos, root)
    name = f"marlin_metal_{key}"
    build_dir = cache_root() / key
    lib = build_dir / f"{name}.so"
    if lib.is_file() and not force:
        return BuildResult(lib, False, None, {})
    problem = toolchain_problem()
    if problem:
        return BuildResult(None, False, problem, {})
    build_dir.mkdir(parents=True, exist_ok=True)
    log.warning("metal_marlin_torch: building the Metal extension for torch %s (first use; about a minute; "
                "cached in %s)", torch.__version__, build_dir)
    gen = build_dir / "generated"
    _metal_sources.embed_shaders(gen, root)
    metallibs = _metal_sources.build_metallibs(build_dir, macos[0], root)
    cpp_extension.load(
        name=name,
        sources=[str(p) for p in sources(root)],
        extra_cflags=EXTRA_CFLAGS,
        extra_ldflags=EXTRA_LDFLAGS,
        extra_include_paths=[str(root / "csrc"), str(root), str(gen)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )  # loads it too (torch.ops.load_library); a second load of the same path is a no-op
    return BuildResult(lib, True, None, metallibs)


def main(argv: list[str] | None = None) -> int:
    """``python -m metal_marlin_torch.build``: build now, print where and how."""
    parser = argparse.ArgumentParser(prog="python -m metal_marlin_torch.build", description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    res = ensure_built(verbose=args.verbose, force=args.force)
    if res.path is None:
        print(f"metal_marlin_torch: Metal extension not built: {res.problem}")
        return 1 if macos_arm64() else 0
    print(f"metal_marlin_torch: Metal extension {'built' if res.built_now else 'already built'}: {res.path}")
    for fam, why in sorted(res.metallibs.items()):
        print(f"  {fam}: {'precompiled metallib' if not why else 'compiled at first use (' + why + ')'}")
    return 0
