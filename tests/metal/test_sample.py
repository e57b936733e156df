"""marlin_emu.sample (shaders/sample.h, emulated) against the pure-torch kernel (ops/sampling.py):
the same token for the same uniforms, exactly (the integer design makes that a property of the
kernel, not a tolerance). Vocab sizes off the 256-thread group and the 4-bit radix, fp16/bf16/fp32
logits, ties, all-equal rows, -inf/+inf/NaN, uniforms at the edges, and the tables.

A planted bug (the top-p radix scan's `acc + h >= target` as `>`, i.e. the cut one token late)
made test_matches_the_torch_kernel fail, as did the top-k cut taken at k + 1; see docs/METAL.md."""

from __future__ import annotations

import decimal
import re
import struct
from pathlib import Path

import pytest
import torch

from metal_marlin_torch.ops import sampling

from .conftest import needs_emulator

pytestmark = needs_emulator

SHADER = Path(__file__).resolve().parents[2] / "shaders" / "sample.h"
ALL = (1.2, 0.8, 40, 0.9, 0.05)  # penalty, temperature, top_k, top_p, min_p: every filter on


def both(emu, logits, u, prev=None, penalty=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    args = (logits, u, prev, penalty, temperature, top_k, top_p, min_p)
    got, want = emu.sample(*args), sampling.sample(*args)
    assert got.dtype == torch.int64 and got.shape == (logits.shape[0],)
    assert torch.equal(got, want), f"emulated {got.tolist()} != torch {want.tolist()}"
    return got


@pytest.mark.parametrize(("vocab", "dtype", "settings"), [
    (1000, torch.float16, (1.0, 0.0, 0, 1.0, 0.0)),    # greedy
    (1000, torch.float16, ALL),
    (1000, torch.bfloat16, (1.0, 1.0, 0, 0.6, 0.0)),   # top-p alone: the 16-pass weighted select
    (1000, torch.float32, (1.0, 0.7, 7, 1.0, 0.0)),    # top-k alone: the 8-pass counting select
    (1000, torch.float32, (1.0, 1.3, 0, 1.0, 0.1)),    # min-p alone
    (32001, torch.bfloat16, ALL),
    (151936, torch.float32, ALL),                      # Qwen's vocab, small batch
])
def test_matches_the_torch_kernel(emu, vocab, dtype, settings):
    torch.manual_seed(vocab)
    b = 2 if vocab > 100000 else 3
    logits = (torch.randn(b, vocab) * 3).to(dtype)
    prev = torch.randint(-1, vocab, (b, 9))  # -1: padding, ignored
    penalty, temperature, top_k, top_p, min_p = settings
    for u in (torch.rand(b), torch.rand(b)):
        both(emu, logits, u, prev, penalty, temperature, top_k, top_p, min_p)


@pytest.mark.parametrize(("top_k", "top_p", "min_p"), [(5, 1.0, 0.0), (0, 0.65, 0.0), (6, 0.8, 0.15)])
def test_drawn_set_is_the_transformers_filter(emu, top_k, top_p, min_p):
    # 32 copies of one row, u on a grid: every token kept with probability > 1/32 is drawn, so the
    # drawn set is the kept set; it must be the one transformers' processors keep (filter_logits,
    # held against them in tests/ops/test_sampling.py). Logits 0.3 apart: no probability within
    # the fixed point's 0.02% of a cut (the nearest is 0.17% away), each kept token has p > 0.1. An
    # off-by-one cut (one token too many or too few) fails here even where random draws miss it.
    logits = (-0.3 * torch.randperm(50, generator=torch.Generator().manual_seed(1)).float())[None].repeat(32, 1)
    u = (torch.arange(32, dtype=torch.float32) + 0.5) / 32
    drawn = set(both(emu, logits, u, top_k=top_k, top_p=top_p, min_p=min_p).tolist())
    kept = sampling.filter_logits(logits[:1], None, 1.0, 1.0, top_k, top_p, min_p)[0]
    assert drawn == set(torch.nonzero(torch.isfinite(kept)).flatten().tolist())


def test_ties_and_all_equal_rows(emu):
    v = 300
    logits = torch.zeros(4, v)  # row 0: all equal
    logits[1, ::7] = 2.0        # row 1: 43 tied maxima
    logits[2] = torch.randint(0, 4, (v,)).float()  # row 2: four values, each tied ~75 times
    logits[3, 100:200] = 1.0    # row 3: ties straddling a top-k / top-p cut
    for u in (torch.tensor([0.0, 0.3, 0.6, 0.999]),):
        assert both(emu, logits, u, temperature=0.0).tolist()[:2] == [0, 0]  # greedy: first index of the max
        both(emu, logits, u)
        both(emu, logits, u, top_k=50)   # the cut falls inside a run of ties: all of it stays
        both(emu, logits, u, top_p=0.5)  # ties at the top-p cut: lower indices stay
        both(emu, logits, u, top_k=120, top_p=0.3, min_p=0.5)
    # all-equal row with top_p=0.5: exactly the first half of the vocab (ties by index) survives,
    # each of its 150 tokens equally likely: u picks token floor(150 u)
    us = (0.0, 0.4999, 0.5001, 0.9999)
    tokens = torch.cat([both(emu, logits[:1], torch.tensor([u]), top_p=0.5) for u in us])
    assert tokens.tolist() == [int(150 * u) for u in us] == [0, 74, 75, 149]


def test_infinities_and_nan(emu):
    v = 257
    logits = torch.randn(5, v)
    logits[0, :200] = -float("inf")  # drawn only among the 57 finite ones
    logits[1] = -float("inf")        # no token to draw: -1 (greedy: index 0, argmax's)
    logits[2, 9] = float("nan")      # NaN: -1, greedy too
    logits[3, 4] = logits[3, 40] = float("inf")  # sampling: -1 (inf - inf); greedy: first +inf
    u = torch.tensor([0.99, 0.5, 0.5, 0.5, 0.5])
    sampled = both(emu, logits, u, top_k=10, top_p=0.95)
    assert sampled[0] >= 200 and sampled[1:4].tolist() == [-1, -1, -1] and sampled[4] >= 0
    assert both(emu, logits, u, temperature=0.0)[:4].tolist() == [int(logits[0].argmax()), 0, -1, 4]
    for dtype in (torch.float16, torch.bfloat16):
        both(emu, logits.to(dtype), u, temperature=0.0 if dtype == torch.float16 else 1.0)


def test_uniform_edges(emu):
    logits = torch.randn(1, 500).repeat(6, 1)
    u = torch.tensor([0.0, 0.99999994, 1.0, 7.0, float("nan"), -0.5])  # >= 1 clamps, NaN and < 0 -> 0
    got = both(emu, logits, u, top_p=0.8)
    assert got[1] == got[2] == got[3] and got[0] == got[4] == got[5]


def test_temperature_overflow_and_penalty_duplicates(emu):
    logits = torch.randn(2, 600) * 1e3
    prev = torch.tensor([[5, 5, 5, 7, 599, 600], [0, 0, -3, 1, 1, 1]])  # duplicates, out of range
    got = both(emu, logits, torch.rand(2), prev, 3.0, 1e-36)  # 1e3 / 1e-36 overflows to inf: -1
    assert got.tolist() == [-1, -1]
    both(emu, logits, torch.rand(2), prev, 3.0, 0.5, 20, 0.7, 0.0)


def test_tables_match_the_torch_kernel():
    text = SHADER.read_text()
    for name, table in (("SAMPLE_EXP2_HI", sampling.EXP2_HI), ("SAMPLE_EXP2_LO", sampling.EXP2_LO)):
        body = re.search(name + r"\[64\] = \{([^}]*)\}", text).group(1)
        assert [int(x) for x in re.findall(r"(\d+)u", body)] == list(table)
    decimal.getcontext().prec = 50
    for step, table in ((64, sampling.EXP2_HI), (4096, sampling.EXP2_LO)):
        exact = [decimal.Decimal(2) ** 31 * decimal.Decimal(2) ** (decimal.Decimal(-j) / step) for j in range(64)]
        assert all(abs(decimal.Decimal(t) - e) <= decimal.Decimal("0.5") for t, e in zip(table, exact, strict=True))
    assert "0x3FB8AA3Bu" in text and struct.unpack("<f", struct.pack("<I", 0x3FB8AA3B))[0] == sampling.LOG2E


def test_host_checks(emu):
    logits, u = torch.randn(2, 10), torch.rand(2)
    with pytest.raises(ValueError, match="uniforms must be float32 \\[2\\]"):
        emu.sample(logits, u.double(), None, 1.0, 1.0, 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="top_p must be in"):
        emu.sample(logits, u, None, 1.0, 1.0, 0, 0.0, 0.0)
    with pytest.raises(ValueError, match="logits must be float16, bfloat16 or float32"):
        emu.sample(logits.double(), u, None, 1.0, 1.0, 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="prev_tokens must be int64"):
        emu.sample(logits, u, torch.zeros(2, 3, dtype=torch.int32), 1.2, 1.0, 0, 1.0, 0.0)
