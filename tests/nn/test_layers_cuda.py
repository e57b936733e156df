"""The decode stack of issues 21/22 on a GPU: a ``patch_layers`` model (norms, RoPE, attention,
MLP activations and residual norms on the marlin ops) and a quantized MoE model (``MarlinRouter``
+ ``MarlinExperts``) run ``generate()`` on CUDA and give the tokens the same model gives on CPU.

The oracle is the same quantized model on CPU running the pure-torch kernels (tested against
transformers' own modules in ``test_layers.py`` and ``test_moe_block.py``). Activations are
fp32 so the CUDA and CPU paths can be held to the same greedy tokens. Skipped without CUDA
("needs CUDA").
"""

from __future__ import annotations

import copy

import pytest
import torch

from metal_marlin_torch.nn import MarlinExperts, MarlinRouter, QuantConfig, patch_layers, quantize_model

from .test_layers import _tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KW = {"do_sample": False, "pad_token_id": 0}


def _same_on_cuda(model: torch.nn.Module, ids: torch.Tensor, new: int) -> None:
    with torch.no_grad():
        want_logits = model(ids).logits
        want = model.generate(ids, max_new_tokens=new, **KW)
        gpu = copy.deepcopy(model).to("cuda")
        got_logits = gpu(ids.cuda()).logits
        got = gpu.generate(ids.cuda(), max_new_tokens=new, **KW)
    assert got_logits.device.type == "cuda"
    torch.testing.assert_close(got_logits.cpu(), want_logits, rtol=1e-3, atol=1e-3)
    assert torch.equal(got.cpu(), want)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "mistral"])
def test_patched_model_generates_on_cuda(model_type):
    model = _tiny(model_type)
    counts = patch_layers(model)
    assert counts["attention"] == counts["rope"] == model.config.num_hidden_layers
    _same_on_cuda(model, torch.tensor([[3, 17, 40, 9, 77, 5, 60, 2]]), new=6)


def test_quantized_moe_model_generates_on_cuda():
    import transformers  # noqa: PLC0415

    cfg = transformers.Qwen3MoeConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                                      moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
                                      head_dim=16, max_position_embeddings=64, initializer_range=0.2,
                                      norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    quantize_model(model, QuantConfig(format="int8", group_size=32))
    assert any(isinstance(m, MarlinExperts) for m in model.modules())
    assert any(isinstance(m, MarlinRouter) for m in model.modules())
    _same_on_cuda(model, torch.tensor([[5, 11, 60, 2, 33]]), new=6)
