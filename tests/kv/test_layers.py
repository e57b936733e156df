"""Quantized KV caches in transformers: generate() with pylm-s, quality against the plain cache,
decode == prefill, static (compile-friendly) == dynamic, DTypeConfig selection."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from metal_marlin_torch import DTypeConfig
from metal_marlin_torch.kv import (
    CastStore,
    FP8Store,
    QuantizedKVLayer,
    StaticQuantizedKVLayer,
    TurboQuantStore,
    make_cache,
)

CASES = [("fp8", 4), ("turboquant", 4), ("turboquant", 5), ("turboquant", 6), ("turboquant", 8), ("bf16", 4)]


@pytest.fixture(scope="module")
def model(pylm_s_path):
    return AutoModelForCausalLM.from_pretrained(pylm_s_path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokens(pylm_s_path) -> torch.Tensor:
    """96 tokens of held-out standard-library source (pylm_eval_files.txt)."""
    from transformers import AutoTokenizer

    names = (pylm_s_path.parent / "pylm_eval_files.txt").read_text().split()
    text = (Path(sysconfig.get_paths()["stdlib"]) / names[0]).read_text()
    ids = AutoTokenizer.from_pretrained(pylm_s_path)(text, return_tensors="pt").input_ids
    return ids[:, :96]


def logits(model, ids, cache):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits.float()


@pytest.mark.parametrize("method,bits", CASES)
def test_generate_with_each_cache(model, tokens, method, bits):
    cache = make_cache(model.config, method=method, bits=bits)
    prompt = tokens[:, :16]
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=4, do_sample=False,
                         attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert out.shape == (1, 20)
    assert cache.get_seq_length() == 19  # the last generated token is never fed back
    per_pos = {"fp8": FP8Store.bytes_per_position(64), "bf16": CastStore.bytes_per_position(64),
               "turboquant": TurboQuantStore.bytes_per_position(64, bits=bits)}[method]
    layers, rows, capacity = model.config.num_hidden_layers, model.config.num_key_value_heads, 256
    assert cache.nbytes() == 2 * layers * rows * capacity * per_pos


def test_bf16_storage_matches_the_dynamic_cache_of_a_bf16_model(pylm_s_path, tokens):
    m = AutoModelForCausalLM.from_pretrained(pylm_s_path, dtype=torch.bfloat16).eval()
    ids = tokens[:, :48]
    ours = logits(m, ids, make_cache(m.config, DTypeConfig(kv_cache="bf16")))
    ref = logits(m, ids, DynamicCache())
    assert torch.equal(ours, ref)


def kl(ref_logits: torch.Tensor, logits_: torch.Tensor) -> float:
    p = torch.log_softmax(ref_logits.double(), -1)
    q = torch.log_softmax(logits_.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_quality_follows_the_bit_width(model, tokens):
    ref = logits(model, tokens, DynamicCache())
    kls = {(m, b): kl(ref, logits(model, tokens, make_cache(model.config, method=m, bits=b))) for m, b in CASES}
    assert kls[("bf16", 4)] < 1e-3
    assert kls[("fp8", 4)] < 0.02
    assert kls[("turboquant", 8)] < kls[("turboquant", 6)] < kls[("turboquant", 5)] < kls[("turboquant", 4)]
    assert kls[("turboquant", 8)] < 0.01 and kls[("turboquant", 4)] < 0.3


@pytest.mark.parametrize("method,bits", [("turboquant", 4), ("fp8", 4)])
def test_token_by_token_decode_equals_one_shot_prefill(model, tokens, method, bits):
    ids = tokens[:, :24]
    full = logits(model, ids, make_cache(model.config, method=method, bits=bits))
    cache = make_cache(model.config, method=method, bits=bits)
    step = [logits(model, ids[:, :16], cache)]
    for t in range(16, 24):
        step.append(logits(model, ids[:, t:t + 1], cache))
    torch.testing.assert_close(torch.cat(step, dim=1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,bits", [("turboquant", 4), ("turboquant", 8), ("fp8", 4)])
def test_static_cache_equals_dynamic_cache(model, tokens, method, bits):
    ids = tokens[:, :20]
    dyn = make_cache(model.config, method=method, bits=bits)
    sta = make_cache(model.config, method=method, bits=bits, max_cache_len=32)
    assert all(isinstance(layer, StaticQuantizedKVLayer) for layer in sta.layers) and sta.is_compileable
    positions = torch.arange(20).unsqueeze(0)
    with torch.no_grad():
        a = model(ids[:, :16], past_key_values=dyn, position_ids=positions[:, :16]).logits
        b = model(ids[:, :16], past_key_values=sta, position_ids=positions[:, :16]).logits
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
        for t in range(16, 20):
            a = model(ids[:, t:t + 1], past_key_values=dyn, position_ids=positions[:, t:t + 1]).logits
            b = model(ids[:, t:t + 1], past_key_values=sta, position_ids=positions[:, t:t + 1]).logits
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    assert int(sta.get_seq_length()) == 20 == dyn.get_seq_length()


@pytest.mark.parametrize("store_cls,options", [(TurboQuantStore, {"bits": 4}), (FP8Store, {})])
def test_static_layer_update_compiles_without_graph_breaks(store_cls, options):
    torch._dynamo.reset()
    eager = StaticQuantizedKVLayer(8, store_cls, **options)
    compiled_layer = StaticQuantizedKVLayer(8, store_cls, **options)
    k0, v0 = torch.randn(2, 2, 3, 64), torch.randn(2, 2, 3, 64)
    for layer in (eager, compiled_layer):
        layer.update(k0, v0)  # prefill, eager: allocates the buffers
    step = torch.compile(compiled_layer.update, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        k, v = torch.randn(2, 2, 1, 64), torch.randn(2, 2, 1, 64)
        want = eager.update(k, v)
        got = step(k, v)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
    assert int(compiled_layer.get_seq_length()) == 5


def test_dtype_config_selects_the_storage(model):
    fp8 = make_cache(model.config, DTypeConfig(kv_cache="fp8"))
    assert all(isinstance(layer, QuantizedKVLayer) and layer.store_cls is FP8Store for layer in fp8.layers)
    fp16 = make_cache(model.config, DTypeConfig(kv_cache="fp16"))
    assert fp16.layers[0].store_options == {"dtype": torch.float16}
    tq = make_cache(model.config, DTypeConfig(kv_cache="fp8"), method="turboquant", bits=6)
    assert tq.layers[0].store_cls is TurboQuantStore and tq.layers[0].store_options == {"bits": 6}
    with pytest.raises(ValueError, match="method must be one of"):
        make_cache(model.config, method="int4")
    with pytest.raises(ValueError, match=r"bits must be one of \(4, 5, 6, 8\)"):
        make_cache(model.config, method="turboquant", bits=3)


def test_sliding_window_configs_are_rejected():
    from transformers import MistralConfig

    config = MistralConfig(num_hidden_layers=2, sliding_window=16, layer_types=["sliding_attention"] * 2)
    with pytest.raises(ValueError, match="only full-attention layers"):
        make_cache(config, method="fp8")


def test_beam_search_and_crop(model, tokens):
    cache = make_cache(model.config, method="turboquant", bits=4)
    prompt = tokens[:, :12]
    out = model.generate(prompt, past_key_values=cache, max_new_tokens=3, num_beams=2, do_sample=False,
                         attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert out.shape[-1] == 15
    # crop forgets the last positions; the next update overwrites them
    c2 = make_cache(model.config, method="fp8")
    a = logits(model, tokens[:, :10], c2)
    c2.crop(-4)
    assert c2.get_seq_length() == 6
    b = logits(model, tokens[:, 6:10], c2)
    torch.testing.assert_close(b, a[:, 6:10], rtol=1e-4, atol=1e-4)


def test_fused_decode_runs_kv_attention_on_the_codes(model, tokens):
    from metal_marlin_torch.ops import override
    from metal_marlin_torch.ops.kv import kv_attention as torch_kv_attention

    ids = tokens[:, :24]
    ref = make_cache(model.config, method="turboquant", bits=4)
    want = [logits(model, ids[:, :16], ref)] + [logits(model, ids[:, t:t + 1], ref) for t in range(16, 24)]
    calls = []

    def counting(*args):
        calls.append(args[6])  # the attended length
        return torch_kv_attention(*args)

    previous = model.config._attn_implementation
    model.set_attn_implementation("marlin_kv")
    try:
        fused = make_cache(model.config, method="turboquant", bits=4, fused=True)
        with override({"kv_attention": counting}, "cpu", "probe"):
            got = [logits(model, ids[:, :16], fused)] + [logits(model, ids[:, t:t + 1], fused) for t in range(16, 24)]
    finally:
        model.set_attn_implementation(previous)
    # prefill goes through sdpa on the dequantized cache, each decode step through kv_attention
    assert calls == [n for n in range(17, 25) for _ in range(model.config.num_hidden_layers)]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_fused_cache_needs_the_marlin_kv_attention(model, tokens):
    fused = make_cache(model.config, method="turboquant", bits=4, fused=True)
    with pytest.raises(ValueError, match="attn_implementation to be 'marlin_kv'"):
        logits(model, tokens[:, :8], fused)
    with pytest.raises(ValueError, match="fused=True needs method='turboquant'"):
        make_cache(model.config, method="fp8", fused=True)


def test_static_cache_decode_step_compiles_once_with_fullgraph(model, tokens):
    # the preallocated layers in a whole compiled model: one graph, no breaks, no recompiles
    ids = tokens[:, :20]
    compiled_cache = make_cache(model.config, method="turboquant", bits=4, max_cache_len=32)
    eager_cache = make_cache(model.config, method="turboquant", bits=4, max_cache_len=32)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    step = torch.compile(model.forward, fullgraph=True, backend=backend, dynamic=False)
    with torch.no_grad():
        for cache in (compiled_cache, eager_cache):
            model(ids[:, :16], past_key_values=cache, position_ids=torch.arange(16)[None])
        for t in range(16, 19):
            pos = torch.tensor([[t]])
            got = step(input_ids=ids[:, t:t + 1], past_key_values=compiled_cache, position_ids=pos).logits
            want = model(input_ids=ids[:, t:t + 1], past_key_values=eager_cache, position_ids=pos).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert len(graphs) == 1
