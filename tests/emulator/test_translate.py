"""Source translation of the emulator build (pure Python: no compiler needed)."""

from __future__ import annotations

import pytest

from metal_marlin_torch.emulator import EmulatorError, parse_kernels, translate

SRC = """
static void helper(threadgroup float* p, uint i) { p[i] = 0; }
kernel void k1(device const float* x [[buffer(0)]], constant Args& a [[buffer(3)]],
               uint2 gid [[thread_position_in_grid]], uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float tile[4 * (2 + 1)];
  threadgroup half2 pairs[8][2];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  helper((threadgroup float*)tile, lane);
}
"""


def test_parse_kernels_reads_attributes():
    k = parse_kernels(SRC, "src")
    assert list(k) == ["k1"]
    assert [(p.name, p.attr, p.index) for p in k["k1"]] == [
        ("x", "buffer", 0), ("a", "buffer", 3), ("gid", "thread_position_in_grid", None),
        ("lane", "thread_index_in_simdgroup", None)]


def test_translate_rewrites_threadgroup_storage_and_adds_trampolines():
    out, names = translate(SRC, "src")
    assert names == ["k1"]
    assert "using emu_tg_type_0 = float[4 * (2 + 1)]; emu_tg_type_0& tile = *static_cast<emu_tg_type_0*>(" in out
    assert '::metal_emu::threadgroup_alloc(sizeof(emu_tg_type_0), "tile", 0));' in out
    assert "using emu_tg_type_1 = half2[8][2]; emu_tg_type_1& pairs" in out
    assert "threadgroup_barrier(mem_flags::mem_threadgroup)" in out  # barrier calls untouched
    assert "static void helper( float* p" in out                   # pointer qualifier dropped
    assert "static void k1(" in out and "kernel void" not in out
    assert '::metal_emu::bind_buffer<::metal_emu::param_t<decltype(&k1), 1>>(a, 3, "a")' in out
    assert 'KernelRegistrar emu_reg_k1("k1", &emu_tramp_k1)' in out


@pytest.mark.parametrize(("src", "match"), [
    ("kernel void k(device float* x) {}", "needs an attribute"),
    ("kernel void k(device float* x [[texture(0)]]) {}", "not supported"),
    ("kernel void k(uint i [[buffer]]) {}", "needs an index"),
    ("kernel void k(uint i [[thread_position_in_grid]]) {} kernel void k(uint i [[thread_position_in_grid]]) {}",
     "defined twice"),
])
def test_translate_rejects(src, match):
    with pytest.raises(EmulatorError, match=match):
        parse_kernels(src, "src")
