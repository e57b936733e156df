"""The Objective-C++ glue, by syntax only (no Mac here), and the embedded shader source."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import metal_build
from metal_marlin_torch import emulator

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_objc_syntax.sh"

needs_clang = pytest.mark.skipif(
    not emulator.available(), reason="needs clang-19 (apt-get install clang-19)"
)


def run_check(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, files)], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable,
                               "METAL_MARLIN_EMU_CXX": emulator.compiler() or ""})


@needs_clang
def test_objc_glue_compiles_against_torch_headers():
    proc = run_check()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok: ") == len(list((ROOT / "csrc" / "metal").glob("*.mm")))


@needs_clang
def test_syntax_check_catches_a_torch_api_mistake(tmp_path):
    # Planted bug: a misspelled MPSStream method must fail the check (the stubs hide nothing
    # of torch's API).
    src = (ROOT / "csrc" / "metal" / "metal_launcher.mm").read_text()
    assert "stream->commandEncoder()" in src
    bad = tmp_path / "metal_launcher.mm"
    bad.write_text(src.replace("stream->commandEncoder()", "stream->computeEncoder()"))
    proc = run_check(bad)
    assert proc.returncode != 0 and "computeEncoder" in proc.stdout


def test_flattened_shader_source_inlines_each_header_once():
    src = metal_build.shader_source()
    assert '#include "' not in src
    for header in ("args.h", "formats/common.h", "formats/decode.h", "dequantize.h", "hadamard.h"):
        assert src.count(f"// ---- shaders/{header}") == 1
    assert src.count("#include <metal_stdlib>") >= 1


@needs_clang
def test_flattened_shader_source_is_one_valid_translation_unit(tmp_path):
    # What the Metal glue compiles at run time, checked as one TU against the emulator's shim.
    f = tmp_path / "all.metal"
    f.write_text(metal_build.shader_source())
    cxx = emulator.compiler()
    pre = subprocess.run([cxx, "-E", "-x", "c++", *emulator.KERNEL_FLAGS, f"-I{emulator.MSL_SHIM}", str(f)],
                         capture_output=True, text=True, check=True).stdout
    text, names = emulator.translate(pre, str(f))
    assert set(names) == set(emulator.kernel_names())
    tu = tmp_path / "all.cpp"
    tu.write_text(text)
    proc = subprocess.run([cxx, "-fsyntax-only", "-x", "c++", *emulator.KERNEL_FLAGS,
                           f"-I{emulator.CSRC / 'emu'}", str(tu)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_embed_shaders_writes_the_header(tmp_path):
    out = metal_build.embed_shaders(tmp_path)
    text = out.read_text()
    assert "kMarlinShaderSource" in text and "marlin_dequantize_" not in text.split("R\"MARLIN(")[0]
    assert "kMarlinHaveMetallib = false" in text


@pytest.mark.skipif(shutil.which("xcrun") is None, reason="needs Xcode's metal compiler (macOS)")
def test_metallib_builds(tmp_path):
    assert metal_build.build_metallib(tmp_path / "k.metallib")
