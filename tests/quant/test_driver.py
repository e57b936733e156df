"""The layer-by-layer driver on tiny models built from configs: stages, GPTQ end to end,
MR-GPTQ rotation, encoders, and resume after a simulated interruption."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metal_marlin_torch import QuantConfig, quantize_model
from metal_marlin_torch.nn import MarlinLinear, plan_layers
from metal_marlin_torch.quant.driver import DriverOptions, _stages, capture_inputs, find_blocks, quantize_layerwise
from metal_marlin_torch.quant.mr_gptq import quantize_linear


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    return BertModel(cfg).eval()


def tokens(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (n, length), generator=torch.Generator().manual_seed(seed))


def test_find_blocks_and_stages():
    model = tiny_llama()
    prefix, blocks = find_blocks(model)
    assert prefix == "model.layers" and len(blocks) == 2
    inputs = capture_inputs(model, blocks, tokens(2), 2, "cpu", "cpu")
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert _stages(blocks[0], names, inputs[0], "cpu") == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def output_error(model: nn.Module, ref: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(input_ids=ids).logits - ref).pow(2).mean())


def test_gptq_model_beats_rtn_and_converts_every_layer():
    ids = tokens(8, 32, seed=1)
    base = tiny_llama()
    with torch.no_grad():
        ref = base(input_ids=ids).logits
    errs = {}
    for method in ("rtn", "gptq", "mr-gptq"):
        model = tiny_llama()
        summary = quantize_model(model, QuantConfig(format="int3", group_size=32, method=method),
                                 calibration=ids, progress=False)
        assert len(summary.layers) == 14  # 7 per block, lm_head excluded
        errs[method] = output_error(model, ref, ids)
        blocks = {m.in_features: m.rotation_block for m in model.modules() if isinstance(m, MarlinLinear)}
        # default rotation block 128, cut to the largest power of two dividing K
        assert blocks == ({64: 64, 128: 128} if method == "mr-gptq" else {64: 0, 128: 0})
    assert errs["gptq"] < errs["rtn"], errs
    assert errs["mr-gptq"] < errs["rtn"], errs


def test_mr_gptq_layers_carry_their_rotation():
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="fp4", group_size=32, method="mr-gptq",
                                      method_options={"rotation_block": 32, "rotation_signs": True}),
                   calibration=tokens(4), progress=False)
    q = model.model.layers[0].self_attn.q_proj
    assert q.rotation_block == 32 and q.rotation_signs is not None and q.rotation_signs.shape == (64,)


def test_encoder_model():
    model = tiny_bert()
    ids = tokens(4, 16)
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    summary = quantize_model(model, QuantConfig(format="int4", group_size=32, method="gptq"),
                             calibration=ids, progress=False)
    assert "encoder.layer.0.attention.self.query" in summary.layers
    assert isinstance(model.pooler.dense, MarlinLinear)  # outside the blocks: round to nearest
    with torch.no_grad():
        out = model(input_ids=ids).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min()
    assert cos > 0.99


class Interrupt(Exception):
    pass


def test_resume_after_interruption_redoes_nothing_finished(tmp_path):
    ids = tokens(4, 32, seed=2)
    cfg = QuantConfig(format="int4", group_size=32, method="gptq")
    options = DriverOptions.from_options("gptq", {})

    # uninterrupted run, for comparison
    full = tiny_llama()
    plans, _ = plan_layers(full, cfg)
    quantize_layerwise(full, plans, ids, options, progress=False)

    calls: list[str] = []

    def interrupting(linear, plan, *args, **kwargs):
        calls.append(plan_name[id(linear)])
        if plan_name[id(linear)].startswith("model.layers.1."):
            raise Interrupt
        return quantize_linear(linear, plan, *args, **kwargs)

    first = tiny_llama()
    plan_name = {id(m): n for n, m in first.named_modules()}
    with pytest.raises(Interrupt):
        quantize_layerwise(first, plans, ids, options, work_dir=tmp_path, progress=False, layer_fn=interrupting)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block_00000.safetensors", "run.json"]  # no temp files

    calls.clear()
    second = tiny_llama()
    plan_name = {id(m): n for n, m in second.named_modules()}
    def counting(linear, *args, **kwargs):
        calls.append(plan_name[id(linear)])
        return quantize_linear(linear, *args, **kwargs)

    report = quantize_layerwise(second, plans, ids, options, work_dir=tmp_path, progress=False, layer_fn=counting)
    assert report["resumed_blocks"] == [0] and report["quantized_blocks"] == [1]
    assert calls and all(c.startswith("model.layers.1.") for c in calls)
    a, b = full.state_dict(), second.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_work_dir_with_other_settings_is_refused(tmp_path):
    ids = tokens(2, 16)
    model = tiny_llama()
    plans, _ = plan_layers(model, QuantConfig(format="int4", group_size=32))
    quantize_layerwise(model, plans, ids, DriverOptions(hessian=False), work_dir=tmp_path, progress=False)
    other = tiny_llama()
    plans3, _ = plan_layers(other, QuantConfig(format="int3", group_size=32))
    with pytest.raises(ValueError, match="other settings"):
        quantize_layerwise(other, plans3, ids, DriverOptions(hessian=False), work_dir=tmp_path, progress=False)


def test_unknown_method_option_is_an_error():
    with pytest.raises(ValueError, match="unknown keys"):
        DriverOptions.from_options("gptq", {"dampp": 0.1})


def test_rotated_checkpoint_round_trip(tmp_path):
    from metal_marlin_torch import load_quantized, save_quantized
    model = tiny_llama()
    quantize_model(model, QuantConfig(format="mxfp4", method="mr-gptq",
                                      method_options={"rotation_block": 32, "rotation_signs": True}),
                   calibration=tokens(4), progress=False)
    ids = tokens(2, 16, seed=5)
    save_quantized(model, tmp_path / "ckpt")
    loaded = load_quantized(tmp_path / "ckpt")
    q = loaded.model.layers[1].mlp.down_proj
    assert q.rotation_block == 32 and q.rotation_signs is not None
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_saved_block_reloads_with_its_bias_dtype(tmp_path):
    """A resumed block's layers equal the saved ones, float32 biases included (with bf16
    activations), as a layer quantized in this run would have them."""
    from metal_marlin_torch import DTypeConfig
    from metal_marlin_torch.quant.driver import load_block, save_block

    torch.manual_seed(0)
    dcfg = DTypeConfig(activations="bf16")
    block = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 16, bias=False))
    quantized = nn.Sequential(*[MarlinLinear.from_linear(m, "int4", 32, dcfg) for m in block])
    save_block(tmp_path / "b.safetensors", quantized)
    assert load_block(tmp_path / "b.safetensors", block, dcfg, "cpu") == ["0", "1"]
    assert block[0].bias.dtype == torch.float32 and block[1].bias is None
    for a, b in zip(quantized.state_dict().items(), block.state_dict().items(), strict=True):
        assert a[0] == b[0] and a[1].dtype == b[1].dtype and torch.equal(a[1], b[1]), a[0]


def test_shared_stage_hessian_equals_per_layer_full_passes():
    """The early-stopping, shared Hessian of a true-sequential stage is the one each of its
    layers would accumulate over full forward passes."""
    from metal_marlin_torch.quant.driver import _stage_hessians

    model = tiny_llama()
    _, blocks = find_blocks(model)
    inputs = capture_inputs(model, blocks, tokens(4), 2, "cpu", "cpu")
    for stage in (["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.gate_proj", "mlp.up_proj"],
                  ["mlp.down_proj"]):
        with torch.no_grad():
            shared = _stage_hessians(blocks[0], stage, inputs, "cpu", shared=True)
            full = _stage_hessians(blocks[0], stage, inputs, "cpu", shared=False)
        for name in stage:
            torch.testing.assert_close(shared[name], full[name], rtol=1e-6, atol=1e-7)


def test_half_precision_model_keeps_its_dtypes_on_cpu():
    """On a CPU a bf16 model's calibration runs in float32 (compute_dtype); afterwards every
    unquantized tensor and every layer bias has its bf16 dtype again, and the result is GPTQ's
    on the float32 copy of the same weights: exactly for the first stage (same inputs; the
    upcast is exact), and as accurately after it (the bf16 model hands its blocks bf16 rotary
    tables, so later Hessians differ a little and GPTQ's codes diverge)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model(dtype):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          attention_bias=True)
        m = LlamaForCausalLM(cfg).eval()
        return m.to(dtype) if dtype == torch.bfloat16 else m.to(torch.bfloat16).float()

    config = QuantConfig(format="int4", group_size=32, method="gptq")
    half, full = model(torch.bfloat16), model(torch.float32)
    ids = tokens(4, 32, seed=3)
    with torch.no_grad():
        ref = full(input_ids=ids).logits
    before = {n: p.dtype for n, p in half.named_parameters()}
    quantize_model(half, config, calibration=tokens(4))
    quantize_model(full, config, calibration=tokens(4))
    q = half.model.layers[0].self_attn.q_proj
    assert isinstance(q, MarlinLinear) and q.bias.dtype == torch.bfloat16
    assert half.model.layers[1].input_layernorm.weight.dtype == torch.bfloat16
    for name, p in half.named_parameters():
        if name in before and not name.endswith(("weight", "scales", "biases")) or "norm" in name:
            assert p.dtype == before[name], name
    first = "model.layers.0.self_attn.q_proj"
    assert torch.equal(half.get_submodule(first).weight, full.get_submodule(first).weight)
    err_half, err_full = output_error(half.float(), ref, ids), output_error(full, ref, ids)
    assert 0.8 < err_half / err_full < 1.25, (err_half, err_full)


def test_replayed_outputs_change_nothing_and_save_the_reruns():
    """Finished submodules' outputs are kept per batch and replayed in the block's later passes
    (_Replay): the quantized model is bitwise the one of recomputing everything, and each
    block's attention completes once (in gate/up's pass) instead of in up to 3 passes."""
    ids = tokens(6, 32, seed=2)
    results, attn_calls = {}, {}
    for mib in (0, 64):
        model = tiny_llama()
        calls = []
        for layer in model.model.layers:
            layer.self_attn.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        plans, _ = plan_layers(model, QuantConfig(format="fp4", group_size=32, method="gptq"))
        quantize_layerwise(model, plans, ids, DriverOptions(batch_size=2, replay_mib=mib), progress=False)
        attn_calls[mib] = len(calls) - 2  # completed forwards, minus each block's stage-grouping pass
        results[mib] = {k: v.clone() for k, v in model.state_dict().items()}
        assert not any("inner" in k for k in results[mib])  # the wrappers are gone
    assert results[0].keys() == results[64].keys()
    for key, value in results[0].items():
        assert torch.equal(value, results[64][key]), key
    batches = 3
    # (o_proj's pass stops inside the attention) block 0: gate/up, down and output passes;
    # block 1: no output pass
    assert attn_calls[0] == (3 + 2) * batches
    assert attn_calls[64] == (1 + 1) * batches
