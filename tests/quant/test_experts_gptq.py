"""GPTQ for fused experts: per-expert Hessians from the routed calibration tokens (quant/experts.py).

The tiny Qwen3-MoE has low-rank token embeddings, so the hidden states (and each expert's
routed rows) are strongly correlated: the regime where GPTQ's error compensation pays and RTN
does not. Only the experts are quantized (``include``), so the logits' error is theirs.
"""

from __future__ import annotations

import copy

import torch
import transformers

from metal_marlin_torch import QuantConfig, quantize_model
from metal_marlin_torch.nn import MarlinExperts, MarlinLinear

N_TOK, LEN, TOP_K = 8, 32, 2


def tiny_moe() -> transformers.PreTrainedModel:
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=TOP_K,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        low_rank = torch.randn(96, 6, generator=g) @ torch.randn(6, 64, generator=g)
        emb.copy_(low_rank + 0.05 * torch.randn(96, 64, generator=g))
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(generator=g)
            layer.mlp.experts.gate_up_proj.normal_(std=0.1, generator=g)
            layer.mlp.experts.down_proj.normal_(std=0.1, generator=g)
    return model


def calib() -> torch.Tensor:
    return torch.randint(0, 96, (N_TOK, LEN), generator=torch.Generator().manual_seed(2))


def config(method: str, **opts) -> QuantConfig:
    return QuantConfig(format="int4", group_size=32, method=method, include=("*.experts",),
                       method_options={"n_samples": N_TOK, "seq_len": LEN, **opts})


def logits_error(model, ref, ids) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits - ref).pow(2).mean())


def test_gptq_experts_beat_rtn_and_count_routed_tokens(tmp_path):
    dense = tiny_moe()
    ids = calib()
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
    errs, summaries = {}, {}
    for method in ("rtn", "gptq", "mr-gptq"):
        model = copy.deepcopy(dense)
        summaries[method] = quantize_model(model, config(method), calibration=ids, progress=False)
        assert all(isinstance(layer.mlp.experts, MarlinExperts) for layer in model.model.layers)
        assert not any(isinstance(m, MarlinLinear) for m in model.modules())  # experts only
        errs[method] = logits_error(model, ref, ids)
    assert errs["gptq"] < 0.7 * errs["rtn"], errs
    assert errs["mr-gptq"] < 0.7 * errs["rtn"], errs
    experts = summaries["gptq"].method_report["experts"]
    assert sorted(experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for rep in experts.values():
        # every calibration token reaches TOP_K distinct experts
        assert sum(rep["tokens"]) == N_TOK * LEN * TOP_K and len(rep["tokens"]) == 8
        low = {e: n for e, n in enumerate(rep["tokens"]) if n < 32}  # DEFAULT_MIN_TOKENS
        assert rep["rtn"] == {"gate_up_proj": low, "down_proj": low}
    assert "no input rotation" in summaries["mr-gptq"].method_report["experts"]["model.layers.0.mlp.experts"]["note"]


def test_expert_with_too_few_tokens_falls_back_to_rtn_and_is_reported():
    dense = tiny_moe()
    ids = calib()
    model = copy.deepcopy(dense)
    # 8 experts share 8 * 32 * 2 = 512 routed rows (64 on average): a threshold of 64 leaves
    # some experts below it and some above
    summary = quantize_model(model, config("gptq", expert_min_tokens=64), calibration=ids, progress=False)
    rep = summary.method_report["experts"]["model.layers.0.mlp.experts"]
    low = {e: n for e, n in enumerate(rep["tokens"]) if n < 64}
    assert 0 < len(low) < 8, rep["tokens"]
    assert rep["rtn"]["gate_up_proj"] == low and rep["rtn"]["down_proj"] == low
    # the fallback experts are exactly RTN: equal to MarlinExperts.from_experts on those experts
    rtn = MarlinExperts.from_experts(dense.model.layers[0].mlp.experts, model.model.layers[0].mlp.experts.plans)
    q = model.model.layers[0].mlp.experts
    for proj in ("gate_up_proj", "down_proj"):
        for e in range(8):
            assert torch.equal(getattr(q, proj)[e], getattr(rtn, proj)[e]) == (e in low), (proj, e)


def test_resume_loads_finished_blocks_with_their_experts(tmp_path):
    dense = tiny_moe()
    ids = calib()
    first = copy.deepcopy(dense)
    s1 = quantize_model(first, config("gptq"), calibration=ids, progress=False, work_dir=tmp_path)
    assert s1.method_report["quantized_blocks"] == [0, 1]
    second = copy.deepcopy(dense)
    s2 = quantize_model(second, config("gptq"), calibration=ids, progress=False, work_dir=tmp_path)
    assert s2.method_report["resumed_blocks"] == [0, 1] and s2.method_report["quantized_blocks"] == []
    for a, b in zip(first.model.layers, second.model.layers, strict=True):
        assert isinstance(b.mlp.experts, MarlinExperts)
        for key, t in a.mlp.experts.state_dict().items():
            assert torch.equal(t, b.mlp.experts.state_dict()[key]), key
    with torch.no_grad():
        torch.testing.assert_close(second(input_ids=ids).logits, first(input_ids=ids).logits)
