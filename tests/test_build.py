"""metal_marlin_torch.build: the first-use build of the Metal extension, with the Mac parts stubbed
(platform, compiler, torch.utils.cpp_extension.load), and setup.py's promise of a pure-Python,
torch-free install."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

from metal_marlin_torch import _metal_sources, build

ROOT = Path(__file__).resolve().parents[1]


def copy_sources(dst: Path) -> Path:
    for d in ("csrc", "shaders"):
        shutil.copytree(ROOT / d, dst / d)
    return dst


def test_key_names_torch_python_macos_and_every_source(tmp_path):
    root = copy_sources(tmp_path)
    key = build.build_key("2.13.0", "3.11.7", (15, 1), root)
    assert key == build.build_key("2.13.0", "3.11.7", (15, 1), root) and len(key) == 16
    others = {build.build_key("2.14.0", "3.11.7", (15, 1), root), build.build_key("2.13.0", "3.12.1", (15, 1), root),
              build.build_key("2.13.0", "3.11.7", (14, 6), root)}
    assert key not in others and len(others) == 3
    for rel in ("shaders/formats/common.h", "csrc/ops/gemm.cpp", "csrc/metal/metal_launcher.mm"):
        f = root / rel
        text = f.read_text()
        f.write_text(text + "\n// changed\n")
        assert build.build_key("2.13.0", "3.11.7", (15, 1), root) != key, rel
        f.write_text(text)
    # the Linux-only syntax stubs are not part of the build
    (root / "csrc/metal/syntax_stubs/Metal/Metal.h").write_text("// changed")
    assert build.build_key("2.13.0", "3.11.7", (15, 1), root) == key


@pytest.fixture
def mac(monkeypatch, tmp_path):
    """A pretend macOS 15 arm64 with the command-line tools; builds go to tmp_path."""
    monkeypatch.setattr(build, "macos_arm64", lambda *a: True)
    monkeypatch.setattr(build, "macos_version", lambda: (15, 1))
    monkeypatch.setattr(build, "toolchain_problem", lambda: None)
    monkeypatch.setenv("METAL_MARLIN_EXT_CACHE", str(tmp_path / "ext"))
    monkeypatch.delenv("METAL_MARLIN_BUILD", raising=False)
    return monkeypatch


def test_first_use_builds_against_the_running_torch_then_uses_the_cache(mac, tmp_path):
    calls = []

    def fake_load(**kw):
        calls.append(kw)
        Path(kw["build_directory"], kw["name"] + ".so").write_bytes(b"built")

    mac.setattr(torch.utils.cpp_extension, "load", fake_load)
    mac.setattr(build.shutil, "which", lambda name: None)  # no xcrun: no metallibs, sources at run time
    res = build.ensure_built()
    assert res.built_now and res.path.read_bytes() == b"built"
    (kw,) = calls
    key = build.build_key(torch.__version__, build.platform.python_version(), (15, 1))
    assert kw["name"] == f"marlin_metal_{key}" and kw["build_directory"] == str(tmp_path / "ext" / key)
    assert kw["is_python_module"] is False
    srcs = [Path(s).name for s in kw["sources"]]
    assert "metal_launcher.mm" in srcs and "register.mm" in srcs and "gemm.cpp" in srcs
    assert "-framework" in kw["extra_ldflags"] and "Metal" in kw["extra_ldflags"]
    header = tmp_path / "ext" / key / "generated" / "metal" / "shader_source.h"
    assert header.is_file() and str(header.parent.parent) in kw["extra_include_paths"]
    assert set(res.metallibs.values()) == {"no xcrun"}
    # a second process finds the library and compiles nothing
    mac.setattr(build, "toolchain_problem", lambda: pytest.fail("looked for a compiler with a cached build"))
    again = build.ensure_built()
    assert again.path == res.path and not again.built_now and len(calls) == 1


def test_opt_out_and_other_platforms_build_nothing(mac, monkeypatch):
    monkeypatch.setattr(torch.utils.cpp_extension, "load", lambda **kw: pytest.fail("built"))
    monkeypatch.setenv("METAL_MARLIN_BUILD", "0")
    assert build.ensure_built().problem == "METAL_MARLIN_BUILD=0"
    monkeypatch.delenv("METAL_MARLIN_BUILD")
    monkeypatch.setattr(build, "macos_arm64", lambda *a: False)
    res = build.ensure_built()
    assert res.path is None and "not macOS arm64" in res.problem


def test_toolchain_messages_say_what_to_install(monkeypatch):
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert "xcode-select --install" in build.toolchain_problem()
    monkeypatch.setattr(build.shutil, "which", lambda name: f"/usr/bin/{name}")
    # xcode-select exists but no developer directory is selected (the tools are not installed)
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 2))
    assert "xcode-select --install" in build.toolchain_problem()
    monkeypatch.setattr(build.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0))
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
    assert "pip install ninja" in build.toolchain_problem()
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: True)
    assert build.toolchain_problem() is None


def test_metallibs_are_per_family_and_a_compiler_error_skips_only_that_family(tmp_path, monkeypatch):
    monkeypatch.setattr(_metal_sources.shutil, "which", lambda name: "/usr/bin/xcrun")
    seen = []

    def fake_run(cmd, check, capture_output):
        seen.append(cmd)
        src = Path(cmd[-3]) if cmd[3] == "metal" else None
        if src is not None and src.name == "gemm.metal":
            raise subprocess.CalledProcessError(1, cmd, stderr=b"gemm.metal:10:3: error: planted\nmore")
        Path(cmd[-1]).write_bytes(b"lib")
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(_metal_sources.subprocess, "run", fake_run)
    res = _metal_sources.build_metallibs(tmp_path, 14)
    assert res["gemm"] == "gemm.metal:10:3: error: planted"
    assert all(v == "" for k, v in res.items() if k != "gemm")
    assert (tmp_path / "marlin_gemv.metallib").is_file() and not (tmp_path / "marlin_gemm.metallib").exists()
    assert "-std=metal3.1" in seen[0]  # macOS 14


# setup.py run with torch made unimportable (as in pip's isolated build environment). `--name`
# evaluates setup.py and the project config without running setuptools' egg_info plugins, which
# come from whatever else is installed here (one of them imports torch: not ours to test).
BLOCK_TORCH = """
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed in pip's isolated build environment")
sys.meta_path.insert(0, NoTorch())
sys.argv = ["setup.py", "--name"]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_setup_py_needs_no_torch():
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "metal_marlin_torch"


def test_build_py_is_pure_python_and_ships_the_sources(tmp_path):
    out = tmp_path / "lib"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path), "build_py",
                           "--build-lib", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pkg = out / "metal_marlin_torch"
    assert (pkg / "build" / "__main__.py").is_file() and not list(pkg.rglob("*.so"))  # pure Python
    src = pkg / "_sources"
    assert (src / "csrc" / "ops" / "families.h").is_file() and (src / "shaders" / "gemm.metal").is_file()
    assert (src / "csrc" / "metal" / "metal_launcher.mm").is_file()
    assert not (src / "csrc" / "metal" / "syntax_stubs").exists()
    # the installed copy is complete for the build: same families, same key as the checkout
    assert _metal_sources.kernel_families(src) == _metal_sources.kernel_families()
    assert build.build_key("t", "p", (15, 0), src) == build.build_key("t", "p", (15, 0), ROOT)
