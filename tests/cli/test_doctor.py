"""``marlin doctor`` and ``marlin selftest`` (through the emulator here), end to end."""

from __future__ import annotations

import json

import pytest
import torch

from metal_marlin_torch import _metal_sources, _native, emulator, selftest
from metal_marlin_torch.cli import main

needs_emulator = pytest.mark.skipif(not emulator.available(), reason="needs clang-19 for the MSL emulator")
FAMILIES = {f.name for f in _metal_sources.kernel_families()}


def test_doctor_reports_versions_families_and_what_to_do(tmp_path, capsys):
    out = tmp_path / "doctor.json"
    assert main(["doctor", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"torch {torch.__version__}" in text and "kernel families on MPS:" in text
    report = json.loads(out.read_text())
    assert set(report["families"]) == FAMILIES and report["extension_cache"]
    if not report["metal_extension"]:
        assert report["problems"] and all(p["what_to_do"] for p in report["problems"])


def test_doctor_names_a_rejected_family_and_its_compiler_line(monkeypatch, capsys):
    msg = "program_source:88:5: error: no matching function for call to 'simdgroup_multiply_accumulate'\nnote: ..."
    monkeypatch.setattr(_native, "family_status", lambda: {
        "gemm": {"state": "rejected", "bf16": "metal", "message": msg},
        "hadamard": {"state": "compiled", "bf16": "fallback", "message": ""}})
    assert main(["doctor"]) == 0
    text = capsys.readouterr().out
    assert "kernel family 'gemm' was rejected by the Metal compiler: program_source:88:5: error" in text
    assert "marlin selftest --json" in text
    assert "'hadamard': bf16 runs the pure-torch kernels" in text


@needs_emulator
def test_selftest_quick_covers_every_family_and_passes(tmp_path, capsys):
    out = tmp_path / "selftest.json"
    assert main(["selftest", "--quick", "--device", "emulator", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["summary"]["failed"] == 0 and report["backend"] == "metal emulator (cpu)"
    assert report["summary"]["ran_fallback"] == 0 and {c["kernel"] for c in report["cases"]} == {"metal"}
    assert set(report["summary"]["by_family"]) == FAMILIES
    ops = {c["op"] for c in report["cases"]}
    assert ops == {"dequantize", "gemm", "hadamard", "fake_quantize", "kv_quantize", "kv_dequantize_seq",
                   "kv_attention", "moe_gemm", "moe_route",
                   "rms_norm", "layer_norm", "silu_mul", "gelu_mul", "rope", "attention", "sample",
                   "attention_fp8", "attention_paged"}
    gemm = [c["params"] for c in report["cases"] if c["op"] == "gemm"]
    assert {p["M"] for p in gemm} == {1, 3, 9} and max(p["K"] for p in gemm) >= 1024  # every gemm variant
    assert {"torch.float16", "torch.bfloat16", "torch.float32"} <= {p["dtype"] for p in gemm}
    assert "cases passed" in capsys.readouterr().out


@needs_emulator
def test_selftest_reports_a_wrong_kernel(tmp_path, monkeypatch, capsys):
    # A kernel that is off by a little: the reference is nudged for hadamard only.
    real = selftest._ref

    def nudged(op, *args):
        out = real(op, *args)
        return out * (1 + 2**-6) if op == "hadamard" else out

    monkeypatch.setattr(selftest, "_ref", nudged)
    only = selftest.cases
    monkeypatch.setattr(selftest, "cases", lambda quick, v: [c for c in only(quick, v) if c.family != "gemv"
                                                             and c.family != "gemm" and c.family != "kv"])
    out = tmp_path / "s.json"
    assert main(["selftest", "--quick", "--device", "emulator", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    failed = {c["op"] for c in report["cases"] if not c["ok"]}
    assert failed == {"hadamard"}
    assert "FAIL hadamard" in capsys.readouterr().out


@needs_emulator
def test_selftest_says_which_families_fell_back(tmp_path, monkeypatch, capsys):
    lib = emulator.load().ops
    monkeypatch.setattr(selftest, "cases", lambda quick, v: [c for c in selftest._gemm_cases(True)][:2])
    lib._reset_families()
    lib._reject_family("gemv", "planted")
    try:
        assert main(["selftest", "--quick", "--device", "emulator", "--json", str(tmp_path / "s.json")]) == 0
    finally:
        lib._reject_family("gemv", "")
        lib._reset_families()
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["families"]["gemv"]["state"] == "rejected"
    assert [c["kernel"] for c in report["cases"]] == ["torch fallback"] * 2 and report["summary"]["ran_fallback"] == 2
    assert "ran the pure-torch fallback: gemv" in capsys.readouterr().out


def test_compare_rules():
    ref = torch.tensor([1.0, float("nan"), float("inf"), -2.0], dtype=torch.float16)
    assert selftest.compare(ref.clone(), ref, None)[:2] == (True, True)
    near = ref.clone()
    near[0] = 1.0009765625  # one fp16 ulp
    assert selftest.compare(near, ref, None)[:2] == (True, False)
    far = ref.clone()
    far[3] = -2.01
    assert not selftest.compare(far, ref, None)[0]
    nan_moved = ref.clone()
    nan_moved[0] = float("nan")
    assert not selftest.compare(nan_moved, ref, None)[0]
    assert selftest.compare(near, ref, torch.full((4,), 1e-3))[0]
