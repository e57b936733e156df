"""marlin_emu.fake_quantize (vec and block kernels, emulated) against the pure-torch op."""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch.ops import reference

from .conftest import needs_emulator

pytestmark = needs_emulator

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 1e-30, -1e-30, 3e38, -3e38,
           float("inf"), -float("inf"), float("nan"), 1 / 7, 65504.0]


def inputs(n: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(n) * 1.5
    k = min(n, len(SPECIAL))
    x[:k] = torch.tensor(SPECIAL[:k])
    return x.to(dtype)


@pytest.mark.parametrize("variant", ["vec", "block"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_matches_torch(emu, variant, dtype, bits, thread_order):
    # sizes: one element, odd, just under / over a 1024-element block and a 256-thread group
    for n in (1, 15, 1023, 1025):
        x = inputs(n, dtype)
        ref = reference.fake_quantize(x, bits)
        out = emu.fake_quantize_variant(x, bits, variant)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_auto_variant_large_and_shapes(emu, dtype):
    # 40000 elements: above the block threshold; a 3-D shape is kept
    x = inputs(40000, dtype).view(8, 50, 100)
    out = emu.fake_quantize(x, 4)
    assert out.shape == x.shape and out.dtype == dtype
    torch.testing.assert_close(out, reference.fake_quantize(x, 4), rtol=0, atol=0, equal_nan=True)


def test_policy_nan_inf_and_sign(emu):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, -1e-20])
    assert torch.isnan(emu.fake_quantize(x, 4)[0])
    assert emu.fake_quantize(x, 4)[1:3].tolist() == [1.0, -1.0]
    assert emu.fake_quantize(x, 1)[1:].tolist() == [1.0, -1.0, 1.0, 1.0, -1.0]


def test_non_contiguous_and_offset_inputs(emu):
    base = torch.randn(6, 9)
    for x in (base.t(), base.view(-1)[1:], base[:, 1:5]):  # transposed; misaligned offset; strided
        torch.testing.assert_close(emu.fake_quantize(x, 3), reference.fake_quantize(x, 3),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["vec", "block"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_inputs_at_unaligned_storage_offsets(emu, dtype, variant):
    # x starts 1, 2 or 3 elements into its storage (2..12 bytes: never 16-byte aligned): the vec
    # kernel reads 4-vectors, so the host must copy such an input to an aligned buffer first.
    for offset in (1, 2, 3):
        store = inputs(offset + 2 * 517, dtype)
        x = store[offset:].view(2, 517)
        assert x.storage_offset() == offset and x.is_contiguous()
        out = emu.fake_quantize_variant(x, 3, variant)
        torch.testing.assert_close(out, reference.fake_quantize(x, 3), rtol=0, atol=0, equal_nan=True)


def test_empty(emu):
    assert emu.fake_quantize(torch.empty(0, 3), 4).shape == (0, 3)


@pytest.mark.parametrize("bits", [0, 17])
def test_bad_bits(emu, bits):
    with pytest.raises(ValueError, match="bits must be an int in 1..16"):
        emu.fake_quantize(torch.randn(4), bits)


def test_bad_dtype_and_variant(emu):
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        emu.fake_quantize(torch.randn(4, dtype=torch.float64), 4)
    with pytest.raises(ValueError, match="variant must be"):
        emu.fake_quantize_variant(torch.randn(4), 4, "fast")
