"""marlin_emu.hadamard (FWHT kernel, emulated) against the pure-torch op and the matrix."""

from __future__ import annotations

import math

import pytest
import torch

from metal_marlin_torch.ops import reference

from .conftest import needs_emulator

pytestmark = needs_emulator

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
BLOCKS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", BLOCKS)
def test_matches_torch_bitwise(emu, block, dtype, thread_order):
    # 3 blocks: for small blocks fewer than one threadgroup holds, so idle threads still
    # reach every barrier; leading batch dims are flattened
    x = torch.randn(3, block).to(dtype)
    torch.testing.assert_close(emu.hadamard(x, block), reference.hadamard(x, block), rtol=0, atol=0)


@pytest.mark.parametrize("block", [16, 64, 512])
def test_is_the_normalized_sylvester_transform(emu, block):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(2, 5, 2 * block)
    expect = (x.double().view(2, 5, 2, block) @ h.T / math.sqrt(block)).view(2, 5, 2 * block)
    torch.testing.assert_close(emu.hadamard(x, block).double(), expect, rtol=1e-5, atol=1e-5)


def test_many_rows_and_specials(emu):
    x = torch.randn(37, 128)  # 37 rows of 128: two blocks per threadgroup, last group half idle
    x[0, 3] = float("nan")
    x[1, 0] = float("inf")
    x[2] = 3e37
    out = emu.hadamard(x, 128)
    torch.testing.assert_close(out, reference.hadamard(x, 128), rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(out[0]).all()  # NaN spreads over its whole block, as in the op


def test_inverse(emu):
    x = torch.randn(4, 256)
    torch.testing.assert_close(emu.hadamard(emu.hadamard(x, 64), 64), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("shape", "block", "match"), [
    ((4, 8192), 8192, "power of two in 1..4096"),
    ((4, 64), 48, "power of two"),
    ((4, 96), 64, "divisible by block"),
])
def test_bad_arguments(emu, shape, block, match):
    with pytest.raises(ValueError, match=match):
        emu.hadamard(torch.randn(shape), block)
