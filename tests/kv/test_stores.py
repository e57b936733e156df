"""KV stores: FP8 per-token scales, TurboQuant through the ops, growth and row selection."""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch.kv import CastStore, FP8Store, TurboQuantStore

E4M3_MAX = 448.0


def e4m3_round(v: torch.Tensor) -> torch.Tensor:
    """Independent E4M3 rounding of |v| <= 448: 3 mantissa bits, min normal 2^-6, subnormal step 2^-9."""
    a = v.abs().double()
    exp = torch.floor(torch.log2(a.clamp(min=2.0 ** -6)))
    step = 2.0 ** (exp - 3)
    r = torch.round(a / step) * step  # round half to even, as torch.round
    return torch.sign(v.double()) * r


def test_fp8_store_quantizes_each_token_with_its_absmax():
    x = torch.randn(3, 5, 64) * torch.logspace(-3, 2, 5).view(1, 5, 1)
    store = FP8Store(3, 8, 64, torch.device("cpu"))
    store.write(x, torch.arange(5))
    scale = x.abs().amax(-1, keepdim=True).double() / E4M3_MAX
    want = e4m3_round(x.double() / scale) * scale
    got = store.read(5, torch.float32)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-12)
    # each token's largest element is exact (it maps onto 448)
    idx = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(got.gather(-1, idx), x.gather(-1, idx), rtol=1e-6, atol=0)


def test_fp8_store_zero_token_reads_zero_and_bytes():
    store = FP8Store(2, 4, 64, torch.device("cpu"))
    store.write(torch.zeros(2, 1, 64), torch.tensor([2]))
    out = store.read(4, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and not out.isnan().any() and not out.any()
    assert store.nbytes() == 2 * 4 * FP8Store.bytes_per_position(64) == 2 * 4 * (64 + 4)


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_turboquant_store_read_is_the_unrotated_op_output(bits):
    store = TurboQuantStore(2, 6, 64, torch.device("cpu"), bits=bits)
    x = torch.randn(2, 6, 64)
    store.write(x[:, 3:], torch.tensor([3, 4, 5]))  # out of order: any position, any time
    store.write(x[:, :3], torch.tensor([0, 1, 2]))
    rot = torch.ops.marlin.kv_dequantize_seq(store.packed, store.norms, store.codebook, 0, 6, bits)
    torch.testing.assert_close(store.read(6, torch.float32), torch.ops.marlin.hadamard(rot, 64))
    rel = ((store.read(6, torch.float32) - x).norm() / x.norm()).item()
    assert rel < {4: 0.12, 5: 0.06, 6: 0.03, 8: 0.01}[bits]
    assert store.nbytes() == 2 * 6 * TurboQuantStore.bytes_per_position(64, bits=bits)
    assert TurboQuantStore.bytes_per_position(64, bits=bits) == (32 if bits == 4 else 64) + 4


def test_turboquant_store_checks_its_arguments():
    with pytest.raises(ValueError, match="bits must be one of"):
        TurboQuantStore(1, 4, 64, torch.device("cpu"), bits=3)
    with pytest.raises(ValueError, match="head_dim must be a power of two"):
        TurboQuantStore(1, 4, 80, torch.device("cpu"), bits=4)


@pytest.mark.parametrize("cls,options", [(FP8Store, {}), (TurboQuantStore, {"bits": 4}),
                                         (CastStore, {"dtype": torch.float16})])
def test_resize_and_select_rows_keep_bytes(cls, options):
    store = cls(3, 4, 64, torch.device("cpu"), **options)
    x = torch.randn(3, 4, 64)
    store.write(x, torch.arange(4))
    before = store.read(4, torch.float32)
    store.resize(9, 4)
    assert store.capacity == 9
    assert torch.equal(store.read(4, torch.float32), before)
    store.select_rows(torch.tensor([2, 2, 0]))
    assert torch.equal(store.read(4, torch.float32), before[[2, 2, 0]])
