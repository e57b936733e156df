"""The pure-torch decoder-layer ops (ops/layer.py) against the transformers modules whose
formulas they copy (LlamaRMSNorm, nn.LayerNorm, ACT2FN, LlamaRotaryEmbedding +
apply_rotary_pos_emb), opcheck, and their argument errors."""

from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

from metal_marlin_torch import ops
from metal_marlin_torch.ops.layer import rope_parameters

transformers = pytest.importorskip("transformers")
from transformers.activations import ACT2FN  # noqa: E402
from transformers.models.llama import modeling_llama as L  # noqa: E402

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_is_llama_rms_norm(dtype):
    torch.manual_seed(0)
    hf = L.LlamaRMSNorm(67, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(67))
    x, r = torch.randn(2, 5, 67).to(dtype), torch.randn(2, 5, 67).to(dtype)
    with torch.no_grad():
        torch.testing.assert_close(ops.rms_norm(x, hf.weight, 1e-5), hf(x), rtol=0, atol=0)
        y, h = ops.rms_norm(x, hf.weight, 1e-5, residual=r)
        torch.testing.assert_close(h, r + x, rtol=0, atol=0)  # the decoder layer's residual add
        torch.testing.assert_close(y, hf(r + x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_is_nn_layer_norm(dtype, affine):
    torch.manual_seed(1)
    ln = torch.nn.LayerNorm(45, eps=1e-6, elementwise_affine=affine).to(dtype)
    if affine:
        with torch.no_grad():
            ln.weight.copy_(torch.randn(45))
            ln.bias.copy_(torch.randn(45))
    x, r = (torch.randn(3, 45) * 4 + 2).to(dtype), torch.randn(3, 45).to(dtype)
    w, b = (ln.weight, ln.bias) if affine else (None, None)
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}[dtype]
    with torch.no_grad():
        torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-6), ln(x), rtol=tol, atol=tol)
        y, h = ops.layer_norm(x, w, b, 1e-6, residual=r)
        torch.testing.assert_close(h, x + r, rtol=0, atol=0)
        torch.testing.assert_close(y, ln(x + r), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("op", "act"), [(ops.silu_mul, "silu"), (ops.gelu_mul, "gelu_pytorch_tanh")])
def test_gated_act_is_act2fn_times_up(dtype, op, act):
    g, u = torch.randn(3, 33).to(dtype) * 4, torch.randn(3, 33).to(dtype)
    expect = ACT2FN[act](g) * u
    torch.testing.assert_close(op(g, u), expect, rtol=0, atol=0)
    torch.testing.assert_close(op(torch.cat([g, u], -1)), expect, rtol=0, atol=0)  # fused [.., 2I]


def _config(rope: dict | None, head_dim: int = 16) -> transformers.LlamaConfig:
    params = {"rope_type": "default", "rope_theta": 10000.0, **(rope or {})}
    return transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                                    head_dim=head_dim, max_position_embeddings=512, rope_parameters=params)


ROPES = {
    "default": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", list(ROPES))
def test_rope_is_hf_apply_rotary_pos_emb(dtype, kind):
    cfg = _config(ROPES[kind])
    emb = L.LlamaRotaryEmbedding(cfg)
    q, k = torch.randn(2, 4, 7, 16).to(dtype), torch.randn(2, 2, 7, 16).to(dtype)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [300, 301, 302, 303, 304, 305, 306]])
    cos, sin = emb(q, pos)
    eq, ek = L.apply_rotary_pos_emb(q, k, cos, sin)
    inv_freq, scaling = rope_parameters(cfg)
    torch.testing.assert_close(inv_freq, emb.inv_freq)
    assert scaling == emb.attention_scaling
    if kind == "yarn":
        assert scaling != 1.0  # the attention scaling is exercised
    oq, ok = ops.rope(q, k, pos, inv_freq, scaling)
    torch.testing.assert_close(oq, eq, rtol=0, atol=0)
    torch.testing.assert_close(ok, ek, rtol=0, atol=0)


def test_rope_interleaved_and_partial_layouts():
    # interleaved pairs (2i, 2i + 1) equal the half-split rotation of de-interleaved dims; a
    # partial rotary (R = 8 of D = 12) leaves dims 8.. untouched
    q, k = torch.randn(1, 2, 5, 12), torch.randn(1, 1, 5, 12)
    pos = torch.arange(5)[None]
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    perm = torch.cat([torch.arange(0, 8, 2), torch.arange(1, 8, 2), torch.arange(8, 12)])
    iq, ik = ops.rope(q, k, pos, inv_freq, 1.0, interleaved=True)
    hq, hk = ops.rope(q[..., perm], k[..., perm], pos, inv_freq, 1.0, interleaved=False)
    torch.testing.assert_close(iq[..., perm], hq, rtol=0, atol=0)
    torch.testing.assert_close(ik[..., perm], hk, rtol=0, atol=0)
    torch.testing.assert_close(hq[..., 8:], q[..., perm][..., 8:], rtol=0, atol=0)
    # rotation keeps the norm of every pair
    torch.testing.assert_close(hq[..., :8].norm(dim=-1), q[..., :8].norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_opcheck():
    x, w, r = torch.randn(3, 40), torch.randn(40), torch.randn(3, 40)
    opcheck(torch.ops.marlin.rms_norm, (x, w, None, 1e-6))
    opcheck(torch.ops.marlin.rms_norm, (x, w, r, 1e-6))
    opcheck(torch.ops.marlin.layer_norm, (x, w, w, r, 1e-6))
    opcheck(torch.ops.marlin.layer_norm, (x, None, None, None, 1e-6))
    opcheck(torch.ops.marlin.silu_mul, (x, None))
    opcheck(torch.ops.marlin.gelu_mul, (x, r))
    inv = torch.rand(4)
    opcheck(torch.ops.marlin.rope, (torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.arange(3)[None], inv,
                                    1.0, False))


@pytest.mark.parametrize(("call", "match"), [
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-6), "weight must have shape"),
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(8).half(), 1e-6), "weight must have x's dtype"),
    (lambda: ops.layer_norm(torch.randn(2, 8), None, None, 1e-6, residual=torch.randn(3, 8)),
     "residual must have shape"),
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(8), -1.0), "eps must be >= 0"),
    (lambda: ops.silu_mul(torch.randn(2, 7)), "last dim must be even"),
    (lambda: ops.gelu_mul(torch.randn(2, 8), torch.randn(2, 9)), "up must have shape"),
    (lambda: ops.rope(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.arange(4)[None], torch.rand(4)),
     "positions must be"),
    (lambda: ops.rope(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8), torch.arange(3)[None], torch.rand(5)),
     "inv_freq's length"),
    (lambda: ops.rope(torch.randn(2, 8), torch.randn(2, 8), torch.arange(3)[None], torch.rand(4)),
     "must be \\[batch, heads, seq, head_dim\\]"),
])
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()
