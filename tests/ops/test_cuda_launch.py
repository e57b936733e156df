"""Caching logic of the CUDA fast path without a GPU (issue 24 items 1-2): the recorded launch
(argument slots found, per-call tensors replaced and never held) and the split-K workspace
policy (reserved once, never allocated and kept inside a compiled region)."""

from __future__ import annotations

import types

import pytest
import torch

from metal_marlin_torch.ops.cuda import dispatch as D
from metal_marlin_torch.ops.cuda import launch as LN


def _kernel(x_ptr, w_ptr, y_ptr, bias_ptr, M, N, BLOCK: int = 16, HAS_BIAS: bool = False):
    """Stands in for a Triton kernel's Python function (its signature is what matters)."""


class _Compiled:
    """A CompiledKernel stand-in: records what its launcher gets."""

    function = "fn"
    packed_metadata = "meta"

    def __init__(self):
        self.calls = []

    def run(self, *args):
        self.calls.append(args)


def _record(x2, w, y, bias):
    kernel = types.SimpleNamespace(fn=_kernel)
    compiled = _Compiled()
    args = (x2, w, y, bias if bias is not None else w, x2.shape[0], w.shape[0])
    return (kernel, (4, 2), args, {"HAS_BIAS": bias is not None}, compiled), compiled


@pytest.mark.parametrize("with_bias", [False, True])
def test_recorded_launch_replaces_per_call_tensors(monkeypatch, with_bias):
    monkeypatch.setattr(LN, "_stream", lambda index: 7)
    x2, w, y = torch.randn(2, 8), torch.randn(5, 8), torch.empty(2, 5)
    bias = torch.randn(5) if with_bias else None
    record, compiled = _record(x2, w, y, bias)
    rec = LN.Recorded.build(record, x2, y, bias)
    assert rec is not None
    assert rec.slots["x"] == [0] and rec.slots["y"] == [2]
    assert ("bias" in rec.slots) == with_bias
    # no per-call tensor is held (it may belong to a CUDA graph's memory pool)
    assert all(rec.args[i] is None for idx in rec.slots.values() for i in idx)
    assert rec.args[1] is w and rec.args[6:] == [16, with_bias]  # default and keyword in order
    x_new = torch.randn(2, 8)
    b_new = torch.randn(5) if with_bias else None
    out = rec(x_new, b_new)
    (call,) = compiled.calls
    assert call[:9] == (4, 2, 1, 7, "fn", "meta", None, None, None)
    launched = list(call[9:])
    # pointers as raw addresses (the launcher takes ints as they are)
    assert launched[0] == x_new.data_ptr() and launched[2] == out.data_ptr() and out.shape == (2, 5)
    assert launched[1] == w.data_ptr()
    assert launched[3] == (b_new if with_bias else w).data_ptr()


def test_output_passed_twice_is_replaced_everywhere(monkeypatch):
    """Regression: an unsplit launch passes its output again as the split-K workspace; the
    replay must replace every position (it wrote into the recording call's output before)."""
    monkeypatch.setattr(LN, "_stream", lambda index: 0)
    x2, w, y = torch.randn(2, 8), torch.randn(5, 8), torch.empty(2, 5)
    kernel = types.SimpleNamespace(fn=_kernel)
    compiled = _Compiled()
    record = (kernel, (1,), (x2, w, y, y, 2, 5), {}, compiled)  # bias_ptr slot holds y
    rec = LN.Recorded.build(record, x2, y, None)
    assert rec.slots["y"] == [2, 3]
    out = rec(torch.randn(2, 8), None)
    launched = compiled.calls[0][9:]
    assert launched[2] == out.data_ptr() and launched[3] == out.data_ptr()


def test_launcher_that_refuses_ints_gets_tensors(monkeypatch):
    monkeypatch.setattr(LN, "_stream", lambda index: 0)
    x2, w, y = torch.randn(2, 8), torch.randn(5, 8), torch.empty(2, 5)
    record, compiled = _record(x2, w, y, None)

    def strict(*args):
        if isinstance(args[9], int):
            raise TypeError("pointer argument must be a tensor")
        compiled.calls.append(args)

    compiled.run = strict
    rec = LN.Recorded.build(record, x2, y, None)
    out = rec(torch.randn(2, 8), None)
    assert not rec.int_ptrs and compiled.calls[0][9 + 2] is out


def test_recorded_launch_checks_alignment():
    x2, w, y = torch.randn(2, 8), torch.randn(5, 8), torch.empty(2, 5)
    record, _ = _record(x2, w, y, None)
    rec = LN.Recorded.build(record, x2, y, None)
    big = torch.randn(2 * 8 + 1)
    assert not rec.matches(big[1:].view(2, 8), None)  # 4-byte offset: not 16-byte aligned
    assert not rec.matches(torch.randn(8, 2).t(), None)  # not contiguous
    assert rec.matches(torch.randn(2, 8), None)


def test_unreplayable_launch_is_not_recorded():
    x2, w, y = torch.randn(2, 8), torch.randn(5, 8), torch.empty(2, 5)
    record, _ = _record(x2.clone(), w, y, None)  # the kernel got a copy of x, not x
    assert LN.Recorded.build(record, x2, y, None) is None


def test_dry_run_launches_nothing_and_notes_workspace():
    called = []
    kernel = types.SimpleNamespace(__getitem__=None)
    with LN.dry_run() as log:
        assert LN.launch(kernel, (1,), called.append) is None
        LN.note_workspace(100, 3)
    assert called == [] and log[-1] == ("workspace", 100, 3)


def test_split_workspace_reserved_once_and_not_kept_when_compiling(monkeypatch):
    dev = torch.device("cpu")
    monkeypatch.setattr(D, "_SPLIT_BUFFERS", {})
    monkeypatch.setattr(D, "_RETIRED", [])
    D.reserve_split_workspace(dev, 10, 5)
    ws, cnt = D.split_buffers(dev, 10, 5)
    assert torch.count_nonzero(cnt) == 0
    assert D.split_buffers(dev, 1000, 50)[0] is ws  # within the reservation: the same buffers
    # larger than reserved inside a compiled region: fresh temporaries, the shared ones untouched
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fresh_ws, fresh_cnt = D.split_buffers(dev, 4 << 20, 10)
    assert fresh_ws is not ws and fresh_ws.numel() == 4 << 20
    assert D._SPLIT_BUFFERS[str(dev)][0] is ws
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    # eager growth replaces them and keeps the old ones alive (a captured graph may use them)
    grown, _ = D.split_buffers(dev, 4 << 20, 10)
    assert grown is not ws and grown.numel() >= 4 << 20 and D._RETIRED[0][0] is ws


def test_plan_records_eager_without_tma_and_captures_with_the_full_choice(monkeypatch):
    """Eager calls record a launch chosen without the TMA-fed GEMV (its host-side descriptor
    work made eager generate() slower than dense for int4 / fp4, issue 24); a call while a
    CUDA graph is captured neither replays nor records, and takes the full choice."""
    calls = []

    def fake_gemm_prepared(x, pw, bias=None, path=None, config=None, tma=True):
        calls.append(tma)
        return torch.zeros(*x.shape[:-1], pw.out_features)

    monkeypatch.setattr(D, "gemm_prepared", fake_gemm_prepared)
    pw = types.SimpleNamespace(in_features=8, out_features=4, weight=torch.zeros(1, 1, 16))
    plan = D.LayerPlan.__new__(D.LayerPlan)  # no device work: only the call logic is tested
    plan.pw, plan.launches = pw, {}
    capturing = [False]
    monkeypatch.setattr(D, "_capturing", lambda device: capturing[0])
    plan(torch.randn(1, 8))
    assert calls == [D.EAGER_TMA] and D.EAGER_TMA is False
    assert (1, torch.float32, True) in plan.launches  # recorded (None: nothing launched)
    capturing[0] = True
    plan(torch.randn(1, 8))
    plan(torch.randn(3, 8))
    assert calls == [False, True, True]
    assert (3, torch.float32, True) not in plan.launches
