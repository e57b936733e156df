"""marlin::sample (ops/sampling.py): the filtering equals transformers' logits processors, the
draw is the inverse CDF of the uniforms, reproducible under a seed; opcheck; the generate() hook."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from metal_marlin_torch import ops
from metal_marlin_torch.ops import sampling
from metal_marlin_torch.ops.sampling import filter_logits

transformers = pytest.importorskip("transformers")
from transformers import generation as G  # noqa: E402

SETTINGS = [  # (repetition_penalty, temperature, top_k, top_p, min_p)
    (1.0, 0.7, 0, 1.0, 0.0),
    (1.0, 1.0, 5, 1.0, 0.0),
    (1.0, 1.3, 0, 0.8, 0.0),
    (1.0, 0.9, 0, 1.0, 0.1),
    (1.2, 0.8, 20, 0.9, 0.05),
]


@pytest.mark.parametrize(("penalty", "temperature", "top_k", "top_p", "min_p"), SETTINGS)
def test_filter_is_hf_processors(penalty, temperature, top_k, top_p, min_p):
    torch.manual_seed(0)
    logits = torch.randn(3, 101) * 3
    prev = torch.randint(0, 101, (3, 6))
    procs = G.LogitsProcessorList()
    if penalty != 1.0:
        procs.append(G.RepetitionPenaltyLogitsProcessor(penalty))
    procs.append(G.TemperatureLogitsWarper(temperature))
    if top_k:
        procs.append(G.TopKLogitsWarper(top_k))
    if top_p < 1:
        procs.append(G.TopPLogitsWarper(top_p))
    if min_p:
        procs.append(G.MinPLogitsWarper(min_p))
    expect = procs(prev, logits.clone())
    got = filter_logits(logits, prev, penalty, temperature, top_k, top_p, min_p)
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    assert torch.isinf(got).any() or (top_k == 0 and top_p == 1 and min_p == 0)


def test_greedy_is_argmax_and_ignores_uniforms():
    logits = torch.randn(4, 37)
    logits[2, 5] = logits[2, 9] = logits[2].max() + 1  # tie: the first index, as argmax
    assert torch.equal(ops.sample(logits, temperature=0, uniforms=torch.rand(4)), logits.argmax(-1))
    assert ops.sample(logits, temperature=0)[2] == 5


def test_draw_is_inverse_cdf():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    # cumulative 0.1, 0.3, 0.6, 1.0: u picks the first bucket whose end exceeds it
    for u, token in [(0.0, 0), (0.05, 0), (0.1001, 1), (0.35, 2), (0.61, 3), (0.9999, 3)]:
        assert ops.sample(logits, uniforms=torch.tensor([u])).item() == token
    # a removed token (top_k=2 keeps 2 and 3) is never drawn, even for u near 0 or 1
    for u in (0.0, 0.999999):
        assert ops.sample(logits, top_k=2, uniforms=torch.tensor([u])).item() in (2, 3)


def test_seeded_draws_are_reproducible_and_follow_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0]]).expand(4000, 5).contiguous()
    a = ops.sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = ops.sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=5).float() / a.numel()
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), rtol=0, atol=0.03)


def test_opcheck():
    logits, u = torch.randn(3, 50), torch.rand(3)
    opcheck(torch.ops.marlin.sample, (logits, u, None, 1.0, 0.8, 10, 0.9, 0.05))
    opcheck(torch.ops.marlin.sample, (logits, u, torch.randint(0, 50, (3, 4)), 1.3, 0.0, 0, 1.0, 0.0))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"temperature": -1.0}, "temperature must be >= 0"),
    ({"top_k": -2}, "top_k must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in"),
    ({"min_p": 1.5}, "min_p must be in"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"uniforms": torch.rand(2)}, "uniforms must be float32 \\[3\\]"),
    ({"prev_tokens": torch.zeros(3, 2, dtype=torch.int32)}, "prev_tokens must be int64"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ops.sample(torch.randn(3, 10), **kwargs)


def test_nan_and_empty_rows_give_minus_one_and_the_wrapper_raises():
    logits = torch.randn(4, 10)
    logits[1, 3] = float("nan")
    logits[2] = -float("inf")
    logits[3, 0] = float("inf")
    u = torch.rand(4)
    sampled = torch.ops.marlin.sample(logits, u, None, 1.0, 1.0, 0, 1.0, 0.0)
    assert sampled[0] >= 0 and sampled[1:].tolist() == [-1, -1, -1]
    greedy = torch.ops.marlin.sample(logits, u, None, 1.0, 0.0, 0, 1.0, 0.0)
    assert greedy[1:].tolist() == [-1, 0, 0]  # greedy: NaN -> -1, else argmax (first index)
    with pytest.raises(ValueError, match=r"rows \[1, 2, 3\] have no token"):
        ops.sample(logits, temperature=1.0)


def test_fixed_point_weights_are_exp():
    # W(d) = 2^31 exp(d) within the tables' rounding and the 1/4096 step in log2: 0.02%
    d = torch.cat([torch.zeros(1), -torch.rand(2000) * 22])
    w = sampling.weights(d, torch.zeros(1)).double()
    torch.testing.assert_close(w, 2.0 ** 31 * torch.exp(d.double()), rtol=2e-4, atol=1.0)
    assert sampling.weights(torch.tensor([0.0, -23.0, -float("inf")]), torch.zeros(1)).tolist() == [2 ** 31, 0, 0]


@pytest.mark.parametrize(("penalty", "temperature", "top_k", "top_p", "min_p"), SETTINGS)
def test_kept_set_is_the_transformers_filter(penalty, temperature, top_k, top_p, min_p):
    # a token the op can draw is one transformers' processors keep: sweep u over a fine grid
    torch.manual_seed(0)
    logits = (torch.randn(1, 61) * 2).repeat(2000, 1)
    prev = torch.randint(0, 61, (1, 6)).repeat(2000, 1)
    u = (torch.arange(2000, dtype=torch.float32) + 0.5) / 2000
    drawn = set(torch.ops.marlin.sample(logits, u, prev, penalty, temperature, top_k, top_p, min_p).tolist())
    kept = filter_logits(logits[:1], prev[:1], penalty, temperature, top_k, top_p, min_p)[0]
    probs = torch.softmax(kept, -1)
    assert drawn <= set(torch.nonzero(probs > 0).flatten().tolist())
    assert drawn >= set(torch.nonzero(probs > 1e-3).flatten().tolist())  # the grid hits every likely one


def test_prev_token_padding_is_ignored():
    logits, u = torch.randn(2, 30), torch.rand(2)
    prev = torch.tensor([[3, -1, 40], [7, 7, -5]])
    s = sampling.penalized_scores(logits, prev, 1.5)
    expect = logits.clone()
    for row, tok in ((0, 3), (1, 7)):
        expect[row, tok] = expect[row, tok] * 1.5 if expect[row, tok] < 0 else expect[row, tok] / 1.5
    assert torch.equal(s, expect)
    assert torch.ops.marlin.sample(logits, u, prev, 1.5, 0.9, 0, 1.0, 0.0).shape == (2,)


MODEL = "/work/shared/models/pylm-s"


@pytest.mark.skipif(not __import__("os").path.isdir(MODEL), reason=f"test model {MODEL} not present")
def test_generate_hook():
    from metal_marlin_torch.io.sampling import MarlinSampler  # noqa: PLC0415

    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 12]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    greedy = model.generate(ids, **kw)
    assert torch.equal(model.generate(ids, logits_processor=[MarlinSampler(temperature=0.0)], **kw), greedy)
    runs = [model.generate(ids, logits_processor=[MarlinSampler(temperature=1.5, top_k=50, seed=s)], **kw)
            for s in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])  # same seed, same tokens
    assert not torch.equal(runs[0], greedy) or not torch.equal(runs[2], greedy)  # it does sample
