"""marlin::kv_* (TurboQuant-style KV cache ops) against an independent reading of the layout
(explicit Hadamard matrix, brute-force nearest level, per-element loops) and the parity
contracts of docs/KV_CACHE.md (seeds/003)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.library import opcheck

from metal_marlin_torch.kv import ops as kv
from metal_marlin_torch.kv.codebook import lloyd_max_codebook

BITS = (4, 5, 6, 8)


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def codebook(bits: int, d: int) -> torch.Tensor:
    return lloyd_max_codebook(bits, min(d, 256))


def empty_cache(h: int, cap: int, d: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    last = d // 2 if bits == 4 else d
    return (torch.zeros(h, cap, last, dtype=torch.uint8),
            torch.zeros(h, cap, max(d // 256, 1), dtype=torch.float32))


def random_cache(h: int, cap: int, d: int, bits: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Arbitrary bytes and norms, as the seed's parity tests use (every code value occurs)."""
    g = torch.Generator().manual_seed(seed)
    last = d // 2 if bits == 4 else d
    packed = torch.randint(0, 2 ** bits if bits != 4 else 256, (h, cap, last), generator=g, dtype=torch.int64)
    norms = 0.5 + torch.rand(h, cap, max(d // 256, 1), generator=g) * 4
    return packed.to(torch.uint8), norms


def codes_of(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent unpacking: element 2j in the low nibble of byte j for 4-bit."""
    if bits != 4:
        return packed.long()
    out = torch.empty(*packed.shape[:-1], packed.shape[-1] * 2, dtype=torch.long)
    for j in range(packed.shape[-1]):
        out[..., 2 * j] = packed[..., j].long() % 16
        out[..., 2 * j + 1] = packed[..., j].long() // 16
    return out


def expected_dequant(packed, norms, cb, bits) -> torch.Tensor:
    """float64 [H, C, D]: c[code] * norm_block / sqrt(B)."""
    codes = codes_of(packed, bits)
    d = codes.shape[-1]
    b = min(d, 256)
    block_norm = norms.double().repeat_interleave(b, dim=-1)
    return cb.double()[codes] * block_norm / math.sqrt(b)


# ---- quantize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,d", [(4, 64), (5, 64), (6, 128), (8, 64), (4, 512), (8, 512), (4, 2)])
def test_quantize_is_nearest_level_of_rotated_normalized_blocks(bits, d):
    h, n, cap = 3, 5, 7
    x = torch.randn(h, n, d) * torch.linspace(0.1, 3, d)  # anisotropic: the rotation must spread it
    cb = codebook(bits, d)
    packed, norms = empty_cache(h, cap, d, bits)
    positions = torch.tensor([6, 0, 3, 2, 5])
    kv.kv_quantize(x, positions, packed, norms, cb, bits)

    b = min(d, 256)
    y = (x.double() @ sylvester(d).T).view(h, n, d // b, b)
    want_norm = y.norm(dim=-1)
    u = y * math.sqrt(b) / want_norm.unsqueeze(-1)
    want_codes = (u.unsqueeze(-1) - cb.double()).abs().argmin(-1).view(h, n, d)
    got_codes = codes_of(packed[:, positions], bits)
    # a value within float32 rounding of a cell edge may land either side
    mids = (cb.double()[1:] + cb.double()[:-1]) / 2
    near_edge = ((u.unsqueeze(-1) - mids).abs().amin(-1) < 1e-5).view(h, n, d)
    assert torch.equal(got_codes[~near_edge], want_codes[~near_edge])
    torch.testing.assert_close(norms[:, positions].double(), want_norm, rtol=1e-5, atol=0)
    untouched = torch.tensor([1, 4])
    assert not packed[:, untouched].any() and not norms[:, untouched].any()


def test_quantize_zero_vector_and_dtypes():
    d, bits = 64, 4
    cb = codebook(bits, d)
    x = torch.zeros(2, 1, d, dtype=torch.bfloat16)
    packed, norms = empty_cache(2, 2, d, bits)
    kv.kv_quantize(x, torch.tensor([1]), packed, norms, cb, bits)
    assert not norms.any()
    out = kv.kv_dequantize(packed, norms, cb, 1, bits)
    assert torch.equal(out, torch.zeros(2, d)) and not out.isnan().any()
    for dtype in (torch.float16, torch.bfloat16):
        xf = torch.randn(2, 3, d)
        p1, n1 = empty_cache(2, 3, d, bits)
        p2, n2 = empty_cache(2, 3, d, bits)
        kv.kv_quantize(xf.to(dtype), torch.arange(3), p1, n1, cb, bits)
        kv.kv_quantize(xf.to(dtype).float(), torch.arange(3), p2, n2, cb, bits)
        assert torch.equal(p1, p2) and torch.equal(n1, n2)


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_error_matches_the_codebook_mse(bits):
    # Gaussian rows are isotropic: after normalization their rotated coordinates follow the
    # sphere model the codebook was built for, so the relative error is its predicted MSE.
    from metal_marlin_torch.kv.codebook import expected_mse

    h, n, d = 4, 256, 64
    x = torch.randn(h, n, d)
    cb = codebook(bits, d)
    packed, norms = empty_cache(h, n, d, bits)
    kv.kv_quantize(x, torch.arange(n), packed, norms, cb, bits)
    y_hat = kv.kv_dequantize_seq(packed, norms, cb, 0, n, bits)
    x_hat = y_hat.double() @ sylvester(d)  # un-rotate (H is symmetric and orthogonal)
    rel = ((x_hat - x.double()).pow(2).sum(-1) / x.double().pow(2).sum(-1)).mean().item()
    predicted = expected_mse(cb, d)  # per coordinate of unit variance = the relative error
    assert 0.8 * predicted < rel < 1.25 * predicted, (rel, predicted)


# ---- dequantize ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,d", [(4, 64), (5, 128), (6, 64), (8, 256), (4, 512), (8, 1024)])
def test_dequantize_reads_the_layout(bits, d):
    h, cap = 2, 5
    packed, norms = random_cache(h, cap, d, bits)
    cb = codebook(bits, d)
    want = expected_dequant(packed, norms, cb, bits)
    for pos in range(cap):
        torch.testing.assert_close(kv.kv_dequantize(packed, norms, cb, pos, bits).double(), want[:, pos],
                                   rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(kv.kv_dequantize_seq(packed, norms, cb, 1, 3, bits).double(), want[:, 1:4],
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d", [256, 512])
def test_seq_n1_byte_identical_to_per_position(bits, d):
    # seeds/003 contract: for every position, seq(start=pos, n=1) == per-position, bit for bit
    h, cap = 2, 8
    packed, norms = random_cache(h, cap, d, bits, seed=bits)
    cb = codebook(bits, d)
    for pos in range(cap):
        per_pos = torch.full((h, d), float("nan"))
        seq = torch.full((h, 1, d), float("nan"))
        kv.kv_dequantize(packed, norms, cb, pos, bits, out=per_pos)
        kv.kv_dequantize_seq(packed, norms, cb, pos, 1, bits, out=seq)
        assert torch.equal(per_pos.view(torch.int32), seq.view(h, d).view(torch.int32)), (pos, bits)
        assert torch.equal(kv.kv_dequantize(packed, norms, cb, pos, bits).view(torch.int32),
                           kv.kv_dequantize_seq(packed, norms, cb, pos, 1, bits)[:, 0].view(torch.int32))


@pytest.mark.parametrize("bits", BITS)
def test_seq_n_gt_1_is_the_concatenation_of_positions(bits):
    h, cap, d, start, n = 2, 8, 256, 2, 4
    packed, norms = random_cache(h, cap, d, bits, seed=10 + bits)
    cb = codebook(bits, d)
    seq = kv.kv_dequantize_seq(packed, norms, cb, start, n, bits)
    cat = torch.stack([kv.kv_dequantize(packed, norms, cb, start + t, bits) for t in range(n)], dim=1)
    assert seq.shape == (h, n, d)
    assert torch.equal(seq.view(torch.int32), cat.view(torch.int32))


def test_out_larger_than_needed_is_written_at_its_start():
    h, cap, d, bits = 2, 6, 64, 8
    packed, norms = random_cache(h, cap, d, bits)
    cb = codebook(bits, d)
    out = torch.full((h * cap * d + 5,), float("nan"))
    kv.kv_dequantize_seq(packed, norms, cb, 1, 3, bits, out=out)
    assert torch.equal(out[: h * 3 * d].view(h, 3, d), kv.kv_dequantize_seq(packed, norms, cb, 1, 3, bits))
    assert out[h * 3 * d:].isnan().all()


def test_zero_heads_and_zero_tokens_are_no_ops():
    d, bits = 64, 4
    cb = codebook(bits, d)
    packed, norms = random_cache(2, 4, d, bits)
    out = torch.full((2 * 4 * d,), float("nan"))
    kv.kv_dequantize_seq(packed, norms, cb, 0, 0, bits, out=out)
    kv.kv_dequantize_seq(packed, norms, cb, 4, 0, bits, out=out)  # start == capacity, nothing read
    assert out.isnan().all()
    assert kv.kv_dequantize_seq(packed, norms, cb, 0, 0, bits).shape == (2, 0, d)
    p0, n0 = empty_cache(0, 4, d, bits)
    assert kv.kv_dequantize(p0, n0, cb, 0, bits).shape == (0, d)
    assert kv.kv_dequantize_seq(p0, n0, cb, 0, 3, bits).shape == (0, 3, d)
    kv.kv_dequantize(p0, n0, cb, 0, bits, out=out)
    assert out.isnan().all()
    before = (packed.clone(), norms.clone())
    kv.kv_quantize(torch.randn(2, 0, d), torch.zeros(0, dtype=torch.long), packed, norms, cb, bits)
    assert torch.equal(packed, before[0]) and torch.equal(norms, before[1])


# ---- errors ---------------------------------------------------------------------------------------

def test_errors_name_the_problem():
    d = 64
    cb4 = codebook(4, d)
    packed, norms = random_cache(2, 4, d, 4)
    with pytest.raises(ValueError, match=r"bits must be one of \(4, 5, 6, 8\), got 3"):
        kv.kv_dequantize(packed, norms, cb4, 0, 3)
    with pytest.raises(ValueError, match="got 7"):
        kv.kv_dequantize_seq(packed, norms, cb4, 0, 1, 7)
    # head_dim 48 (not a power of two): 8-bit packed [.., 48], 4-bit packed [.., 24]
    p48, _ = random_cache(2, 4, 48, 8)
    with pytest.raises(ValueError, match="head_dim must be a power of two >= 2, got 48"):
        kv.kv_dequantize_seq(p48, torch.ones(2, 4, 1), codebook(8, 64), 0, 1, 8)
    with pytest.raises(ValueError, match="head_dim must be a power of two >= 2, got 48"):
        kv.kv_dequantize(packed[..., :24], norms, cb4, 0, 4)
    with pytest.raises(ValueError, match="head_dim must be a power of two >= 2, got 48"):
        kv.kv_quantize(torch.randn(2, 1, 48), torch.tensor([0]), packed[..., :24], norms, cb4, 4)
    with pytest.raises(ValueError, match="out has 127 elements, need 128"):
        kv.kv_dequantize(packed, norms, cb4, 0, 4, out=torch.empty(127))
    with pytest.raises(ValueError, match="out has 383 elements, need 384"):
        kv.kv_dequantize_seq(packed, norms, cb4, 0, 3, 4, out=torch.empty(383))
    with pytest.raises(ValueError, match="out must be a contiguous float32"):
        kv.kv_dequantize(packed, norms, cb4, 0, 4, out=torch.empty(128, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"start\(2\) \+ n\(3\) > capacity\(4\)"):
        kv.kv_dequantize_seq(packed, norms, cb4, 2, 3, 4)
    with pytest.raises(ValueError, match=r"start\(2\) \+ n\(3\) > capacity\(4\)"):
        kv.kv_dequantize_seq(packed, norms, cb4, 2, 3, 4, out=torch.empty(2 * 3 * d))
    with pytest.raises(ValueError, match="start and n must be >= 0"):
        kv.kv_dequantize_seq(packed, norms, cb4, -1, 2, 4)
    with pytest.raises(ValueError, match=r"pos must lie in \[0, 4\), got 4"):
        kv.kv_dequantize(packed, norms, cb4, 4, 4)
    with pytest.raises(ValueError, match=r"codebook must be float32 \[16\]"):
        kv.kv_dequantize(packed, norms, codebook(5, d), 0, 4)
    with pytest.raises(ValueError, match=r"norms must be float32 \[2, 4, 1\]"):
        kv.kv_dequantize(packed, norms[:, :3], cb4, 0, 4)
    with pytest.raises(ValueError, match="packed must be uint8"):
        kv.kv_dequantize(packed.float(), norms, cb4, 0, 4)
    with pytest.raises(ValueError, match=r"positions must lie in \[0, 4\)"):
        kv.kv_quantize(torch.randn(2, 1, d), torch.tensor([4]), packed, norms, cb4, 4)
    with pytest.raises(ValueError, match=r"positions must be int64 \[2\]"):
        kv.kv_quantize(torch.randn(2, 2, d), torch.tensor([0]), packed, norms, cb4, 4)
    with pytest.raises(ValueError, match=r"x must be float16/bfloat16/float32 \[2, n, 64\]"):
        kv.kv_quantize(torch.randn(3, 1, d), torch.tensor([0]), packed, norms, cb4, 4)
    with pytest.raises(ValueError, match=r"length must lie in \[1, 4\]"):
        kv.kv_attention(torch.randn(2, 1, d), packed, norms, packed, norms, cb4, 5, 4)


# ---- attention --------------------------------------------------------------------------------

def dense_attention(q, k, v, scale):
    """float64 softmax(q k^T * scale) v over [H, G, D] x [H, L, D]."""
    s = torch.einsum("hgd,hld->hgl", q.double(), k.double()) * scale
    p = torch.exp(s - s.amax(-1, keepdim=True))
    return torch.einsum("hgl,hld->hgd", p / p.sum(-1, keepdim=True), v.double())


@pytest.mark.parametrize("bits,d,length", [(4, 64, 1), (4, 64, 37), (8, 128, 20), (5, 512, 9)])
def test_kv_attention_is_dense_attention_over_the_dequantized_cache(bits, d, length):
    h, g, cap = 2, 3, 40
    cb = codebook(bits, d)
    kp, kn = random_cache(h, cap, d, bits, seed=1)
    vp, vn = random_cache(h, cap, d, bits, seed=2)
    q = torch.randn(h, g, d)
    want = dense_attention(q, expected_dequant(kp, kn, cb, bits)[:, :length],
                           expected_dequant(vp, vn, cb, bits)[:, :length], 0.3)
    got = kv.kv_attention(q, kp, kn, vp, vn, cb, length, bits, scale=0.3)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits,tol", [(4, 0.2), (5, 0.1), (6, 0.05), (8, 0.015)])
def test_rotated_domain_attention_equals_dense_attention_up_to_quantization(bits, tol):
    h, g, d, n = 2, 3, 64, 50
    cb = codebook(bits, d)
    k = torch.randn(h, n, d)
    v = torch.randn(h, n, d)
    q = torch.randn(h, g, d)
    kp, kn = empty_cache(h, n, d, bits)
    vp, vn = empty_cache(h, n, d, bits)
    kv.kv_quantize(k, torch.arange(n), kp, kn, cb, bits)
    kv.kv_quantize(v, torch.arange(n), vp, vn, cb, bits)
    got = kv.rotated_attention(q, kp, kn, vp, vn, cb, n, bits)
    # exact identity with dense attention over the un-rotated dequantized cache
    hd = sylvester(d)
    k_hat = expected_dequant(kp, kn, cb, bits) @ hd
    v_hat = expected_dequant(vp, vn, cb, bits) @ hd
    torch.testing.assert_close(got.double(), dense_attention(q, k_hat, v_hat, 1 / math.sqrt(d)),
                               rtol=1e-4, atol=1e-5)
    # and close to attention over the original keys and values
    ref = dense_attention(q, k, v, 1 / math.sqrt(d))
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel < tol, rel


# ---- opcheck (schemas, fake kernels, compile) -----------------------------------------------------

def _opcheck_cases():
    d, bits = 64, 4
    cb = codebook(bits, d)
    packed, norms = random_cache(2, 6, d, bits)
    q = torch.randn(2, 3, d)
    return [
        (torch.ops.marlin.kv_quantize.default,
         (torch.randn(2, 3, d), torch.tensor([5, 0, 2]), packed.clone(), norms.clone(), cb, bits)),
        (torch.ops.marlin.kv_dequantize.default, (packed, norms, cb, 3, bits)),
        (torch.ops.marlin.kv_dequantize_out.default, (packed, norms, cb, 3, bits, torch.empty(2 * d))),
        (torch.ops.marlin.kv_dequantize_seq.default, (packed, norms, cb, 1, 4, bits)),
        (torch.ops.marlin.kv_dequantize_seq_out.default, (packed, norms, cb, 1, 4, bits, torch.empty(2, 4, d))),
        (torch.ops.marlin.kv_attention.default, (q, packed, norms, packed, norms, cb, 5, bits, 0.125)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_every_kv_op_is_routed_through_the_registry():
    from metal_marlin_torch.ops import active_kernels, override

    names = [op for op in active_kernels("cpu") if op.startswith("kv_")]
    assert sorted(names) == sorted(["kv_quantize", "kv_dequantize", "kv_dequantize_out", "kv_dequantize_seq",
                                    "kv_dequantize_seq_out", "kv_attention"])
    calls = []
    with override({"kv_dequantize": lambda *a: calls.append(a) or torch.zeros(2, 64)}, "cpu", "probe"):
        packed, norms = random_cache(2, 2, 64, 8)
        kv.kv_dequantize(packed, norms, codebook(8, 64), 0, 8)
    assert len(calls) == 1

