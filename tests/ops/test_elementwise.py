"""fake_quantize (seeds/001) and the normalized fast Walsh–Hadamard transform."""

import math

import pytest
import torch
from torch.library import opcheck

from metal_marlin_torch import ops


def sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def test_fake_quantize_seed_table():
    # seeds/001 "Clipping Behavior": [-2, -0.5, 0.5, 2] at 4 bits -> [-1, -0.571, 0.571, 1]
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    y = ops.fake_quantize(x, 4)
    torch.testing.assert_close(y, torch.tensor([-1.0, -4 / 7, 4 / 7, 1.0]))
    # levels table: bits=2 -> {-1, 0, 1}; bits=8 step 1/127
    assert set(ops.fake_quantize(torch.linspace(-1, 1, 101), 2).tolist()) == {-1.0, 0.0, 1.0}
    assert len(set(ops.fake_quantize(torch.linspace(-1, 1, 10001), 8).tolist())) == 255


@pytest.mark.parametrize("bits", range(2, 17))
def test_fake_quantize_is_rounding_to_the_grid(bits):
    s = 2 ** (bits - 1) - 1
    x = torch.rand(1000, dtype=torch.float64) * 3 - 1.5
    y = ops.fake_quantize(x, bits)
    expect = torch.tensor([round(min(max(v, -1.0), 1.0) * s) / s for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(y, expect, rtol=0, atol=1e-12)


def test_fake_quantize_one_bit_and_special_values():
    x = torch.tensor([-3.0, -1e-9, 0.0, 2e-9, 5.0, float("inf"), -float("inf"), float("nan")])
    y1 = ops.fake_quantize(x, 1)
    assert y1[:7].tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0, -1.0]
    assert math.isnan(float(y1[7]))
    y4 = ops.fake_quantize(x, 4)
    assert y4[5] == 1.0 and y4[6] == -1.0 and math.isnan(float(y4[7]))
    assert ops.fake_quantize(torch.randn(8, dtype=torch.bfloat16), 4).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", [0, 17, -1])
def test_fake_quantize_rejects_bits(bits):
    with pytest.raises(ValueError, match="bits must be an int in 1..16"):
        ops.fake_quantize(torch.randn(4), bits)


@pytest.mark.parametrize("block", [1, 2, 16, 64, 256])
def test_hadamard_is_the_sylvester_matrix(block):
    x = torch.randn(3, 2 * block, dtype=torch.float64)
    y = ops.hadamard(x, block)
    h = sylvester(block)
    expect = (x.view(3, 2, block) @ h.T).view(3, 2 * block)
    torch.testing.assert_close(y, expect)
    # orthonormal and self-inverse: applying it twice gives x back
    torch.testing.assert_close(ops.hadamard(y, block), x)


def test_hadamard_dtype_and_errors():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    assert ops.hadamard(x, 32).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="power of two"):
        ops.hadamard(torch.randn(2, 48), 48)
    with pytest.raises(ValueError, match="divisible by block"):
        ops.hadamard(torch.randn(2, 48), 32)


def test_opcheck_elementwise():
    opcheck(torch.ops.marlin.fake_quantize, (torch.randn(33), 4))
    opcheck(torch.ops.marlin.hadamard, (torch.randn(4, 64), 16))
