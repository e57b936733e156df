"""marlin::attention's pure-torch kernel against scaled_dot_product_attention, opcheck, and
attn_implementation="marlin" (io/attention.py) on the test Llama against SDPA."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from metal_marlin_torch import emulator, ops
from metal_marlin_torch.ops.attention import attention_mask


@pytest.mark.parametrize(("sq", "sk", "causal", "window"), [(1, 9, True, 0), (6, 6, True, 0), (3, 10, True, 4),
                                                            (4, 7, False, 0)])
def test_equals_sdpa(sq, sk, causal, window):
    q, k, v = torch.randn(2, 6, sq, 32), torch.randn(2, 2, sk, 32), torch.randn(2, 2, sk, 32)
    mask = attention_mask(sq, sk, causal, window)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(ops.attention(q, k, v, causal=causal, window=window), want, rtol=1e-5, atol=1e-5)
    if window:  # the window removes keys: differs from the plain causal result
        assert not torch.allclose(ops.attention(q, k, v), want)


def test_mask_is_transformers_sliding_window():
    from transformers.masking_utils import sliding_window_causal_mask_function  # noqa: PLC0415

    fn = sliding_window_causal_mask_function(3)
    t = torch.tensor
    want = torch.tensor([[bool(fn(t(0), t(0), t(q + 4), t(kv))) for kv in range(7)] for q in range(3)])
    assert torch.equal(attention_mask(3, 7, True, 3), want)


def test_opcheck():
    opcheck(torch.ops.marlin.attention, (torch.randn(1, 4, 3, 16), torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16),
                                         0.25, True, 2))


def fp8_cache(b: int, hk: int, sk: int, d: int, seed: int = 0):
    """An FP8 K/V cache as kv.stores.FP8Store keeps it (E4M3 bytes, per-token float32 scales),
    from random fp32 K/V of spread magnitudes."""
    from metal_marlin_torch.kv.stores import FP8Store  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, hk, sk, d, generator=g) * torch.rand(b, hk, sk, 1, generator=g) * 10
    v = torch.randn(b, hk, sk, d, generator=g)
    (kc, ks), (vc, vs) = FP8Store.quantize(k), FP8Store.quantize(v)
    return kc, ks[..., 0], vc, vs[..., 0], (kc, ks, vc, vs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("sq", "sk", "causal", "window"), [(1, 9, True, 0), (5, 12, True, 4), (4, 7, False, 0)])
def test_fp8_equals_sdpa_on_the_dequantized_cache(dtype, sq, sk, causal, window):
    """attention_fp8 = SDPA over FP8Store.dequantize's K/V in q's dtype (SDPA in float32 on
    those values, GQA by enable_gqa): within a rounding of the output dtype."""
    from metal_marlin_torch.kv.stores import FP8Store  # noqa: PLC0415

    kc, ks, vc, vs, (kc_, ks_, vc_, vs_) = fp8_cache(2, 2, sk, 16)
    q = torch.randn(2, 4, sq, 16).to(dtype)
    kd, vd = FP8Store.dequantize(kc_, ks_, dtype), FP8Store.dequantize(vc_, vs_, dtype)
    mask = attention_mask(sq, sk, causal, window)
    want = F.scaled_dot_product_attention(q.float(), kd.float(), vd.float(), attn_mask=mask, enable_gqa=True)
    got = torch.ops.marlin.attention_fp8(q, kc, ks, vc, vs, 0.25, causal, window)
    # SDPA's default scale is 1/sqrt(16) = 0.25
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(got, want.to(dtype), rtol=tol, atol=tol)


def test_fp8_opcheck_and_errors():
    kc, ks, vc, vs, _ = fp8_cache(1, 2, 5, 16)
    opcheck(torch.ops.marlin.attention_fp8, (torch.randn(1, 4, 3, 16), kc, ks, vc, vs, 0.25, True, 2))
    q = torch.randn(1, 4, 3, 16)
    with pytest.raises(ValueError, match="k must be the E4M3 bytes as uint8"):
        torch.ops.marlin.attention_fp8(q, kc.float(), ks, vc, vs, 0.25, True, 0)
    with pytest.raises(ValueError, match=r"k_scales must be float32 \[1, 2, 5\]"):
        torch.ops.marlin.attention_fp8(q, kc, ks[..., None], vc, vs, 0.25, True, 0)


def test_paged_equals_contiguous_and_sdpa():
    """attention_paged gathers sequence b's token j from slot j % P of page block_table[b, j // P]."""
    from metal_marlin_torch.ops.attention import gather_pages  # noqa: PLC0415

    k, v = torch.randn(2, 2, 11, 16), torch.randn(2, 2, 11, 16)
    kp, vp = torch.zeros(7, 2, 4, 16), torch.zeros(7, 2, 4, 16)
    table = torch.tensor([[5, 0, 3, 99], [1, 6, 2, 99]], dtype=torch.int32)  # column 3 unused (11 tokens)
    for b in range(2):
        for i in range(3):
            n = min(4, 11 - 4 * i)
            kp[table[b, i], :, :n], vp[table[b, i], :, :n] = k[b, :, 4 * i:4 * i + n], v[b, :, 4 * i:4 * i + n]
    assert torch.equal(gather_pages(kp, table, 11), k)
    q = torch.randn(2, 4, 3, 16)
    got = torch.ops.marlin.attention_paged(q, kp, vp, table, 11, 0.25, True, 0)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask(3, 11, True, 0), enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    opcheck(torch.ops.marlin.attention_paged, (q, kp, vp, table, 11, 0.25, True, 0))
    with pytest.raises(ValueError, match=r"name pages in \[0, 7\)"):
        torch.ops.marlin.attention_paged(q, kp, vp, table, 13, 0.25, True, 0)  # a 4th page: id 99
    with pytest.raises(ValueError, match=r"seq_k must be in \[0, 16\]"):
        torch.ops.marlin.attention_paged(q, kp, vp, table, 17, 0.25, True, 0)


MODEL = "/work/shared/models/pylm-s"


@pytest.mark.skipif(not os.path.isdir(MODEL), reason=f"test model {MODEL} not present")
def test_llama_attn_implementation_marlin_equals_sdpa():
    import transformers  # noqa: PLC0415

    from metal_marlin_torch.io.attention import register_attention  # noqa: PLC0415

    register_attention()
    sdpa = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32, attn_implementation="sdpa")
    ours = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32,
                                                             attn_implementation="marlin")
    ids = torch.tensor([[0, 17, 400, 9, 1200, 33, 5]])
    with torch.no_grad():
        a, b = sdpa(ids).logits, ours(ids).logits
    # stated bound: fp32 attention in another summation order, through 6 layers
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    kw = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    want = sdpa.generate(ids, **kw)
    assert torch.equal(ours.generate(ids, **kw), want)  # decode steps over the KV cache too
    if emulator.available():
        with emulator.use() as session:  # the emulated Metal kernel in every attention layer
            got = ours.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        assert "attention" in session.calls
        assert torch.equal(got, want[:, : ids.shape[1] + 2])
