"""Hadamard rotations: the matrix, the fast transform, round trips, the block rule, rotated layers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metal_marlin_torch.nn.config import LayerPlan
from metal_marlin_torch.quant.hadamard import (
    choose_block,
    hadamard_matrix,
    random_signs,
    rotate,
    rotate_hessian,
    unrotate,
)
from metal_marlin_torch.quant.mr_gptq import quantize_linear, rotation_for


def sylvester_entry(n: int) -> torch.Tensor:
    """Closed form of the Sylvester Hadamard matrix: H[i, j] = (-1)^popcount(i & j) / sqrt(n)."""
    i = torch.arange(n).unsqueeze(1)
    j = torch.arange(n).unsqueeze(0)
    bits = i & j
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return (1.0 - 2.0 * parity.double()) / math.sqrt(n)


def blockdiag(h: torch.Tensor, k: int) -> torch.Tensor:
    return torch.block_diag(*[h] * (k // h.shape[0]))


@pytest.mark.parametrize("n", [1, 2, 4, 8, 32, 128])
def test_matrix_is_sylvester_and_orthonormal(n):
    h = hadamard_matrix(n, torch.float64)
    torch.testing.assert_close(h, sylvester_entry(n), rtol=0, atol=1e-15)
    torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("block,k", [(8, 24), (32, 96), (128, 384)])
def test_fast_transform_equals_block_matrix(block, k):
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(block))
    signs = random_signs(k, seed=3)
    expected = (x.double() * signs.double()) @ blockdiag(sylvester_entry(block), k)
    torch.testing.assert_close(rotate(x, block, signs).double(), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("block", [4, 16, 64])
def test_round_trip_is_bit_exact_for_power_of_four_blocks(block):
    # 1/sqrt(block) is a power of two and small integers add exactly in fp32: no rounding at all
    x = torch.randint(-8, 9, (3, 2 * block), generator=torch.Generator().manual_seed(0)).float()
    signs = random_signs(2 * block, seed=1)
    assert torch.equal(unrotate(rotate(x, block, signs), block, signs), x)


@pytest.mark.parametrize("block", [2, 8, 32, 128])
def test_round_trip_other_blocks(block):
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(block))
    torch.testing.assert_close(unrotate(rotate(x, block), block), x, rtol=0, atol=2e-6)


def test_random_signs_are_seeded_plus_minus_one():
    s = random_signs(1000, seed=7)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(s, random_signs(1000, seed=7))
    assert not torch.equal(s, random_signs(1000, seed=8))


@pytest.mark.parametrize("k,block,min_block,expected", [
    (384, 128, 8, 128),     # 384 = 3 * 128
    (1536, 1024, 8, 512),   # 1536 = 3 * 512
    (4096, 128, 8, 128),
    (100, 128, 8, 0),       # largest dividing power of two is 4 < 8: not rotated
    (100, 128, 1, 4),
    (27, 64, 1, 1),         # odd
])
def test_choose_block_rule(k, block, min_block, expected):
    assert choose_block(k, block, min_block) == expected


def test_choose_block_rejects_bad_block():
    with pytest.raises(ValueError, match="power of two"):
        choose_block(64, 48)


def test_rotate_hessian_is_rt_h_r():
    k, b = 64, 16
    x = torch.randn(200, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = (x.T @ x / 200).float()
    signs = random_signs(k, seed=2)
    r = torch.diag(signs.double()) @ blockdiag(sylvester_entry(b), k)
    torch.testing.assert_close(rotate_hessian(h, b, signs).double(), r.T @ h.double() @ r, rtol=0, atol=1e-5)
    # and it is the Hessian of the rotated inputs
    xr = rotate(x.float(), b, signs).double()
    torch.testing.assert_close(rotate_hessian(h, b, signs).double(), xr.T @ xr / 200, rtol=0, atol=1e-5)


def _outlier_linear(n=64, k=256, seed=0) -> nn.Linear:
    gen = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        w = torch.randn(n, k, generator=gen) * 0.02
        w[:, torch.randperm(k, generator=gen)[:4]] *= 40  # a few outlier input channels
        lin.weight.copy_(w)
        lin.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return lin


@pytest.mark.parametrize("signs", [False, True])
def test_rotated_layer_equals_dense_up_to_quantization_error(signs):
    lin = _outlier_linear()
    rot = rotation_for(lin.in_features, 64, signs=signs, seed=5)
    q = quantize_linear(lin, LayerPlan("int8", 32), rotation=rot)
    assert q.rotation_block == 64 and (q.rotation_signs is not None) == signs
    x = torch.randn(10, lin.in_features, generator=torch.Generator().manual_seed(1))
    y = q(x.to(torch.bfloat16)).float()
    with torch.no_grad():
        dense = lin(x)
        # what the layer must compute: x @ W_hat^T with W_hat the stored weight rotated back
        w_hat = unrotate(q.dequantized_weight(), rot.block, rot.signs)
        exact = x @ w_hat.T + lin.bias
    torch.testing.assert_close(y, exact, rtol=2e-2, atol=2e-2)  # bf16 activations
    sqnr = 10 * torch.log10(dense.pow(2).mean() / (y - dense).pow(2).mean())
    assert sqnr > 30, f"int8 rotated layer SQNR {sqnr:.1f} dB"
