"""The MSL emulator itself: builtins, vectors, barriers, simd functions, simdgroup matrices,
and the reports it must give for planted bugs (tests/emulator/kernels/engine.metal)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from metal_marlin_torch import emulator

pytestmark = pytest.mark.skipif(
    not emulator.available(), reason="needs clang-19 (apt-get install clang-19) for the MSL emulator"
)

KERNELS = Path(__file__).parent / "kernels" / "engine.metal"


@pytest.fixture(scope="module")
def lib():
    return emulator.build_library([KERNELS], "marlin_emu_engine_test", with_ops=False)


@pytest.fixture(autouse=True)
def forward_order(monkeypatch):
    """These tests state what the engine reports under its default (forward) schedule and set
    any other order themselves, so a METAL_MARLIN_EMU_ORDER given to the whole run (to check
    tests/metal under one schedule) must not reach them."""
    monkeypatch.setenv("METAL_MARLIN_EMU_ORDER", "forward")


def test_kernels_are_registered(lib):
    assert "emu_positions" in lib.kernels and "emu_bug_oob" in lib.kernels
    # one registry per process: this library's kernels are among all registered ones
    assert set(lib.kernels) <= set(lib.ops._kernels())


def test_builtin_positions_with_partial_threadgroups(lib):
    # dispatchThreads over 10 x 3 with 4 x 2 threadgroups: the last column of groups has 2
    # threads across, the last row 1 thread down (non-uniform edge groups)
    gx, gy, tx, ty = 10, 3, 4, 2
    out = torch.full((gx * gy, 4), -1, dtype=torch.int32)
    lib.launch("emu_positions", {0: out}, (gx, gy), (tx, ty), access={0: "w"})
    for y in range(gy):
        for x in range(gx):
            group = (x // tx, y // ty)
            size = (min(tx, gx - group[0] * tx), min(ty, gy - group[1] * ty))
            local = (x - group[0] * tx, y - group[1] * ty)
            tidx = local[0] + local[1] * size[0]
            expect = [group[0] + 100 * group[1], tidx, tidx % 32 + 100 * (tidx // 32), size[0] * size[1]]
            assert out[y * gx + x].tolist() == expect, (x, y)


def test_vectors_swizzles_and_conversions(lib):
    x = torch.randn(6, 4)
    y = torch.empty(6, 4)
    h = torch.empty(6, 4, dtype=torch.float16)
    lib.launch("emu_vectors", {0: x, 1: y, 2: h}, (6,), (6,), access={0: "r", 1: "w", 2: "w"})
    # w = (v.z, v.w, v.x, 1); w.xy = w.yx * 2; w.w += v.y
    expect = torch.stack([x[:, 3] * 2, x[:, 2] * 2, x[:, 0], 1 + x[:, 1]], 1)
    torch.testing.assert_close(y, expect, rtol=0, atol=0)
    torch.testing.assert_close(h, x.flip(1).half(), rtol=0, atol=0)


def test_threadgroup_reduction_with_barriers(lib):
    x = torch.randn(5 * 64)
    out = torch.empty(5)
    lib.launch("emu_tg_reduce", {0: x, 1: out}, (5,), (64,), dispatch_threads=False, access={0: "r", 1: "w"})
    # tree order: pairs 32 apart, then 16, ... (float32, same order as the kernel)
    t = x.view(5, 64).clone()
    s = 32
    while s:
        t = t[:, :s] + t[:, s:2 * s]
        s //= 2
    torch.testing.assert_close(out, t[:, 0], rtol=0, atol=0)


def test_simd_functions_match_a_lane_model(lib):
    # 40 threads in one group: a full simdgroup and one of 8 lanes (the others do not exist)
    n = 40
    x = torch.randn(n)
    out = torch.empty(n * 8)
    lib.launch("emu_simd", {0: x, 1: out}, (n,), (n,), access={0: "r", 1: "w"})
    out = out.view(n, 8)
    for i in range(n):
        base, width = (0, 32) if i < 32 else (32, 8)
        lane = i - base
        vals = x[base:base + width].tolist()

        def at(src, lane=lane, vals=vals, width=width):
            return vals[src] if 0 <= src < width else float("nan")

        row = out[i].tolist()
        assert row[0] == pytest.approx(sum(vals), rel=1e-5)
        assert row[1] == max(vals)
        assert row[2] == pytest.approx(sum(vals[:lane]), rel=1e-5, abs=1e-6)
        for got, want in [(row[3], at(lane ^ 5)), (row[4], at(lane + 3) if lane + 3 < 32 else vals[lane]),
                          (row[5], at(7)), (row[6], at((lane * 3) % 32))]:
            # a lane that does not exist reads as poison (NaN)
            assert (got != got and want != want) or got == want, (i, got, want)
        assert row[7] == pytest.approx(sum(vals[:lane + 1]), rel=1e-5)


def test_simdgroup_matrix_multiply_accumulate(lib):
    a = torch.randn(8, 8)
    b = torch.randn(8, 8).half()
    d = torch.empty(8, 8)
    lib.launch("emu_matrix", {0: a, 1: b, 2: d}, (32,), (32,), access={0: "r", 1: "r", 2: "w"})
    # b loaded transposed; accumulator filled with 1
    torch.testing.assert_close(d, a.double().matmul(b.double().T).float() + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 8, 13])
def test_vector_loads_at_element_alignment(lib, n):
    # the guarded copy of an n-float buffer ends at a page boundary, so it starts only 4-byte
    # aligned when n is not a multiple of 4; float4 loads must still work
    x = torch.randn(n)
    y = torch.empty(n)
    lib.launch("emu_vec_tail", {0: x, 1: y, 2: torch.tensor([n], dtype=torch.int32)},
               ((n + 3) // 4,), (4,), access={0: "r", 1: "w", 2: "r"})
    torch.testing.assert_close(y, x * 2, rtol=0, atol=0)


# --- planted bugs --------------------------------------------------------------------------

def run_bug(lib, kernel, buffers, grid, tg, dispatch_threads=True, access=None):
    with pytest.raises(RuntimeError) as info:
        lib.launch(kernel, buffers, grid, tg, dispatch_threads=dispatch_threads, access=access)
    return str(info.value).splitlines()[0]


def test_reports_out_of_bounds_read_past_the_end(lib):
    msg = run_bug(lib, "emu_bug_oob", {0: torch.randn(7), 1: torch.empty(7)}, (7,), (7,))
    assert "out-of-bounds access in kernel 'emu_bug_oob'" in msg
    assert "buffer(0)" in msg and "of 28 bytes accessed at byte offset 28" in msg
    assert "thread (6, 0, 0)" in msg


def test_reports_out_of_bounds_read_before_the_start(lib):
    msg = run_bug(lib, "emu_bug_underflow", {0: torch.randn(1024), 1: torch.empty(1024)}, (1024,), (256,))
    assert "out-of-bounds" in msg and "byte offset -4" in msg


def test_reports_threads_exiting_before_a_barrier(lib):
    msg = run_bug(lib, "emu_bug_exit_before_barrier", {0: torch.empty(64)}, (1,), (64,), False)
    assert "barrier divergence: 24 thread(s) exited while 40 wait" in msg and "engine.metal:" in msg


def test_reports_two_different_barriers(lib):
    msg = run_bug(lib, "emu_bug_two_barriers", {0: torch.empty(64)}, (1,), (64,), False)
    assert "barrier divergence" in msg and msg.count("engine.metal:") == 2


def test_reports_simd_divergence(lib):
    msg = run_bug(lib, "emu_bug_simd_divergence", {0: torch.empty(32)}, (1,), (32,), False)
    assert "simd divergence in simdgroup 0" in msg


def test_reports_simd_operation_against_barrier(lib):
    msg = run_bug(lib, "emu_bug_simd_vs_barrier", {0: torch.empty(32)}, (1,), (32,), False)
    assert "some lanes wait at the simd operation" in msg and "threadgroup_barrier" in msg


def test_reports_writes_to_read_only_buffers(lib):
    msg = run_bug(lib, "emu_bug_writes_input", {0: torch.ones(32)}, (32,), (32,), access={0: "r"})
    assert "wrote to read-only buffer(0)" in msg


def test_reports_threadgroup_memory_over_32k(lib):
    msg = run_bug(lib, "emu_bug_tg_too_big", {0: torch.empty(32)}, (1,), (32,), False)
    assert "threadgroup memory exceeds 32 KiB (40960 bytes" in msg


def test_uninitialized_threadgroup_memory_reads_as_nan(lib):
    y = torch.zeros(64)
    lib.launch("emu_bug_uninit_tg", {0: y}, (1,), (64,), dispatch_threads=False)
    assert torch.equal(y[:62], torch.arange(1, 63, dtype=torch.float32))
    assert torch.isnan(y[62])  # t[63] was never written: poison
    assert y[63] == 0.0


def test_unwritten_outputs_read_as_nan(lib):
    y = torch.zeros(8)
    lib.launch("emu_bug_unwritten", {0: y}, (8,), (8,), access={0: "w"})
    assert y[::2].tolist() == [1.0] * 4 and torch.isnan(y[1::2]).all()


def test_missing_kernel_and_bad_threadgroup(lib):
    with pytest.raises(RuntimeError, match="no kernel named 'nope'"):
        lib.launch("nope", {0: torch.empty(1)}, (1,), (1,))
    with pytest.raises(RuntimeError, match="threads per threadgroup must be 1..1024"):
        lib.launch("emu_bug_unwritten", {0: torch.empty(1)}, (1,), (2048,))


def test_errors_leave_the_process_usable(lib):
    # after a fault the next launch on the same thread works (fiber stacks and handler reset)
    with pytest.raises(RuntimeError):
        lib.launch("emu_bug_oob", {0: torch.randn(3), 1: torch.empty(3)}, (3,), (3,))
    x = torch.randn(64)
    out = torch.empty(1)
    lib.launch("emu_tg_reduce", {0: x, 1: out}, (1,), (64,), dispatch_threads=False)
    torch.testing.assert_close(out, x.sum().view(1), rtol=1e-5, atol=1e-5)


def test_math_functions_follow_msl(lib):
    x = torch.tensor([2.5, -2.5, 0.5, -1.7, 3.0, float("nan"), float("inf"), -0.0, 1e-3, 70000.0,
                      1.00390625, -7.9])
    out = torch.empty(len(x) * 12)
    lib.launch("emu_math", {0: x, 1: out}, (len(x),), (len(x),), access={0: "r", 1: "w"})
    o = out.view(-1, 12)
    xd = x.double()
    expect = torch.stack([
        torch.sign(xd) * torch.floor(xd.abs() + 0.5),        # round: away from zero
        torch.round(xd),                                     # rint: half to even
        torch.where(xd.isnan(), -1.0, xd.clamp(-1, 1)),      # MSL clamp: NaN -> lower bound
        xd.isnan().double(),
        torch.exp(xd * 0.1),
        torch.sqrt(xd.abs()),
        xd * 2 + 1,
        x.half().double(),
        x.bfloat16().double(),
        torch.where(xd.isnan(), 0.5, torch.maximum(xd, torch.tensor(0.5, dtype=torch.float64))),
        torch.signbit(x).double(),
        torch.where(xd.isfinite() & (xd.abs() < 2**31), xd.trunc(), o[:, 11].double()),
    ], 1)
    torch.testing.assert_close(o.double(), expect, rtol=1e-6, atol=1e-6, equal_nan=True)


def test_integer_and_bool_vectors(lib):
    a = torch.randint(0, 256, (9, 4), dtype=torch.uint8)
    s = torch.empty(9, 4, dtype=torch.uint16)
    c = torch.empty(9, 4, dtype=torch.int32)
    lib.launch("emu_int_vectors", {0: a, 1: s, 2: c}, (9,), (9,), access={0: "r", 1: "w", 2: "w"})
    w = (a.int() + 200) % 256
    torch.testing.assert_close(s.int(), (w * 300) % 65536, rtol=0, atol=0)
    gt = (a > 100).int()
    expect = gt.clone()
    expect[:, 0] += 10 * gt.all(1).int()
    expect[:, 1] += 20 * gt.any(1).int()
    torch.testing.assert_close(c, expect, rtol=0, atol=0)


def test_atomics_across_threadgroups(lib):
    counter = torch.zeros(1, dtype=torch.int32)
    maxv = torch.full((1,), -1, dtype=torch.int32)
    lib.launch("emu_atomics", {0: counter, 1: maxv}, (5000,), (64,))
    assert counter.item() == 5000 and maxv.item() == 4999


def test_more_simd_functions(lib):
    n = 40  # a full simdgroup and one of 8 lanes
    x = torch.randn(n)
    x[35] = 2.0
    out = torch.empty(n * 6)
    lib.launch("emu_simd_more", {0: x, 1: out}, (n,), (n,), access={0: "r", 1: "w"})
    o = out.view(n, 6)
    for i in range(n):
        base, width = (0, 32) if i < 32 else (32, 8)
        lane, vals = i - base, x[base:base + width]
        assert o[i, 0] == vals.min()
        assert o[i, 1] == (vals[lane - 2] if lane >= 2 else vals[lane])  # low lanes keep theirs
        assert o[i, 2] == vals[0]
        assert o[i, 3] == float(bool((vals > 1.5).any()))
        assert o[i, 4] == 1.0
        assert o[i, 5] == float(lane == 0)


def test_reports_stack_overflow(lib):
    msg = run_bug(lib, "emu_bug_stack_overflow",
                  {0: torch.empty(2), 1: torch.tensor([200000], dtype=torch.int32)}, (2,), (2,))
    assert "stack overflow in kernel 'emu_bug_stack_overflow'" in msg


def test_faults_are_reported_even_after_faulthandler_reinstalls(lib):
    # faulthandler (pytest enables it) replacing the SIGSEGV handler between launches must not
    # turn an out-of-bounds report into a crash
    import faulthandler

    faulthandler.enable()
    msg = run_bug(lib, "emu_bug_oob", {0: torch.randn(5), 1: torch.empty(5)}, (5,), (5,))
    assert "out-of-bounds" in msg


def test_race_check_reports_a_missing_barrier_in_every_order(lib, monkeypatch):
    # Each thread reads its neighbour's slot with no barrier after the writes: threads 31 and
    # 32 are in different simdgroups, so the race is reported whatever the schedule, naming the
    # array, the byte, both threads and both source lines.
    for order in ("forward", "reverse", "skew", "skew-reverse"):
        monkeypatch.setenv("METAL_MARLIN_EMU_ORDER", order)
        msg = run_bug(lib, "emu_bug_missing_barrier", {0: torch.empty(64)}, (1,), (64,), dispatch_threads=False)
        assert "threadgroup memory race" in msg, order
        assert "threadgroup array 't' (256 bytes)" in msg
        assert "simdgroup 0" in msg and "simdgroup 1" in msg
        assert msg.count("tests/emulator/kernels/engine.metal:") == 2


def test_races_of_simdgroup_matrix_operations_name_the_kernel_lines(lib):
    # simdgroup_load/store run whole in every emulated lane; they count once per simdgroup, at
    # the kernel's call site (not the emulator's header)
    msg = run_bug(lib, "emu_bug_matrix_race", {0: torch.empty(64)}, (1,), (64,), dispatch_threads=False)
    assert "threadgroup memory race (write/read) on threadgroup array 't'" in msg
    assert msg.count("tests/emulator/kernels/engine.metal:") == 2 and "metal_matrix.inc" not in msg


def test_without_race_check_the_orders_still_differ(lib, monkeypatch):
    # METAL_MARLIN_EMU_RACECHECK=0 (for timing the emulator) leaves the schedules: forward order
    # lets thread i read thread i-1's slot after it was written, reverse order reads poison.
    monkeypatch.setenv("METAL_MARLIN_EMU_RACECHECK", "0")
    expect = torch.tensor([63.0] + list(range(63)))
    y = torch.empty(64)
    lib.launch("emu_bug_missing_barrier", {0: y}, (1,), (64,), dispatch_threads=False)
    assert torch.equal(y[1:], expect[1:])
    monkeypatch.setenv("METAL_MARLIN_EMU_ORDER", "reverse")
    lib.launch("emu_bug_missing_barrier", {0: y}, (1,), (64,), dispatch_threads=False)
    assert torch.isnan(y[1:]).all() and y[0] == 63.0


@pytest.mark.parametrize("order", ["forward", "reverse", "skew", "skew-reverse"])
def test_skewed_schedules_stop_simd_operations_acting_as_barriers(lib, monkeypatch, order):
    monkeypatch.setenv("METAL_MARLIN_EMU_ORDER", order)
    msg = run_bug(lib, "emu_bug_simd_as_barrier", {0: torch.empty(64)}, (1,), (64,), dispatch_threads=False)
    # write then read, or (simdgroup 1 first) read then write
    assert "threadgroup memory race (write/read)" in msg or "threadgroup memory race (read/write)" in msg
    # The race check off, only the schedule: forward/reverse run every lane to the simd_sum
    # before simdgroup 1 reads, so the bug hides; skew-reverse runs simdgroup 1 alone first.
    monkeypatch.setenv("METAL_MARLIN_EMU_RACECHECK", "0")
    y = torch.empty(64)
    lib.launch("emu_bug_simd_as_barrier", {0: y}, (1,), (64,), dispatch_threads=False)
    hidden = torch.equal(y[32:], torch.arange(32.0) + 32)
    assert hidden == (order != "skew-reverse")
    # The correct kernel gives the right result under every schedule, with the check on.
    monkeypatch.setenv("METAL_MARLIN_EMU_RACECHECK", "1")
    lib.launch("emu_simd_then_barrier", {0: y}, (1,), (64,), dispatch_threads=False)
    assert torch.equal(y[:32], torch.full((32,), 32.0)) and torch.equal(y[32:], torch.arange(32.0) + 32)


def test_unknown_schedule_is_an_error(lib, monkeypatch):
    monkeypatch.setenv("METAL_MARLIN_EMU_ORDER", "sideways")
    msg = run_bug(lib, "emu_simd_then_barrier", {0: torch.empty(64)}, (1,), (64,), dispatch_threads=False)
    assert "METAL_MARLIN_EMU_ORDER must be forward, reverse, skew or skew-reverse, got 'sideways'" in msg


@pytest.mark.parametrize("elem_offset,first,ok", [(0, 0, True), (4, 4, True), (4, 0, True), (1, 0, False),
                                                   (0, 2, False), (2, 2, True)])
def test_vector_loads_are_checked_against_metal_alignment(lib, elem_offset, first, ok):
    # The binding's byte offset (a tensor's storage offset) decides the address the kernel sees:
    # a float4 load is aligned when (byte offset + 4 * first) is a multiple of 16.
    base = torch.arange(64, dtype=torch.float32)
    x = base[elem_offset:elem_offset + 40]
    y = torch.empty(8, 4)
    args = {0: x, 1: y, 2: torch.tensor([first], dtype=torch.int32)}
    assert ((elem_offset + first) % 4 == 0) == ok
    if ok:
        lib.launch("emu_vector_load", args, (8,), (8,), access={0: "r", 1: "w", 2: "r"})
        assert torch.equal(y.flatten(), x[first:first + 32])
    else:
        msg = run_bug(lib, "emu_vector_load", args, (8,), (8,))
        assert "misaligned access: access to type 'const float4' needs 16-byte alignment" in msg
        assert f"bound at byte offset {4 * elem_offset}" in msg and "engine.metal:" in msg


def test_reports_misaligned_threadgroup_vector_load(lib):
    msg = run_bug(lib, "emu_bug_tg_misaligned", {0: torch.empty(16)}, (16,), (16,))
    assert "misaligned access: access to type 'const half4' needs 8-byte alignment" in msg
    assert "threadgroup array 't' (32 bytes) at byte offset 2" in msg


def test_reports_device_write_write_conflict(lib):
    msg = run_bug(lib, "emu_bug_device_ww", {0: torch.empty(8)}, (16,), (1,))
    # Threadgroups 2j and 2j+1 both write y[j]; which pair is met first depends on how the
    # worker OS threads interleave (it was not always j = 0 on a loaded machine).
    hit = re.search(r"device memory write/write conflict on buffer\(0\) 'arg0' at byte offset (\d+):", msg)
    assert hit and int(hit.group(1)) in range(0, 32, 4), msg
    y = torch.empty(1)
    lib.launch("emu_device_ww_ordered", {0: y}, (2,), (2,))
    assert y.item() == 2.0


def test_reports_threadgroup_out_of_bounds(lib):
    msg = run_bug(lib, "emu_bug_tg_oob", {0: torch.empty(32)}, (32,), (32,))
    assert "out-of-bounds threadgroup access: 4 bytes of threadgroup array 't' (128 bytes) at byte offset 128" in msg


def _pattern(lib, stride_x: int, stride_tg: int):
    x = torch.randn(64 * stride_x)
    y = torch.empty(64)
    with emulator.profile() as launches:
        lib.launch("emu_access_pattern", {0: x, 1: y, 2: torch.tensor([stride_x, stride_tg], dtype=torch.int32)},
                   (64,), (64,), access={0: "r", 1: "rw", 2: "r"})
    (p,) = launches
    return p, x


def test_profile_counts_coalescing_and_bytes(lib):
    # Unit stride: each simdgroup's read of 32 floats is 128 contiguous bytes (2 lines of 64 B,
    # 1 of 128 B when aligned). Stride 16 floats (64 B): every lane hits its own 64-byte line.
    p, x = _pattern(lib, 1, 1)
    assert p.kernel == "emu_access_pattern" and p.threadgroup == (64, 1, 1)
    assert p.buffers[0]["read"] == 64 * 4 and p.buffers[0]["unique_read"] == 64 * 4
    assert p.buffers[1]["written"] == 2 * 16 * 4  # lanes 0..15 of both simdgroups
    assert p.coalescing64 == 1.0 and p.coalescing128 == 1.0
    p16, _ = _pattern(lib, 16, 1)
    assert p16.buffers[0]["read"] == 64 * 4 and p16.buffers[0]["unique_read"] == 64 * 4
    # x's two instructions (one per simdgroup) now touch 32 lines each where 2 would do; every
    # other access (y, the argument block) is the same in both runs
    assert p16.lines64 - p.lines64 == 2 * (32 - 2)
    assert p16.ideal_lines64 == p.ideal_lines64 and p16.coalescing64 < 0.25


def test_profile_counts_bank_conflicts_and_lanes(lib):
    # Threadgroup word index tid * stride: stride 1 is conflict-free; stride 32 puts all 32
    # lanes of a simdgroup in bank 0 (32 passes instead of 1) for the store and the load.
    p1, _ = _pattern(lib, 1, 1)
    assert p1.bank_conflicts == 0
    p32, _ = _pattern(lib, 1, 32)
    # store: 2 simdgroups x 31 extra; load: lanes 0..15 only -> 2 x 15 extra
    assert p32.bank_conflicts == 2 * 31 + 2 * 15
    # simd_sum in lanes 0..15 of each simdgroup: half the lanes active
    assert p1.simd_ops == 2 and p1.simd_active_lanes == 0.5
    # two phases: before the barrier all 64 threads touch memory, after it 32 of 64
    assert [ph["threads_active_fraction"] for ph in p1.phases] == [1.0, 0.5]


def test_reports_divergent_simdgroup_matrix_operations(lib):
    msg = run_bug(lib, "emu_bug_matrix_divergence", {0: torch.randn(64), 1: torch.empty(64)}, (32,), (32,))
    assert "simd divergence in simdgroup 0" in msg
