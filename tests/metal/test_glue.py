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


PROBE = """
#include <ATen/mps/MPSStream.h>
void probe() {
  at::mps::MPSStream* stream = at::mps::getCurrentMPSStream();
  dispatch_sync(stream->queue(), ^() {
    id<MTLComputeCommandEncoder> encoder = stream->ENCODER();
    [encoder dispatchThreads:MTLSizeMake(1, 1, 1) threadsPerThreadgroup:MTLSizeMake(1, 1, 1)];
  });
}
"""


@needs_clang
def test_objc_glue_compiles_against_torch_headers():
    proc = run_check()
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for f in (ROOT / "csrc" / "metal").glob("*.mm"):
        assert f"ok: csrc/metal/{f.name}" in proc.stdout


@needs_clang
def test_syntax_check_catches_a_torch_api_mistake(tmp_path):
    # The same probe passes with the real MPSStream method and fails with a misspelled one:
    # the stubs hide nothing of torch's API.
    good, bad = tmp_path / "good.mm", tmp_path / "planted.mm"
    good.write_text(PROBE.replace("ENCODER", "commandEncoder"))
    bad.write_text(PROBE.replace("ENCODER", "computeEncoder"))
    proc = run_check(good, bad)
    assert f"ok: {good}" in proc.stdout, proc.stdout[-3000:]
    assert proc.returncode != 0 and f"FAILED: {bad}" in proc.stdout
    assert "no member named 'computeEncoder'" in proc.stdout


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
