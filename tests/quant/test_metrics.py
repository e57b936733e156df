"""Quality metrics against hand-computed values on tiny distributions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metal_marlin_torch.quant import metrics as M


def logp(probs) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_kl_two_point_distribution():
    # KL([.5, .5] || [.25, .75]) = .5 ln 2 + .5 ln(2/3)
    kl = M.kl_divergence(logp([0.5, 0.5]), logp([0.25, 0.75]))
    assert float(kl) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)


def test_kl_with_zero_reference_mass_and_identity():
    kl = M.kl_divergence(logp([1.0, 0.0]), logp([0.5, 0.5]))
    assert float(kl) == pytest.approx(math.log(2), rel=1e-12)  # 1 * ln(1 / .5), the 0 term is 0
    x = torch.randn(3, 7).log_softmax(-1)
    assert torch.equal(M.kl_divergence(x, x), torch.zeros(3, dtype=torch.float64))


def test_nll_and_perplexity_of_uniform_model():
    v = 16
    lp = M.log_softmax(torch.zeros(2, 5, v))
    assert torch.allclose(M.nll(lp, torch.zeros(2, 5, dtype=torch.long)), torch.full((2, 5), math.log(v),
                          dtype=torch.float64))


def test_top1_agreement():
    a = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    b = torch.tensor([[0.2, 0.8], [0.1, 0.9], [0.0, 1.0]])
    assert M.top1_agreement(a, b).tolist() == [True, False, True]


def test_percentiles_match_numpy():
    v = torch.rand(101, generator=torch.Generator().manual_seed(0))
    got = M.percentiles(v, (50, 90, 99))
    for q in (50, 90, 99):
        assert got[f"p{q}"] == pytest.approx(float(np.percentile(v.numpy().astype(np.float64), q)), rel=1e-9)


def test_cosine_and_mean_pool():
    assert M.cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])).item() == pytest.approx(2 ** -0.5)
    h = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert M.mean_pool(h, mask).tolist() == [[2.0, 3.0]]
    q = M.embedding_quality(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.0], [1.0, 1.0]]))
    assert q["cosine_min"] == pytest.approx(2 ** -0.5) and q["cosine_mean"] == pytest.approx((1 + 2 ** -0.5) / 2)


class FixedLM(torch.nn.Module):
    """Logits from a fixed table indexed by the current token: a bigram model written for the test."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.table[input_ids]})()


def test_evaluate_causal_lm_by_hand():
    v = 3
    windows = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    ref_model = FixedLM(torch.zeros(v, v))  # uniform: perplexity exactly 3
    ref_lp = M.causal_lm_logprobs(ref_model, windows, batch_size=1)
    r = M.evaluate_causal_lm(ref_model, windows, ref_lp, batch_size=1)
    assert r.tokens == 6 and r.perplexity == pytest.approx(3.0) and r.kl_mean == pytest.approx(0.0, abs=1e-12)
    table = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    q = M.evaluate_causal_lm(FixedLM(table), windows, ref_lp, batch_size=2)
    # predicting positions are tokens [:, :-1]: only window 0's first token is 0 and uses
    # p = softmax([2, 0, 0]); the other five are uniform
    p0 = torch.tensor([2.0, 0.0, 0.0]).softmax(-1).double()
    kl0 = float((torch.full((3,), 1 / 3, dtype=torch.float64) * (math.log(1 / 3) - p0.log())).sum())
    assert q.kl_mean == pytest.approx(kl0 / 6, rel=1e-6)
    # that position's target is token 1:
    nll = (-math.log(float(p0[1])) + 5 * math.log(3)) / 6
    assert q.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    assert q.top1_agreement == pytest.approx(1.0)  # argmax ties resolve to index 0 in both


def test_eval_windows():
    w = M.eval_windows(torch.arange(25), 4, 18)
    assert w.shape == (4, 4) and w[1].tolist() == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="less than one window"):
        M.eval_windows(torch.arange(3), 4, 100)


def test_streamed_reference_equals_stored_reference(pylm_s_path):
    # marlin eval computes the reference batch by batch (memory bounded by one batch's logits);
    # the numbers must be exactly those of the stored [n, L-1, V] reference log-probs
    from metal_marlin_torch import QuantConfig, quantize_model  # noqa: PLC0415
    from metal_marlin_torch.io.hf import load_pretrained  # noqa: PLC0415

    ref = load_pretrained(pylm_s_path).float().eval()
    model = load_pretrained(pylm_s_path).float().eval()
    quantize_model(model, QuantConfig(format="int4", group_size=64))
    windows = torch.randint(0, ref.config.vocab_size, (5, 48), generator=torch.Generator().manual_seed(0))
    stored = M.evaluate_causal_lm(model, windows, M.causal_lm_logprobs(ref, windows, 2), batch_size=2)
    streamed = M.evaluate_causal_lm(model, windows, batch_size=2, ref_model=ref)
    assert streamed.to_dict() == stored.to_dict()
    assert stored.kl_mean > 0
    with pytest.raises(ValueError, match="not both"):
        M.evaluate_causal_lm(model, windows, M.causal_lm_logprobs(ref, windows[:1]), ref_model=ref)
