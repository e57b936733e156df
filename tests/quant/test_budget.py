"""Bit budgets (quant/budget.py): allocation, sensitivities, and quantize_model with a budget."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from metal_marlin_torch import QuantConfig, quantize_model
from metal_marlin_torch.nn import MarlinLinear
from metal_marlin_torch.quant.budget import Candidate, allocate, fisher_diagonals, stored_bits

V, H = 48, 64


class TwoHeads(nn.Module):
    """logits = big(h) + 0.01 * small(h): the small head's errors reach the output 100x weaker,
    so at any budget between the two settings the big head deserves the bits (known answer)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(V, H)
        self.big = nn.Linear(H, V, bias=False)
        self.small = nn.Linear(H, V, bias=False)
        with torch.no_grad():
            self.small.weight.copy_(self.big.weight + 0.1 * torch.randn_like(self.big.weight))

    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:
        h = self.embed(input_ids)
        return SimpleNamespace(logits=3.0 * (self.big(h) + 0.01 * self.small(h)))


def ids(n: int = 8, length: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(seed))


def mean_kl(ref: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        p = torch.log_softmax(ref(input_ids=x).logits.float(), -1)
        q = torch.log_softmax(model(input_ids=x).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def brute_force(options: dict[str, list[Candidate]], budget: float) -> float:
    """Least total cost over every combination within the budget (the exact optimum)."""
    best = float("inf")
    for combo in itertools.product(*options.values()):
        if sum(c.bits for c in combo) <= budget:
            best = min(best, sum(c.cost for c in combo))
    return best


def test_allocate_known_answer():
    # two equal layers; 'a' loses 9 by dropping to 3 bits, 'b' only 0.1: at 3.5 bits 'a' gets 4
    opts = {"a": [Candidate("int3", 64, 300, 10.0), Candidate("int4", 64, 400, 1.0)],
            "b": [Candidate("int3", 64, 300, 0.2), Candidate("int4", 64, 400, 0.1)]}
    choice = allocate(opts, 700)
    assert (choice["a"].format, choice["b"].format) == ("int4", "int3")
    with pytest.raises(ValueError, match="cheapest settings need 600 bits"):
        allocate(opts, 599)


def test_allocate_respects_budget_and_beats_uniform():
    gen = torch.Generator().manual_seed(0)
    bits = [200, 300, 400, 800]
    for trial in range(30):
        opts = {}
        for i in range(4):
            scale = float(torch.rand(1, generator=gen)) * 10 ** float(torch.randint(0, 3, (1,), generator=gen))
            # cost falls roughly 4x per bit (quantization noise), with per-layer jitter
            opts[f"l{i}"] = [Candidate(f"f{b}", 64, b, scale * 4.0 ** (-b / 100) *
                                       (1 + 0.3 * float(torch.rand(1, generator=gen)))) for b in bits]
        budget = float(torch.randint(800, 3200, (1,), generator=gen))
        choice = allocate(opts, budget)
        used = sum(c.bits for c in choice.values())
        cost = sum(c.cost for c in choice.values())
        assert used <= budget, (trial, used, budget)
        for j, b in enumerate(bits):  # every uniform setting that fits costs at least as much
            if 4 * b <= budget:
                assert cost <= sum(o[j].cost for o in opts.values()) + 1e-12, (trial, b)
        assert cost == pytest.approx(brute_force(opts, budget), rel=1e-12), trial  # bits share a unit: exact


def test_stored_bits_matches_the_layer():
    lin = nn.Linear(64, 24)
    for fmt, group in (("int3", 32), ("nf4", 64), ("int8", 64), ("nvfp4", 16)):
        layer = MarlinLinear.from_linear(lin, fmt, group)
        want = sum(t.numel() * t.element_size() * 8 for t in (layer.weight, layer.scales, layer.biases,
                                                              layer.global_scale) if t is not None)
        assert stored_bits(fmt, group, 24, 64, torch.float16) == want, fmt


def test_fisher_predicts_kl_of_a_small_perturbation():
    # 0.5 * sum(F * d^2) is the second-order KL of a weight change d: for iid noise d the
    # off-diagonal terms vanish in expectation, so the diagonal Fisher suffices
    model = TwoHeads()
    x = ids(64, 16, seed=1)
    fisher = fisher_diagonals(model, ["big"], x)["big"]
    noisy = TwoHeads()
    d = 0.02 * torch.randn(model.big.weight.shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        noisy.big.weight.add_(d)
    predicted = 0.5 * float((fisher * d.square()).sum())
    measured = mean_kl(model, noisy, x)
    assert 0.7 < predicted / measured < 1.4, (predicted, measured)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters() if p.grad is not None)
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_budget_gives_the_bits_to_the_sensitive_layer_and_beats_uniform():
    model, ref = TwoHeads(), TwoHeads()
    cfg = QuantConfig(bits_per_weight=3.5, candidates=(("int2", 64), ("int3", 64), ("int4", 64)))
    summary = quantize_model(model, cfg, calibration=ids())
    assert summary.layers == {"big": ("int4", 64), "small": ("int2", 64)}
    assert summary.bits_per_weight == pytest.approx(3.5) and summary.bits_per_weight <= 3.5
    assert summary.budget.achieved == summary.bits_per_weight
    uniform = TwoHeads()
    quantize_model(uniform, QuantConfig(format="int3", group_size=64))  # 3 + 2 * 16 / 64 = 3.5 bits too
    x = ids(16, 16, seed=5)
    assert mean_kl(ref, model, x) < 0.5 * mean_kl(ref, uniform, x)


def test_budget_with_pinned_layer_and_gptq():
    from tests.quant.test_driver import tiny_llama, tokens

    model = tiny_llama()
    pin = "model.layers.0.self_attn.q_proj"
    cfg = QuantConfig(bits_per_weight=4.0, method="gptq", rules=((pin, {"format": "int8", "group_size": 64}),),
                      candidates=(("int2", 64), ("int3", 32), ("nf4", 64), ("int4", 32), ("int8", 64)))
    summary = quantize_model(model, cfg, calibration=tokens(8), progress=False)
    assert summary.layers[pin] == ("int8", 64)
    assert summary.budget.pinned == [pin]
    # the budget counts every stored tensor of the layers, checked against the modules
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, MarlinLinear):
            bits += sum(t.numel() * t.element_size() * 8 for t in (m.weight, m.scales, m.biases) if t is not None)
            weights += m.in_features * m.out_features
    assert summary.bits_per_weight == bits / weights <= 4.0
    assert bits / weights > 4.0 - 0.25  # the budget is spent, not left on the table
    assert len(set(summary.layers.values())) > 2  # mixed
    assert "bit budget 4 bits/weight" in str(summary)


def test_budget_on_an_encoder_and_bad_budgets():
    from tests.quant.test_driver import tiny_bert, tokens

    model = tiny_bert()
    summary = quantize_model(model, QuantConfig(bits_per_weight=3.0), calibration=tokens(4))
    assert 2.5 < summary.bits_per_weight <= 3.0
    with pytest.raises(ValueError, match="bits_per_weight=2 is below the cheapest plan"):
        quantize_model(tiny_bert(), QuantConfig(bits_per_weight=2.0), calibration=tokens(4))
    with pytest.raises(ValueError, match="bits_per_weight must be a number"):
        QuantConfig(bits_per_weight="4")
    with pytest.raises(ValueError, match="candidates: format 'mxfp4' takes group_size"):
        QuantConfig(bits_per_weight=4, candidates=(("mxfp4", 128),))


def test_default_candidates_follow_the_registered_formats(monkeypatch):
    from metal_marlin_torch import formats as F
    from metal_marlin_torch.formats.integer import _make
    from metal_marlin_torch.quant.budget import default_candidates

    names = {f for f, _ in default_candidates()}
    assert names == {"int2", "int3", "int4", "int5", "int6", "int8", "nf3", "nf4"}  # integer and codebook formats only
    monkeypatch.setitem(F.FORMATS, "int7", _make(7)())  # a format registered later joins
    cands = default_candidates()
    assert ("int7", 32) in cands and ("int7", 128) in cands
    assert QuantConfig(bits_per_weight=4.0).budget_candidates() == cands


def test_gptq_column_factors_know_which_inputs_gptq_can_compensate():
    from metal_marlin_torch.quant.budget import gptq_column_factors

    torch.manual_seed(0)
    x = torch.randn(4096, 6)
    x[:, 1] = x[:, 0] + 0.05 * torch.randn(4096)  # column 1 is nearly column 0: errors there are cheap
    h = x.T @ x / x.shape[0]
    r = gptq_column_factors(h, damp=0.0, act_order=False)
    assert r.shape == (6,) and bool(((r > 0) & (r <= 1)).all())
    assert float(r[0]) < 0.01  # quantized first, its error moves onto column 1
    assert float(r[2:].min()) > 0.95  # independent inputs: GPTQ cannot help
    # column 0 is quantized first: its factor is its precision given all other inputs (Schur
    # complement, 1 / [H^-1]_00) over its marginal H_00
    torch.testing.assert_close(r[0], 1 / torch.linalg.inv(h.double())[0, 0].float() / h[0, 0], rtol=1e-3, atol=0)


def test_budget_sensitivity_follows_the_method():
    from metal_marlin_torch.quant.budget import sensitivity_kind

    assert sensitivity_kind(QuantConfig(bits_per_weight=4.0)) == "rtn"
    assert sensitivity_kind(QuantConfig(bits_per_weight=4.0, method_options={"imatrix": True})) == "search"
    assert sensitivity_kind(QuantConfig(bits_per_weight=4.0, method="gptq")) == "gptq"
    assert sensitivity_kind(QuantConfig(bits_per_weight=4.0, method="mr-gptq", method_options={"hessian": False})) \
        == "search"
    with pytest.raises(ValueError, match="method_options\\['sensitivity'\\] must be"):
        sensitivity_kind(QuantConfig(bits_per_weight=4.0, method_options={"sensitivity": "x"}))
