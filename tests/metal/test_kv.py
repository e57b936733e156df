"""marlin_emu.kv_* (the KV-cache Metal kernels and host code, emulated) against the pure-torch
ops, and the seeds/003 parity contracts run on the kernels themselves."""

from __future__ import annotations

import math

import pytest
import torch

from metal_marlin_torch import emulator
from metal_marlin_torch.kv.codebook import lloyd_max_codebook

from .conftest import needs_emulator

pytestmark = needs_emulator

BITS = (4, 5, 6, 8)


def codebook(bits: int, d: int) -> torch.Tensor:
    return lloyd_max_codebook(bits, min(d, 256))


def empty_cache(h, cap, d, bits):
    return (torch.zeros(h, cap, d // 2 if bits == 4 else d, dtype=torch.uint8),
            torch.zeros(h, cap, max(d // 256, 1), dtype=torch.float32))


def random_cache(h, cap, d, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    last = d // 2 if bits == 4 else d
    packed = torch.randint(0, 256 if bits == 4 else 2 ** bits, (h, cap, last), generator=g).to(torch.uint8)
    return packed, 0.5 + torch.rand(h, cap, max(d // 256, 1), generator=g) * 4


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.mark.parametrize("bits,d", [(4, 64), (5, 32), (6, 128), (8, 512), (4, 512)])
def test_dequantize_seq_is_bitwise_the_torch_op(emu, bits, d):
    packed, norms = random_cache(2, 6, d, bits, seed=bits)
    cb = codebook(bits, d)
    assert bits_equal(emu.kv_dequantize_seq(packed, norms, cb, 1, 4, bits),
                      torch.ops.marlin.kv_dequantize_seq(packed, norms, cb, 1, 4, bits))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d", [256, 512])
def test_seq_n1_byte_identical_to_per_position(emu, bits, d):
    # seeds/003: for every position and bit width, seq(start=pos, n=1) == per-position, bitwise
    h, cap = 2, 8
    packed, norms = random_cache(h, cap, d, bits, seed=bits)
    cb = codebook(bits, d)
    for pos in range(cap):
        per_pos = torch.full((h, d), float("nan"))
        seq = torch.full((h, 1, d), float("nan"))
        emu.kv_dequantize_out(packed, norms, cb, pos, bits, per_pos)
        emu.kv_dequantize_seq_out(packed, norms, cb, pos, 1, bits, seq)
        assert bits_equal(per_pos, seq.view(h, d)), (pos, bits)
        assert bits_equal(per_pos, torch.ops.marlin.kv_dequantize(packed, norms, cb, pos, bits))


@pytest.mark.parametrize("bits", BITS)
def test_seq_n_gt_1_is_the_concatenation_of_positions(emu, bits):
    h, cap, d, start, n = 2, 8, 256, 2, 4
    packed, norms = random_cache(h, cap, d, bits, seed=20 + bits)
    cb = codebook(bits, d)
    seq = torch.full((h, n, d), float("nan"))
    emu.kv_dequantize_seq_out(packed, norms, cb, start, n, bits, seq)
    cat = torch.stack([emu.kv_dequantize(packed, norms, cb, start + t, bits) for t in range(n)], dim=1)
    assert bits_equal(seq, cat)


def test_out_larger_than_needed_keeps_its_tail(emu):
    packed, norms = random_cache(2, 6, 64, 8)
    cb = codebook(8, 64)
    out = torch.full((2 * 6 * 64 + 3,), float("nan"))
    emu.kv_dequantize_seq_out(packed, norms, cb, 1, 3, 8, out)
    assert bits_equal(out[: 2 * 3 * 64].view(2, 3, 64), torch.ops.marlin.kv_dequantize_seq(packed, norms, cb, 1, 3, 8))
    assert out[2 * 3 * 64:].isnan().all()


def test_zero_heads_and_zero_tokens_are_no_ops(emu):
    d, bits = 64, 4
    cb = codebook(bits, d)
    packed, norms = random_cache(2, 4, d, bits)
    out = torch.full((2 * 4 * d,), float("nan"))
    emu.kv_dequantize_seq_out(packed, norms, cb, 0, 0, bits, out)
    emu.kv_dequantize_seq_out(packed, norms, cb, 4, 0, bits, out)
    assert out.isnan().all()
    assert emu.kv_dequantize_seq(packed, norms, cb, 0, 0, bits).shape == (2, 0, d)
    p0, n0 = empty_cache(0, 4, d, bits)
    assert emu.kv_dequantize(p0, n0, cb, 0, bits).shape == (0, d)
    emu.kv_dequantize_out(p0, n0, cb, 0, bits, out)
    assert out.isnan().all()
    before = packed.clone(), norms.clone()
    emu.kv_quantize(torch.randn(2, 0, d), torch.zeros(0, dtype=torch.long), packed, norms, cb, bits)
    assert torch.equal(packed, before[0]) and torch.equal(norms, before[1])


@pytest.mark.parametrize(("call", "match"), [
    (lambda e, p, n, c: e.kv_dequantize(p, n, c, 0, 3), r"bits must be one of \(4, 5, 6, 8\), got 3"),
    (lambda e, p, n, c: e.kv_dequantize_seq(p[..., :24], n, c, 0, 1, 4),
     "head_dim must be a power of two >= 2, got 48"),
    (lambda e, p, n, c: e.kv_dequantize_out(p, n, c, 0, 4, torch.empty(127)), "out has 127 elements, need 128"),
    (lambda e, p, n, c: e.kv_dequantize_seq_out(p, n, c, 0, 3, 4, torch.empty(383)), "out has 383 elements, need 384"),
    (lambda e, p, n, c: e.kv_dequantize_seq(p, n, c, 2, 3, 4), r"start\(2\) \+ n\(3\) > capacity\(4\)"),
    (lambda e, p, n, c: e.kv_dequantize(p, n, c, 4, 4), r"pos must lie in \[0, 4\), got 4"),
    (lambda e, p, n, c: e.kv_quantize(torch.randn(2, 1, 64), torch.tensor([4]), p, n, c, 4),
     r"positions must lie in \[0, 4\)"),
    (lambda e, p, n, c: e.kv_attention(torch.randn(2, 1, 64), p, n, p, n, c, 5, 4, 0.1),
     r"length must lie in \[1, 4\]"),
])
def test_errors_match_the_torch_op(emu, call, match):
    packed, norms = random_cache(2, 4, 64, 4)
    cb = codebook(4, 64)
    with pytest.raises(ValueError, match=match):
        call(emu, packed, norms, cb)
    with pytest.raises(ValueError, match=match):
        call(torch.ops.marlin, packed, norms, cb)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,d", [(4, 64), (5, 32), (6, 128), (8, 64), (4, 512)])
def test_quantize_matches_the_torch_op(emu, bits, d, dtype):
    h, n, cap = 2, 3, 5
    x = (torch.randn(h, n, d) * torch.linspace(0.1, 3, d)).to(dtype)
    x[1, 2] = 0  # a zero vector: norm 0, u = 0 on both sides
    cb = codebook(bits, d)
    positions = torch.tensor([4, 0, 2])
    want_p, want_n = empty_cache(h, cap, d, bits)
    got_p, got_n = empty_cache(h, cap, d, bits)
    torch.ops.marlin.kv_quantize(x, positions, want_p, want_n, cb, bits)
    emu.kv_quantize(x, positions, got_p, got_n, cb, bits)
    # same operations in the same order (FWHT stages, halving-tree norm, edge search): bitwise
    assert torch.equal(got_p, want_p)
    assert bits_equal(got_n, want_n)
    assert not got_p[:, [1, 3]].any() and not got_n[:, [1, 3]].any()  # other positions untouched


@pytest.mark.parametrize("bits,d,length,g", [(4, 64, 1, 3), (4, 64, 37, 3), (8, 128, 300, 2), (5, 512, 9, 1),
                                             (8, 64, 270, 10), (6, 32, 600, 4)])
def test_attention_matches_the_torch_op(emu, bits, d, length, g):
    # length > 256 spans several flash-decoding chunks (merged by the reduce kernel); g = 10 needs
    # two slices of at most 8 query heads per threadgroup, the second one partial
    h, cap = 2, max(length, 40)
    cb = codebook(bits, d)
    kp, kn = random_cache(h, cap, d, bits, seed=1)
    vp, vn = random_cache(h, cap, d, bits, seed=2)
    q = torch.randn(h, g, d) / math.sqrt(d) * 4
    want = torch.ops.marlin.kv_attention(q, kp, kn, vp, vn, cb, length, bits, 0.7)
    got = emu.kv_attention(q, kp, kn, vp, vn, cb, length, bits, 0.7)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


def test_emulator_routes_the_cache_layer(emu):
    # the TurboQuant store's writes and reads run on the emulated kernels under emulator.use()
    from metal_marlin_torch.kv import TurboQuantStore

    x = torch.randn(2, 5, 64)
    ref = TurboQuantStore(2, 8, 64, torch.device("cpu"), bits=4)
    ref.write(x, torch.arange(5))
    store = TurboQuantStore(2, 8, 64, torch.device("cpu"), bits=4)
    with emulator.use() as session:
        store.write(x, torch.arange(5))
        out = store.read(5, torch.float32)
    assert "kv_quantize" in session.calls and "kv_dequantize_seq" in session.calls
    torch.testing.assert_close(out, ref.read(5, torch.float32), rtol=1e-5, atol=1e-5)


def test_head_dims_without_a_kernel_are_named(emu):
    # dequantize has one kernel for every head_dim; quantize and attention are instantiated for 32..512
    packed, norms = random_cache(2, 4, 16, 8)
    cb = codebook(8, 16)
    assert bits_equal(emu.kv_dequantize(packed, norms, cb, 1, 8),
                      torch.ops.marlin.kv_dequantize(packed, norms, cb, 1, 8))
    with pytest.raises(ValueError, match="head_dim must be in 32..512 for the Metal kernel, got 16"):
        emu.kv_quantize(torch.randn(2, 1, 16), torch.tensor([0]), packed, norms, cb, 8)
    with pytest.raises(ValueError, match="head_dim must be in 32..512 for the Metal kernel, got 16"):
        emu.kv_attention(torch.randn(2, 1, 16), packed, norms, packed, norms, cb, 2, 8, 0.25)


def test_pylm_s_decodes_through_the_emulated_attention_kernel(emu, pylm_s_path):
    # the whole path of a Mac decode step: kv_quantize, kv_attention (+ hadamard) as kernels
    from transformers import AutoModelForCausalLM

    from metal_marlin_torch.kv import make_cache

    model = AutoModelForCausalLM.from_pretrained(pylm_s_path, dtype=torch.float32).eval()
    model.set_attn_implementation("marlin_kv")
    ids = torch.tensor([[5, 17, 300, 41, 9, 1200, 77, 3, 64, 8]])

    def run():
        cache = make_cache(model.config, method="turboquant", bits=4, fused=True)
        with torch.no_grad():
            return [model(ids[:, :8], past_key_values=cache).logits,
                    *(model(ids[:, t:t + 1], past_key_values=cache).logits for t in (8, 9))]

    want = run()
    with emulator.use() as session:
        got = run()
    assert {"kv_quantize", "kv_attention", "kv_dequantize_seq", "hadamard"} <= set(session.calls)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def at_offset(t: torch.Tensor, offset: int) -> torch.Tensor:
    """A contiguous copy of t that starts `offset` elements into a bigger storage."""
    store = torch.zeros(offset + t.numel(), dtype=t.dtype)
    store[offset:] = t.reshape(-1)
    v = store[offset:].view(t.shape)
    assert v.storage_offset() == offset and v.is_contiguous()
    return v


@pytest.mark.parametrize("bits", [4, 8])
def test_every_binding_at_an_odd_storage_offset(emu, bits):
    # x, q, the cache's codes, norms and the codebook each start inside a bigger storage at a
    # byte offset that is not 16-aligned (1 byte for codes, 4 for floats, 2 for fp16 x): the
    # kernels must read each from its own offset, with no wide load assuming alignment.
    h, cap, d, n = 2, 6, 64, 3
    cb = codebook(bits, d)
    x = (torch.randn(h, n, d) * 2).to(torch.float16)
    positions = torch.tensor([5, 0, 2])
    want_p, want_n = empty_cache(h, cap, d, bits)
    torch.ops.marlin.kv_quantize(x, positions, want_p, want_n, cb, bits)
    got_p, got_n = at_offset(empty_cache(h, cap, d, bits)[0], 1), at_offset(empty_cache(h, cap, d, bits)[1], 1)
    cb_off = at_offset(cb, 3)
    emu.kv_quantize(at_offset(x, 1), at_offset(positions, 1), got_p, got_n, cb_off, bits)
    assert torch.equal(got_p, want_p) and bits_equal(got_n, want_n)
    assert bits_equal(emu.kv_dequantize_seq(got_p, got_n, cb_off, 0, cap, bits),
                      torch.ops.marlin.kv_dequantize_seq(want_p, want_n, cb, 0, cap, bits))
    q = torch.randn(h, 3, d) / math.sqrt(d)
    want = torch.ops.marlin.kv_attention(q, want_p, want_n, want_p, want_n, cb, cap, bits, 0.5)
    got = emu.kv_attention(at_offset(q, 1), got_p, got_n, got_p, got_n, cb_off, cap, bits, 0.5)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
