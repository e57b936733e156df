"""`MarlinExperts` against transformers' own experts modules, and MoE models end to end.

The reference for one experts module is the transformers module itself, run (eager) with its
3-D weights replaced by the dequantized ones: that isolates the quantized path (routing,
gather, gate, weighting) from quantization error. Whole tiny MoE models are then compared with
their dense logits.
"""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

from metal_marlin_torch import QuantConfig, load_quantized, quantize_model, save_quantized
from metal_marlin_torch.nn import MIXED_4_3_RULES, LayerPlan, MarlinExperts
from metal_marlin_torch.nn.experts import experts_shape


def tiny_qwen3_moe(hidden: int = 128) -> transformers.PreTrainedModel:
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=256, moe_intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
        architectures=["Qwen3MoeForCausalLM"],
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def tiny_mixtral() -> transformers.PreTrainedModel:
    cfg = transformers.MixtralConfig(
        vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=4,
        num_experts_per_tok=2, max_position_embeddings=64, architectures=["MixtralForCausalLM"],
    )
    torch.manual_seed(1)
    return transformers.MixtralForCausalLM(cfg).eval()


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if n.endswith(".experts")}


def routed_inputs(t: int, h: int, e: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.softmax(torch.randn(t, k, generator=g), dim=-1)
    return x, ids, weights


def with_dequantized_weights(experts: nn.Module, q: MarlinExperts) -> nn.Module:
    """A copy of the transformers module holding ``q``'s dequantized weights and its biases."""
    ref = copy.deepcopy(experts)
    with torch.no_grad():
        for proj in q.shape.projections():
            w = q.dequantized(proj)
            getattr(ref, proj).copy_(w.transpose(1, 2) if q.shape.is_transposed else w)
            if q.shape.has_bias:
                getattr(ref, f"{proj}_bias").copy_(getattr(q, f"{proj}_bias"))
    return ref


def gpt_oss_experts() -> nn.Module:
    cfg = transformers.GptOssConfig(
        num_local_experts=4, hidden_size=64, intermediate_size=64, num_experts_per_tok=2,
        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=32, vocab_size=64,
    )
    experts = transformers.models.gpt_oss.modeling_gpt_oss.GptOssExperts(cfg)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return experts


@pytest.mark.parametrize(
    "source,fmt,group",  # each source once; formats: codebook, affine (biases), per-expert global scale
    [("qwen3_moe", "fp4", 32), ("mixtral", "int4", 64), ("gpt_oss", "nvfp4", 16), ("qwen3_moe", "int8", -1)],
)
def test_module_matches_transformers_forward_on_dequantized_weights(source, fmt, group):
    if source == "gpt_oss":  # transposed [E, K, N] weights, biases, interleaved clamped gate
        experts = gpt_oss_experts()
    else:
        model = tiny_qwen3_moe() if source == "qwen3_moe" else tiny_mixtral()
        experts = next(iter(experts_modules(model).values()))
        with torch.no_grad():
            for p in experts.parameters():
                p.copy_(torch.randn_like(p) * 0.05)
    shape = experts_shape(experts)
    plans = {p: LayerPlan(fmt, group) for p in shape.projections()}
    q = MarlinExperts.from_experts(experts, plans)
    ref = with_dequantized_weights(experts, q)
    x, ids, weights = routed_inputs(11, shape.hidden_dim, shape.num_experts, 2)
    with torch.no_grad():
        torch.testing.assert_close(q(x, ids, weights), ref(x, ids, weights), atol=2e-5, rtol=2e-5)
        # and the quantization error itself is that of the format (sanity, not exactness)
        dense = experts(x, ids, weights)
        rel = ((q(x, ids, weights) - dense).norm() / dense.norm()).item()
    assert rel < 0.2


def test_sentinel_expert_id_contributes_nothing():
    # transformers' expert parallelism marks foreign slots with id == num_experts
    experts = next(iter(experts_modules(tiny_qwen3_moe()).values()))
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    q = MarlinExperts.from_experts(experts, {p: LayerPlan("int8", 32) for p in experts_shape(experts).projections()})
    x, ids, weights = routed_inputs(5, 128, 4, 2)
    masked = ids.clone()
    masked[:, 1] = 4
    with torch.no_grad():
        expected = q(x, ids[:, :1], weights[:, :1])
        torch.testing.assert_close(q(x, masked, weights), expected, atol=1e-6, rtol=1e-6)


def count_bytes(module: nn.Module, dtype: torch.dtype | None = None) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors if dtype is None or t.dtype == dtype)


@pytest.mark.parametrize("build", [tiny_qwen3_moe, tiny_mixtral], ids=["qwen3_moe", "mixtral"])
def test_quantize_model_converts_experts_by_default(build):
    model = build().to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dense = model(ids).logits.float()
    experts_before = {n: count_bytes(m) for n, m in experts_modules(model).items()}
    summary = quantize_model(model, QuantConfig(format="int8", group_size=32))
    converted = experts_modules(model)
    assert converted and all(isinstance(m, MarlinExperts) for m in converted.values())
    for name, module in converted.items():
        assert name in summary.layers
        assert count_bytes(module, torch.bfloat16) == 0  # no bf16 expert weight left
        # int8 codes + fp16 scale and bias per 32 weights: 10 bytes per 8 weights, against 16 in bf16
        assert count_bytes(module) < 0.66 * experts_before[name]
    with torch.no_grad():
        out = model(ids).logits.float()
    rel = ((out - dense).norm() / dense.norm()).item()
    assert rel < 0.05, rel


def test_experts_option_false_leaves_them_dense():
    model = tiny_qwen3_moe()
    classes = {n: type(m) for n, m in experts_modules(model).items()}
    summary = quantize_model(model, QuantConfig(format="fp4", group_size=32, experts=False))
    assert {n: type(m) for n, m in experts_modules(model).items()} == classes
    assert not any(n in summary.layers for n in classes)
    assert "model.layers.0.self_attn.q_proj" in summary.layers


def test_rules_apply_to_expert_projections():
    model = tiny_qwen3_moe()
    quantize_model(model, QuantConfig(format="fp4", group_size=32, rules=MIXED_4_3_RULES))
    experts = model.model.layers[0].mlp.experts
    assert experts.plans["gate_up_proj"] == LayerPlan("nf3", 32)  # "*.mlp.*"
    assert experts.plans["down_proj"] == LayerPlan("fp4", 32)  # "*.down_proj" wins (first match)


def test_group_that_does_not_divide_is_skipped_with_reason():
    model = tiny_qwen3_moe(hidden=96)  # gate_up_proj has K = 96, not a multiple of 64
    summary = quantize_model(model, QuantConfig(format="fp4", group_size=64))
    assert "model.layers.0.mlp.experts" in summary.skipped
    assert "96" in summary.skipped["model.layers.0.mlp.experts"]
    assert not isinstance(model.model.layers[0].mlp.experts, MarlinExperts)


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = tiny_mixtral()
    quantize_model(model, QuantConfig(format="nvfp4"))
    ids = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    save_quantized(model, tmp_path)
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.model.layers[1].mlp.experts, MarlinExperts)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_compiles_fullgraph():
    experts = next(iter(experts_modules(tiny_qwen3_moe()).values()))
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    q = MarlinExperts.from_experts(experts, {p: LayerPlan("fp4", 32) for p in experts_shape(experts).projections()})
    x, ids, weights = routed_inputs(6, 128, 4, 2)
    compiled = torch.compile(q, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, ids, weights), q(x, ids, weights))


def test_bad_input():
    experts = next(iter(experts_modules(tiny_qwen3_moe()).values()))
    with pytest.raises(ValueError, match="plans lack projections"):
        MarlinExperts.from_experts(experts, {"gate_up_proj": LayerPlan("fp4", 32)})
    with pytest.raises(TypeError, match="not a fused experts module"):
        MarlinExperts.from_experts(nn.Linear(4, 4), {})


def test_input_gradient_matches_transformers_on_dequantized_weights():
    # is_trainable: adapters upstream of the experts need d(out)/d(hidden_states)
    experts = next(iter(experts_modules(tiny_mixtral()).values()))
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn_like(p) * 0.05)
    q = MarlinExperts.from_experts(experts, {p: LayerPlan("int4", 32) for p in experts_shape(experts).projections()})
    ref = with_dequantized_weights(experts, q)
    x, ids, weights = routed_inputs(7, 128, 4, 2)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    go = torch.randn(7, 128)
    q(x1, ids, weights).backward(go)
    ref(x2, ids, weights).backward(go)
    torch.testing.assert_close(x1.grad, x2.grad, atol=2e-5, rtol=2e-5)


def test_checkpoint_with_wrong_expert_tensor_is_rejected_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_qwen3_moe()
    quantize_model(model, QuantConfig(format="int4", group_size=64))
    save_quantized(model, tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.1.mlp.experts.down_proj_scales"
    tensors[key] = tensors[key][:, :, :1].contiguous()  # one group per row instead of two
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=key):
        load_quantized(tmp_path)
