"""Kernel families (csrc/ops/families.h): the table, the MSL version choice, and the per-family
fallback, through the emulator, which runs the same FamilyTable and op wrappers as the Metal glue
with a stand-in compiler that the tests make reject a family (marlin_emu::_reject_family) and a
bfloat switch (marlin_emu::_set_bfloat)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from metal_marlin_torch import _metal_sources, _native, emulator
from metal_marlin_torch import formats as F
from metal_marlin_torch.kv.codebook import lloyd_max_codebook
from metal_marlin_torch.ops import kv as kv_ops
from metal_marlin_torch.ops import reference

from .conftest import needs_emulator

pytestmark = needs_emulator

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = _metal_sources.kernel_families()


@pytest.fixture
def families(emu):
    """marlin_emu with every family compiling and bfloat on, before and after the test."""

    def clean():
        for fam in FAMILIES:
            emu._reject_family(fam.name, "")
        emu._set_bfloat(True)
        emu._reset_families()
        _native._logged.clear()

    clean()
    yield emu
    clean()


def status(emu) -> dict[str, dict[str, str]]:
    return _native.parse_family_rows(list(emu._families()))


def test_every_kernel_and_shader_file_belongs_to_exactly_one_family(emu):
    names = set(emulator.kernel_names())
    for name in names | set(emulator.host_kernel_names()):
        owners = [f.name for f in FAMILIES if any(name.startswith(p) for p in f.kernel_prefixes)]
        assert len(owners) == 1, (name, owners)
        assert emu._kernel_family(name) == owners[0]  # the C++ lookup agrees with the parsed table
    files = [f for fam in FAMILIES for f in fam.shader_files]
    assert sorted(files) == sorted(p.name for p in (ROOT / "shaders").glob("*.metal"))
    assert {f.name for f in FAMILIES} >= {"dequantize", "gemv", "gemm", "hadamard", "fake_quantize", "kv"}
    assert emu._kernel_family("marlin_nothing_float16") == ""


def test_msl_version_by_macos_matches_python_and_pytorch(emu):
    # PyTorch (OperationUtils.mm): 4.0 from macOS 26, 3.2 from 15, 3.1 below; we add 3.0 on 13.
    expected = {12: (0, 0, 0, 0), 13: (3, 0, 0, 0), 14: (3, 1, 1, 0), 15: (3, 2, 1, 1),
                16: (3, 2, 1, 1), 26: (4, 0, 1, 1), 27: (4, 0, 1, 1)}
    for macos, want in expected.items():
        assert tuple(emu._msl_choice(macos, 0)) == want, macos
        assert _metal_sources.msl_for_macos(macos) == (want[0], want[1], bool(want[2]))


def test_families_compile_lazily_on_first_use(families):
    emu = families
    assert {s["state"] for s in status(emu).values()} == {"not_compiled"}
    x = torch.randn(3, 70, dtype=torch.float16)
    emu.hadamard(x, 2)
    st = status(emu)
    assert st["hadamard"]["state"] == "compiled"
    assert all(st[f.name]["state"] == "not_compiled" for f in FAMILIES if f.name != "hadamard")


def _gemm_inputs(m: int):
    torch.manual_seed(m)
    fmt = F.get_format("int4")
    n, k, g = 8, 128, 64
    weight = torch.randint(-(2**31), 2**31, (n, F.packed_words(k, fmt.bits)), dtype=torch.int64).to(torch.int32)
    return (torch.randn(m, k).half(), weight, torch.rand(n, k // g).half(), torch.randn(n, k // g).half(), None,
            None, "int4", g)


def test_a_rejected_family_falls_back_alone_and_is_logged_once(families, caplog):
    emu = families
    planted = "program_source:41:7: error: no matching function for call to 'simdgroup_multiply_accumulate'"
    emu._reject_family("gemv", planted)
    with caplog.at_level(logging.INFO, logger="metal_marlin_torch"):
        for _ in range(2):
            args = _gemm_inputs(1)  # M = 1: a gemv kernel, whose family is rejected
            torch.testing.assert_close(emu.gemm(*args), reference.gemm(*args), rtol=0, atol=0)
        args = _gemm_inputs(9)  # M = 9: the gemm family, still Metal (emulated)
        emu.gemm(*args)
    st = status(emu)
    assert st["gemv"] == {"state": "rejected", "bf16": "metal", "message": planted}
    assert st["gemm"]["state"] == "compiled"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'gemv'" in warnings[0].getMessage() and planted in warnings[0].getMessage()


def test_the_fallback_kernel_is_not_the_emulated_one(families, monkeypatch):
    # The two agree bitwise here (M = 1 int4 is exact enough), so prove the route by counting the
    # calls of the pure-torch kernel the wrapper falls back to (marlin_torch::gemm).
    emu = families
    from metal_marlin_torch.ops import registry

    calls = []
    monkeypatch.setattr(registry, "note_fallback", lambda op, dt: calls.append((op, dt)))
    args = _gemm_inputs(1)
    emu.gemm(*args)
    assert calls == []
    emu._reset_families()
    emu._reject_family("gemv", "planted")
    emu.gemm(*args)
    assert calls == [("gemm", "cpu")]


def test_bf16_without_bfloat_falls_back_and_other_dtypes_keep_metal(families, caplog):
    emu = families
    emu._set_bfloat(False)
    x = torch.randn(5, 33)
    with caplog.at_level(logging.INFO, logger="metal_marlin_torch"):
        out = emu.fake_quantize(x.bfloat16(), 3)
        torch.testing.assert_close(out, reference.fake_quantize(x.bfloat16(), 3), rtol=0, atol=0)
        emu.fake_quantize(x.half(), 3)
    st = status(emu)["fake_quantize"]
    assert st["bf16"] == "fallback" and st["state"] == "compiled"
    assert "no bfloat" in caplog.text


def test_in_place_ops_fall_back_too(families):
    # kv_quantize writes into its arguments: the fallback must write the same places.
    emu = families
    emu._reject_family("kv", "planted")
    torch.manual_seed(0)
    heads, capacity, d, bits = 2, 6, 64, 4
    codebook = lloyd_max_codebook(bits, d)
    x = torch.randn(heads, 2, d).half()
    positions = torch.tensor([1, 4])
    packed = torch.zeros(heads, capacity, d // 2, dtype=torch.uint8)
    norms = torch.zeros(heads, capacity, 1)
    ref_packed, ref_norms = packed.clone(), norms.clone()
    emu.kv_quantize(x, positions, packed, norms, codebook, bits)
    kv_ops.kv_quantize(x, positions, ref_packed, ref_norms, codebook, bits)
    assert torch.equal(packed, ref_packed) and torch.equal(norms, ref_norms)
    assert norms[:, [1, 4]].gt(0).all() and status(emu)["kv"]["state"] == "rejected"
