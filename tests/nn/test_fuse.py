"""fuse_projections (nn/fuse.py): q/k/v and gate/up of a quantized tiny Llama / Qwen3 as one
MarlinLinear each, against the same quantized model unfused (logits, greedy tokens, state_dict,
load_state_dict, unfuse), on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

from metal_marlin_torch.nn import (
    MarlinGatedMLP,
    MarlinLinear,
    OutputSlice,
    QuantConfig,
    concat_layers,
    fuse_projections,
    patch_layers,
    quantize_model,
    unfuse_projections,
)


def _tiny(model_type: str = "llama", fmt: str = "int4", bias: bool = False):
    import transformers  # noqa: PLC0415

    common = {"vocab_size": 97, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
              "initializer_range": 0.2, "tie_word_embeddings": False}
    extra = {"llama": {"attention_bias": bias, "mlp_bias": bias}, "qwen3": {"head_dim": 16}}[model_type]
    config = transformers.AutoConfig.for_model(model_type, **common, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if bias:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.5)
    quantize_model(model, QuantConfig(format=fmt, group_size=32))
    return model


IDS = torch.tensor([[3, 17, 40, 9, 77, 5]])
GEN = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}


@pytest.mark.parametrize(("model_type", "fmt", "bias"), [("llama", "int4", False), ("llama", "nf4", True),
                                                          ("qwen3", "fp4", False)])
def test_fused_model_computes_the_same_function(model_type, fmt, bias):
    base = _tiny(model_type, fmt, bias)
    fused = copy.deepcopy(base)
    counts = fuse_projections(fused)
    n = base.config.num_hidden_layers
    assert counts == {"qkv_proj": n, "gate_up_proj": n, "skipped": 0}
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert isinstance(attn.qkv_proj, MarlinLinear) and isinstance(attn.k_proj, OutputSlice)
    assert attn.qkv_proj.out_features == sum(getattr(base.model.layers[0].self_attn, p).out_features
                                             for p in ("q_proj", "k_proj", "v_proj"))
    assert isinstance(mlp.gate_up_proj, MarlinLinear) and isinstance(mlp.up_proj, OutputSlice)
    assert isinstance(attn, type(base.model.layers[0].self_attn))  # a subclass of its own class
    with torch.no_grad():
        # the same rows of the same codes against the same input: the same sums
        torch.testing.assert_close(fused(IDS).logits, base(IDS).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(fused.generate(IDS, **GEN), base.generate(IDS, **GEN))
    # the fused layer holds the three weights, bit-exact, in output order
    fw = attn.qkv_proj.dequantized_weight()
    parts = [getattr(base.model.layers[0].self_attn, p).dequantized_weight() for p in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(fw, torch.cat(parts))


def test_state_dict_keeps_the_original_keys_and_loads_back():
    base = _tiny("llama", "int4", bias=True)
    fused = copy.deepcopy(base)
    fuse_projections(fused)
    want = base.state_dict()
    got = fused.state_dict()
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
    # a fresh fused model loads the unfused checkpoint (its keys), then computes base's logits
    other = _tiny("llama", "int4", bias=True)
    with torch.no_grad():
        for m in other.modules():
            if isinstance(m, MarlinLinear):
                m.scales.mul_(0.5)  # different weights before loading
    fuse_projections(other)
    other.load_state_dict(want)
    with torch.no_grad():
        torch.testing.assert_close(other(IDS).logits, base(IDS).logits, rtol=1e-5, atol=1e-5)


def test_unfuse_restores_the_module_tree():
    base = _tiny("llama", "int4")
    model = copy.deepcopy(base)
    fuse_projections(model)
    assert unfuse_projections(model) == 2 * base.config.num_hidden_layers
    for (name, a), (_, b) in zip(model.named_modules(), base.named_modules(), strict=True):
        assert type(a) is type(b), name
    assert not hasattr(model.model.layers[0].self_attn, "qkv_proj")
    for k, v in base.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, base(IDS).logits, rtol=1e-5, atol=1e-5)


def test_layers_that_differ_are_left_alone():
    base = _tiny("llama", "int4")
    attn = base.model.layers[0].self_attn
    lin = torch.nn.Linear(attn.k_proj.in_features, attn.k_proj.out_features, bias=False)
    attn.k_proj = MarlinLinear.from_linear(lin, "fp4", 32)  # another format in one group
    counts = fuse_projections(base)
    assert counts == {"qkv_proj": 1, "gate_up_proj": 2, "skipped": 1}
    assert isinstance(attn.q_proj, MarlinLinear) and not hasattr(attn, "qkv_proj")
    with pytest.raises(ValueError, match="format, group size"):
        concat_layers([attn.q_proj, attn.k_proj])


def test_after_patch_layers_and_wrong_order_is_refused():
    base = _tiny("llama", "int4")
    patched = copy.deepcopy(base)
    patch_layers(patched, attention=False, rope=False, residual_norm=False)
    assert isinstance(patched.model.layers[0].mlp, MarlinGatedMLP)
    fuse_projections(patched)
    assert isinstance(patched.model.layers[0].mlp.gate_up_proj, MarlinLinear)
    with torch.no_grad():
        torch.testing.assert_close(patched(IDS).logits, base(IDS).logits, rtol=1e-4, atol=1e-4)
    # a slice called with the layer's input instead of the fused output says why
    x = torch.randn(1, 2, base.config.hidden_size)
    with pytest.raises(ValueError, match="expected the fused layer's output"):
        patched.model.layers[0].mlp.up_proj(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["int4", "nf4"])
def test_fused_model_on_cuda_eager_and_compiled(fmt):
    # the CUDA kernels' layout (concatenated K-major blocks), the eager recorded launches and
    # torch.compile (reduce-overhead) of the fused parent's forward
    from metal_marlin_torch.ops import cuda as C  # noqa: PLC0415

    C.register()
    base = _tiny("llama", fmt, bias=True).cuda()
    fused = copy.deepcopy(base)
    fuse_projections(fused)
    assert fused.model.layers[0].self_attn.qkv_proj.kernel_layout
    ids = IDS.cuda()
    with torch.no_grad():
        want = base(ids, use_cache=False).logits
        torch.testing.assert_close(fused(ids).logits, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(fused(ids[:, :1]).logits, base(ids[:, :1]).logits, rtol=1e-4, atol=1e-4)
        step = torch.compile(fused, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):
            got = step(ids, use_cache=False).logits.clone()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


def test_save_quantized_of_a_fused_model_loads_unfused(tmp_path):
    # the checkpoint lists q_proj / k_proj / ... (not qkv_proj), as the state_dict's keys do
    from metal_marlin_torch import load_quantized, save_quantized  # noqa: PLC0415

    base = _tiny("llama", "int4", bias=True)
    fused = copy.deepcopy(base)
    fuse_projections(fused)
    save_quantized(fused, tmp_path)
    loaded = load_quantized(tmp_path)
    assert isinstance(loaded.model.layers[1].self_attn.v_proj, MarlinLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, base(IDS).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_model_in_hf_compiled_generate():
    # HF generate()'s automatic compile (static cache, reduce-overhead) runs the fused parents'
    # forwards; its greedy tokens match eager generate of the unfused model
    from metal_marlin_torch.ops import cuda as C  # noqa: PLC0415
    from tests.conftest import tiny_llama  # noqa: PLC0415

    C.register()
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = tiny_llama(vocab=256, hidden=256, layers=2, intermediate=512).to(torch.bfloat16)
    quantize_model(model, QuantConfig(format="int4", group_size=128))
    model = model.cuda()
    ids = torch.randint(0, 256, (1, 8), device="cuda")
    kw = dict(max_new_tokens=12, do_sample=False, cache_implementation="static", pad_token_id=0)
    eager = model.generate(ids, disable_compile=True, **kw)
    assert fuse_projections(model)["qkv_proj"] == 2
    assert torch.equal(model.generate(ids, disable_compile=True, **kw), eager)
    model.generate(ids, **kw)
    compiled = model.generate(ids, **kw)  # the compiled step replayed
    assert (compiled == eager).float().mean().item() > 0.9, (compiled, eager)
    torch._dynamo.reset()


def test_unknown_parent_classes_are_not_fused():
    # a parent whose forward might use its input otherwise is left alone (FUSABLE_PARENTS)
    class Block(torch.nn.Module):
        def __init__(self, layers):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = layers

        def forward(self, x):
            return self.q_proj(x) + x.sum()  # uses x beyond the projections

    base = _tiny("llama", "int4")
    attn = base.model.layers[0].self_attn
    block = Block([attn.q_proj, attn.k_proj, attn.v_proj])
    assert fuse_projections(block) == {"qkv_proj": 0, "gate_up_proj": 0, "skipped": 1}
    assert isinstance(block.q_proj, MarlinLinear)
