"""The Objective-C++ glue, by syntax only (no Mac here), the embedded per-family shader sources,
and the numbers the glue passes to Metal, as the shared host code computes them (byte offsets)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metal_marlin_torch import _metal_sources, emulator
from metal_marlin_torch import formats as F
from metal_marlin_torch.ops import reference

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
    src = _metal_sources.shader_source()
    assert '#include "' not in src
    for header in ("args.h", "formats/common.h", "formats/decode.h", "dequantize.h", "hadamard.h"):
        assert src.count(f"// ---- shaders/{header}") == 1
    assert src.count("#include <metal_stdlib>") >= 1


def test_each_family_source_holds_its_files_and_headers_once():
    for fam in _metal_sources.kernel_families():
        src = _metal_sources.family_source(fam)
        assert '#include "' not in src
        for f in fam.shader_files:
            assert src.count(f"// ---- shaders/{f}") == 1
        assert src.count("// ---- shaders/args.h") == 1


@needs_clang
def test_flattened_shader_source_is_one_valid_translation_unit(tmp_path):
    # What the Metal glue compiles at run time, checked as one TU against the emulator's shim.
    f = tmp_path / "all.metal"
    f.write_text(_metal_sources.shader_source())
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


def test_embed_shaders_writes_one_source_per_family(tmp_path):
    out = _metal_sources.embed_shaders(tmp_path)
    text = out.read_text()
    families = _metal_sources.kernel_families()
    # in table order (the glue indexes kMarlinFamilySources like kKernelFamilies)
    starts = [text.index(f'{{"{fam.name}",') for fam in families]
    assert starts == sorted(starts)
    assert "kMarlinMetallibPattern" in text
    dequant = text[starts[0] : starts[1]]
    assert "marlin_dequantize_" in dequant and "kernel void marlin_gemv_" not in dequant


def _lines_from(pre: str, path: str) -> list[str]:
    """Lines of preprocessed text that come from file ``path`` (by the line markers)."""
    out, current = [], None
    for line in pre.splitlines():
        m = re.match(r'# \d+ "([^"]+)"', line)
        if m:
            current = m.group(1)
        elif current == path:
            out.append(line)
    return out


@needs_clang
def test_msl_3_0_sources_have_no_bfloat(tmp_path):
    # macOS 13 compiles MSL 3.0, which has no `bfloat`: every family must still compile there,
    # without its bf16 kernels, and no line of our kernel code may name the type.
    cxx = emulator.compiler()
    flags = [f for f in emulator.KERNEL_FLAGS if not f.startswith("-D__METAL_VERSION__")] + ["-D__METAL_VERSION__=300"]
    for fam in _metal_sources.kernel_families():
        f = tmp_path / f"{fam.name}.metal"
        f.write_text(_metal_sources.family_source(fam))
        pre = subprocess.run([cxx, "-E", "-x", "c++", *flags, f"-I{emulator.MSL_SHIM}", str(f)],
                             capture_output=True, text=True, check=True).stdout
        ours = "\n".join(_lines_from(pre, str(f)))
        assert "kernel void" in ours and not re.search(r"\bbfloat\b", ours), fam.name
        text, names = emulator.translate(pre, str(f))
        assert names and not [n for n in names if "bfloat16" in n], fam.name
        tu = tmp_path / f"{fam.name}.cpp"
        tu.write_text(text)
        proc = subprocess.run([cxx, "-fsyntax-only", "-x", "c++", *flags, f"-I{emulator.CSRC / 'emu'}", str(tu)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
    # and at MSL 3.1 the bf16 kernels are there
    f = tmp_path / "fake_quantize.metal"
    pre31 = subprocess.run([cxx, "-E", "-x", "c++", *emulator.KERNEL_FLAGS, f"-I{emulator.MSL_SHIM}", str(f)],
                           capture_output=True, text=True, check=True).stdout
    assert "marlin_fake_quantize_vec_bfloat16" in emulator.translate(pre31, str(f))[1]


@pytest.mark.skipif(shutil.which("xcrun") is None, reason="needs Xcode's metal compiler (macOS)")
def test_metallibs_build(tmp_path):
    results = _metal_sources.build_metallibs(tmp_path, 15)
    assert set(results) == {f.name for f in _metal_sources.kernel_families()}


# Byte offsets: the glue passes Binding::byte_offset (launcher.h) to setBuffer:offset:, and the
# emulator's launcher copies the bytes at that same offset. Views whose element offset differs from
# their byte offset (fp16 at element 3 = byte 6, int32 rows at element K/8 = byte K/2) make an
# element/byte mix-up in the shared code read the wrong bytes, which these tests see.


def _at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """``t``'s values in a contiguous view that starts at element ``offset`` of a bigger storage."""
    big = torch.empty(t.numel() + offset + 5, dtype=t.dtype)
    big.view(torch.uint8 if t.dtype.itemsize == 1 else {2: torch.int16, 4: torch.int32}[t.dtype.itemsize]).fill_(-1)
    view = big[offset : offset + t.numel()].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.storage_offset() == offset
    return view


def test_bindings_use_byte_offsets_dequantize(emu):
    torch.manual_seed(0)
    fmt = F.get_format("int4")
    n, k, g = 4, 256, 64
    weight = torch.randint(-(2**31), 2**31, (n, F.packed_words(k, fmt.bits)), dtype=torch.int64).to(torch.int32)
    scales, biases = torch.rand(n, k // g).half(), torch.randn(n, k // g).half()
    ref = reference.dequantize(weight, scales, biases, None, "int4", g, k, torch.float16)
    args = (_at_offset(weight, 3), _at_offset(scales, 3), _at_offset(biases, 5))
    out = emu.dequantize(*args, None, "int4", g, k, torch.float16)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_bindings_use_byte_offsets_gemm_and_fake_quantize(emu):
    torch.manual_seed(0)
    fmt = F.get_format("fp4")
    n, k, g = 16, 128, 32
    weight = torch.randint(-(2**31), 2**31, (n, F.packed_words(k, fmt.bits)), dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(n, k // g) + 0.5).half()
    for m in (1, 3, 9):  # gemv, gemv_rows, gemm kernels
        x = torch.randn(m, k).half()
        same = emu.gemm(x, weight, scales, None, None, None, "fp4", g)  # contiguous, offset 0
        out = emu.gemm(_at_offset(x, 3), _at_offset(weight, 1), _at_offset(scales, 3), None, None, None, "fp4", g)
        assert not out.isnan().any()
        torch.testing.assert_close(out, same, rtol=0, atol=0)  # same kernel, same bytes
    x = torch.randn(300).half()
    for variant in ("vec", "block"):
        out = emu.fake_quantize_variant(_at_offset(x, 4), 4, variant)  # 4 elements = 8 bytes: bound in place
        torch.testing.assert_close(out, reference.fake_quantize(x, 4), rtol=0, atol=0)
