"""Bit budgets over MoE models (quant/budget.py): each fused experts projection stack is one
planning unit, measured by the same Fisher as a Linear layer, counted with every expert's bits.

The tiny Qwen3-MoE of tests/quant/test_experts_gptq.py (8 experts, top-2, 2 blocks).
"""

from __future__ import annotations

import copy

import pytest
import torch

from metal_marlin_torch import QuantConfig, load_quantized, quantize_model, save_quantized
from metal_marlin_torch.nn import MarlinExperts, MarlinLinear
from metal_marlin_torch.nn.quantize import experts_stored_bits
from metal_marlin_torch.quant.budget import fisher_diagonals
from tests.quant.test_experts_gptq import calib, tiny_moe

CANDIDATES = (("int2", 64), ("int3", 64), ("int4", 64), ("int8", 64))  # 2.5, 3.5, 4.5, 8.5 bits/weight
STACKS = [f"model.layers.{i}.mlp.experts.{p}" for i in range(2) for p in ("gate_up_proj", "down_proj")]


def mean_kl(ref: torch.nn.Module, model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        p = torch.log_softmax(ref(input_ids=x).logits.float(), -1)
        q = torch.log_softmax(model(input_ids=x).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def stored(model: torch.nn.Module) -> tuple[int, int]:
    """(bits, weights) of every quantized layer and experts module, counted from the modules."""
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, MarlinLinear):
            bits += sum(t.numel() * t.element_size() * 8 for t in (m.weight, m.scales, m.biases) if t is not None)
            weights += m.in_features * m.out_features
        elif isinstance(m, MarlinExperts):
            bits += experts_stored_bits(m)
            weights += sum(m.num_experts * n * k for n, k in m.shape.projections().values())
    return bits, weights


def test_fisher_of_an_expert_stack_predicts_kl_of_a_small_perturbation():
    # the [E, N, K] Fisher of a 3-D experts parameter weighs a change of every expert's matrix
    # as the KL it causes (experts no token reaches: zero), as for a Linear layer
    model = tiny_moe()
    x = torch.randint(0, 96, (32, 16), generator=torch.Generator().manual_seed(3))
    name = "model.layers.1.mlp.experts.gate_up_proj"
    fisher = fisher_diagonals(model, [name], x)[name]
    param = model.model.layers[1].mlp.experts.gate_up_proj
    assert fisher.shape == param.shape and fisher.sum() > 0
    noisy = copy.deepcopy(model)
    d = 0.01 * torch.randn(param.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        noisy.model.layers[1].mlp.experts.gate_up_proj.add_(d)
    predicted = 0.5 * float((fisher * d.square()).sum())
    measured = mean_kl(model, noisy, x)
    assert 0.6 < predicted / measured < 1.6, (predicted, measured)
    assert not param.requires_grad or param.grad is None


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_budget_plans_expert_stacks_and_the_checkpoint_loads_back(tmp_path, method):
    dense = tiny_moe()
    model = copy.deepcopy(dense)
    # a 10x quieter layer-0 down projection: its errors reach the logits weaker, so it should
    # get fewer bits than the other stacks
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj.mul_(0.1)
    ref = copy.deepcopy(model)
    cfg = QuantConfig(bits_per_weight=4.0, method=method, candidates=CANDIDATES,
                      method_options={"n_samples": 8, "seq_len": 32})
    summary = quantize_model(model, cfg, calibration=calib(), progress=False)
    plan = summary.budget
    assert sorted(plan.experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert sorted(plan.to_dict()["experts"]) == sorted(STACKS)
    assert all(n in plan.to_dict()["plan"] and n in plan.cost for n in STACKS)
    assert "4 expert stacks" in str(plan)
    for name, projs in plan.experts.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, MarlinExperts) and layer.plans == projs
    # achieved bits counted from the modules (layers and experts), within the budget and spent
    bits, weights = stored(model)
    assert summary.bits_per_weight == bits / weights == pytest.approx(plan.achieved)
    assert 3.5 < plan.achieved <= 4.0
    fmt_bits = {f: b for b, (f, _) in zip((2.5, 3.5, 4.5, 8.5), CANDIDATES, strict=True)}
    quiet = plan.experts["model.layers.0.mlp.experts"]["down_proj"].format
    assert all(fmt_bits[quiet] <= fmt_bits[plan.units()[n].format] for n in STACKS), plan.units()
    # the budget beats the uniform setting of the same size on the model's KL
    uniform = copy.deepcopy(ref)
    quantize_model(uniform, QuantConfig(format="int3", group_size=64, method=method,
                                        method_options={"n_samples": 8, "seq_len": 32}),
                   calibration=calib(), progress=False)  # 3.5 bits/weight
    x = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(7))
    assert mean_kl(ref, model, x) < mean_kl(ref, uniform, x)
    save_quantized(model, tmp_path)
    back = load_quantized(tmp_path)
    for name, projs in plan.experts.items():
        assert back.get_submodule(name).plans == projs
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, model(input_ids=x).logits)


def test_budget_rules_pin_an_expert_stack():
    model = tiny_moe()
    pin = "*.experts.down_proj"
    cfg = QuantConfig(bits_per_weight=5.0, candidates=CANDIDATES, rules=((pin, {"format": "int8", "group_size": 64}),))
    summary = quantize_model(model, cfg, calibration=calib())
    assert sorted(summary.budget.pinned) == [s for s in STACKS if s.endswith("down_proj")]
    for layer in model.model.layers:
        assert layer.mlp.experts.plans["down_proj"].format == "int8"
    assert 4.5 < summary.bits_per_weight <= 5.0
    with pytest.raises(ValueError, match="layers pinned by rules alone need"):
        quantize_model(tiny_moe(), QuantConfig(bits_per_weight=3.0, candidates=CANDIDATES,
                                               rules=(("*.experts.*", {"format": "int8", "group_size": 64}),)),
                       calibration=calib())


def test_expert_stack_hessians_are_the_routed_rows_of_all_experts():
    # GPTQ's column factors of a stack come from sum_e X_e^T X_e / sum_e T_e over the rows routed
    # to each expert (down_proj: their hidden activations act(gate) * up): recomputed here from
    # the router's own choice, read off the experts module's inputs
    model = tiny_moe()
    x = calib()[:4]
    names = ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    hessians: dict[str, torch.Tensor] = {}
    fisher_diagonals(model, names, x, hessians=hessians)
    experts = model.model.layers[1].mlp.experts
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append((args[0].detach(), args[1])))
    with torch.no_grad():
        model(input_ids=x)  # the Fisher's one batch (FISHER_BATCH = 4 windows)
    handle.remove()
    up_sum, down_sum, rows = torch.zeros(64, 64), torch.zeros(64, 64), 0
    for h, ids in seen:
        for e in range(8):
            xe = h[(ids == e).any(-1)].float()
            gate, up = (xe @ experts.gate_up_proj[e].detach().T).chunk(2, dim=-1)
            act = torch.nn.functional.silu(gate) * up
            up_sum += xe.T @ xe
            down_sum += act.T @ act
            rows += xe.shape[0]
    assert rows == 4 * 32 * 2  # every token reaches top-2 experts
    torch.testing.assert_close(hessians[names[0]], up_sum / rows, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hessians[names[1]], down_sum / rows, rtol=1e-4, atol=1e-6)
