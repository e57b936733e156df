"""LoRA through peft on quantized mixture-of-experts projections (metal_marlin_torch.nn.lora_experts).

A tiny random Qwen3-MoE, its experts quantized to int4 (MarlinExperts), gets adapters with plain
``get_peft_model(model, LoraConfig(target_modules=["experts"]))``. References: the experts'
output computed token by token from the dequantized weights plus ``scaling * B A`` (no routing
code shared), and for merging the adapter model itself.
"""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is a test extra (pip install -e .[test])")
transformers = pytest.importorskip("transformers")

from metal_marlin_torch import QuantConfig, quantize_model  # noqa: E402
from metal_marlin_torch.nn.experts import MarlinExperts  # noqa: E402
from metal_marlin_torch.nn.lora import merge_and_unload  # noqa: E402
from metal_marlin_torch.nn.lora_experts import MarlinLoraExperts  # noqa: E402


def quantized_moe() -> torch.nn.Module:
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    quantize_model(model, QuantConfig(format="int4", group_size=32))
    assert sum(isinstance(m, MarlinExperts) for m in model.modules()) == 2
    return model


def tokens(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(seed))


def test_experts_lora_output_equals_a_token_by_token_reference():
    model = peft.get_peft_model(quantized_moe(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["experts"],
                                                                 init_lora_weights=False))
    wrappers = [m for m in model.modules() if isinstance(m, MarlinLoraExperts)]
    assert len(wrappers) == 2
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora = wrappers[0]
    base = lora.get_base_layer()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 64, generator=gen)
    ids = torch.tensor([[0, 1], [2, 3], [3, 0], [1, 1], [2, 0]])
    wts = torch.rand(5, 2, generator=gen)
    got = lora(x, ids, wts)
    w = {p: base.dequantized(p) + lora.get_delta_weight("default", p) for p in ("gate_up_proj", "down_proj")}
    ref = torch.zeros(5, 64)
    for t in range(5):
        for j in range(2):
            e = int(ids[t, j])
            gate, up = (w["gate_up_proj"][e] @ x[t]).chunk(2)
            ref[t] += wts[t, j] * (w["down_proj"][e] @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert "project" not in vars(base)  # the per-call override is gone again
    assert not torch.allclose(base(x, ids, wts), ref, atol=1e-3)  # the update is not negligible


def test_experts_lora_trains_merges_and_round_trips(tmp_path):
    ids = tokens()
    torch.manual_seed(0)
    model = peft.get_peft_model(quantized_moe(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["experts"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    assert losses[-1] < losses[0] - 0.05, losses
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits

    model.save_pretrained(tmp_path)  # peft's own files
    assert (tmp_path / "adapter_model.safetensors").is_file()
    again = peft.PeftModel.from_pretrained(quantized_moe(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, adapted, rtol=1e-5, atol=1e-5)

    merged, report = merge_and_unload(model)
    assert not any(isinstance(m, MarlinLoraExperts) for m in merged.modules())
    assert sum(isinstance(m, MarlinExperts) for m in merged.modules()) == 2
    assert sorted(report) == sorted(f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1)
                                    for p in ("gate_up_proj", "down_proj"))
    for err in report.values():
        assert err.delta_norm > 0 and 0 < err.relative < 0.2, err
    with torch.no_grad():
        out = merged(input_ids=ids).logits
    # the merged (requantized) model sits near the adapter model: much closer than the model
    # without the adapter is
    assert (out - adapted).norm() < 0.5 * (plain - adapted).norm()
