"""patch_layers (nn/layers.py): a quantized Llama whose norms, MLP activations and attention run
on the marlin ops generates the greedy tokens of the same quantized model unpatched, on the
pure-torch kernels and under emulator.use() (the emulated Metal kernels)."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from metal_marlin_torch import emulator
from metal_marlin_torch.nn import MarlinGatedMLP, MarlinRMSNorm, QuantConfig, patch_layers, quantize_model

MODEL = "/work/shared/models/pylm-s"
pytestmark = pytest.mark.skipif(not os.path.isdir(MODEL), reason=f"test model {MODEL} not present")


@pytest.fixture(scope="module")
def quantized():
    import transformers  # noqa: PLC0415

    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    quantize_model(model, QuantConfig(format="int4", group_size=64))
    return model


def test_patched_quantized_llama_generates_the_same_tokens(quantized):
    patched = copy.deepcopy(quantized)
    counts = patch_layers(patched)
    n = patched.config.num_hidden_layers
    assert counts == {"norms": 2 * n + 1, "mlp": n, "attention": n}
    assert isinstance(patched.model.norm, MarlinRMSNorm) and isinstance(patched.model.layers[0].mlp, MarlinGatedMLP)
    ids = torch.tensor([[0, 17, 400, 9]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = quantized.generate(ids, **kw)
        torch.testing.assert_close(patched(ids).logits, quantized(ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(patched.generate(ids, **kw), want)
        if emulator.available():
            with emulator.use() as session:
                # one step (the prefill): every op of every layer runs emulated; the emulated
                # attention's decode steps are tested in tests/ops/test_attention.py
                got = patched.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
            assert {"rms_norm", "silu_mul", "attention", "gemm"} <= set(session.calls)
            assert torch.equal(got, want[:, : ids.shape[1] + 1])


def test_unsupported_activation_is_refused():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        MarlinGatedMLP(lin, lin, lin, "relu")
