"""Whole sparse MoE blocks of the installed transformers, quantized, against the transformers block.

For each family a tiny block is built from its config with random weights, copied, and the copy
quantized by :func:`quantize_model`: the router becomes :class:`MarlinRouter` (``moe_route``),
the experts :class:`MarlinExperts` (``moe_gemm`` + ``silu_mul``), the shared expert's linears
:class:`MarlinLinear`. Two references:

- the transformers block holding the *dequantized* weights: equal up to fp32 rounding, so a
  wrong routing mode, normalization, scaling, gather or combine fails at once;
- the dense transformers block: int8 error is small (relative error bound per test), so the
  quantized block is the same function.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

from metal_marlin_torch import QuantConfig, quantize_model
from metal_marlin_torch.nn import MarlinExperts, MarlinLinear, MarlinRouter

from ..ops.op_log import OpLog

H, E, I_MOE = 64, 8, 32


def _randomize(block: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(block.named_parameters()) + list(block.named_buffers()):
            if p.is_floating_point():
                scale = 1.0 if name.endswith("gate.weight") else 0.1
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return block.eval()


def qwen3_moe() -> nn.Module:
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I_MOE, num_experts=E,
                                      num_experts_per_tok=2, norm_topk_prob=True)
    return Qwen3MoeSparseMoeBlock(cfg)


def mixtral() -> nn.Module:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    cfg = transformers.MixtralConfig(hidden_size=H, intermediate_size=I_MOE, num_local_experts=E,
                                     num_experts_per_tok=2)
    return MixtralSparseMoeBlock(cfg)


def qwen2_moe() -> nn.Module:  # shared expert with a sigmoid gate
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = transformers.Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I_MOE, num_experts=E,
                                      num_experts_per_tok=4, norm_topk_prob=False,
                                      shared_expert_intermediate_size=2 * I_MOE)
    return Qwen2MoeSparseMoeBlock(cfg)


def deepseek_v3() -> nn.Module:  # sigmoid, score bias, group-limited, scaling, shared experts
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = transformers.DeepseekV3Config(hidden_size=H, moe_intermediate_size=I_MOE, n_routed_experts=E,
                                        num_experts_per_tok=3, n_group=4, topk_group=2, norm_topk_prob=True,
                                        routed_scaling_factor=2.5, n_shared_experts=1)
    return DeepseekV3MoE(cfg)


def glm4_moe() -> nn.Module:
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    cfg = transformers.Glm4MoeConfig(hidden_size=H, moe_intermediate_size=I_MOE, n_routed_experts=E,
                                     num_experts_per_tok=2, n_group=2, topk_group=1, norm_topk_prob=True,
                                     routed_scaling_factor=1.8, n_shared_experts=1)
    return Glm4MoeMoE(cfg)


def with_dequantized(ref: nn.Module, q: nn.Module) -> nn.Module:
    """``ref`` (a copy of the dense block) holding ``q``'s dequantized weights."""
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, MarlinLinear):
                ref.get_submodule(name).weight.copy_(m.dequantized_weight(torch.float32))
            elif isinstance(m, MarlinExperts):
                target = ref.get_submodule(name)
                for proj in m.shape.projections():
                    w = m.dequantized(proj)
                    getattr(target, proj).copy_(w.transpose(1, 2) if m.shape.is_transposed else w)
    return ref


FAMILIES = {"qwen3_moe": qwen3_moe, "mixtral": mixtral, "qwen2_moe": qwen2_moe,
            "deepseek_v3": deepseek_v3, "glm4_moe": glm4_moe}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_quantized_block_equals_transformers_block(family):
    dense = _randomize(FAMILIES[family](), seed=len(family))
    q = copy.deepcopy(dense)
    summary = quantize_model(q, QuantConfig(format="int8", group_size=32))
    assert isinstance(q.gate, MarlinRouter) and summary.routers == ["gate"], summary.kept_routers
    assert isinstance(q.experts, MarlinExperts)
    shared = [m for n, m in q.named_modules() if "shared" in n and isinstance(m, MarlinLinear)]
    assert bool(shared) == any("shared" in n for n, _ in dense.named_modules())
    x = torch.randn(2, 9, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), OpLog() as log:
        out = q(x)
        ref = with_dequantized(copy.deepcopy(dense), q)(x)
        want = dense(x)
    ops_run = {n.split(".")[1] for n in log.names if n.startswith("marlin.")}
    assert {"moe_route", "moe_gemm", "silu_mul"} <= ops_run
    if shared:
        assert "gemm" in ops_run or "gemv" in ops_run or any(o.startswith("gemm") for o in ops_run)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    rel = ((out - want).norm() / want.norm()).item()
    assert rel < 0.01, rel  # int8, group 32: ~1e-3


def test_router_with_unknown_routing_is_kept_and_reported():
    dense = _randomize(qwen3_moe(), seed=3)

    class SquaredRouter(nn.Module):  # softmax of squared logits: no moe_route mode does this
        def __init__(self, weight):
            super().__init__()
            self.weight, self.top_k, self.norm_topk_prob = weight, 2, True

        def forward(self, x):
            logits = nn.functional.linear(x, self.weight)
            w, ids = torch.softmax(logits**2, -1).topk(2, -1)
            return logits, w / w.sum(-1, keepdim=True), ids

    dense.gate = SquaredRouter(dense.gate.weight)
    summary = quantize_model(dense, QuantConfig(format="int8", group_size=32))
    assert isinstance(dense.gate, SquaredRouter)
    assert "SquaredRouter" in summary.kept_routers["gate"]


def test_nemotron_h_hybrid_mamba_linears_and_moe():
    # Nemotron-H: Mamba-2 mixers (in_proj/out_proj are nn.Linear), attention, non-gated relu2
    # experts with a sigmoid router and a shared expert
    cfg = transformers.NemotronHConfig(
        vocab_size=128, hidden_size=H, layers_block_type=["mamba", "moe", "attention", "moe"],
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, mamba_num_heads=4, mamba_head_dim=16,
        n_groups=2, ssm_state_size=16, chunk_size=16, n_routed_experts=E, num_experts_per_tok=2,
        moe_intermediate_size=I_MOE, moe_shared_expert_intermediate_size=I_MOE, intermediate_size=I_MOE,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.NemotronHForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            gate = getattr(layer.mixer, "gate", None)
            if gate is not None:
                gate.weight.normal_()
                gate.e_score_correction_bias.normal_(std=0.1)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    summary = quantize_model(model, QuantConfig(format="int8", group_size=32))
    mixer = model.model.layers[0].mixer
    assert type(mixer).__name__ == "NemotronHMamba2Mixer"
    assert isinstance(mixer.in_proj, MarlinLinear) and isinstance(mixer.out_proj, MarlinLinear)
    assert "model.layers.0.mixer.in_proj" in summary.layers and "model.layers.0.mixer.out_proj" in summary.layers
    assert isinstance(model.model.layers[1].mixer.experts, MarlinExperts)
    assert isinstance(model.model.layers[1].mixer.gate, MarlinRouter)
    assert not model.model.layers[1].mixer.experts.shape.has_gate  # up_proj + relu2
    with torch.no_grad():
        got = model(ids).logits
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.02, rel


def test_bf16_router_with_saturated_softmax_is_converted():
    # bf16 logits of std 16: the softmax underflows to exactly 0 beyond the first pick, so the
    # second pick is a tie that torch.topk and moe_route may break differently; the probe must
    # accept ties (equal choice scores) and still reject a different routing. (Regression: the
    # probe compared logits, not probabilities, and kept every such router.)
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    from metal_marlin_torch.nn.router import router_for

    cfg = transformers.Qwen3MoeConfig(hidden_size=256, num_experts=E, num_experts_per_tok=2, norm_topk_prob=True)
    router = Qwen3MoeTopKRouter(cfg).to(torch.bfloat16)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=torch.Generator().manual_seed(0)))
    new, reason = router_for(router)
    assert isinstance(new, MarlinRouter), reason
    assert new.spec.mode == "softmax_topk" and new.spec.renormalize
