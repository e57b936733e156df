"""Lloyd–Max codebooks: the solver against Max's (1960) published Gaussian quantizers, and the
sphere codebooks against Monte-Carlo samples of rotated random unit vectors."""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch.kv.codebook import expected_mse, lloyd_max_codebook

# J. Max, "Quantizing for minimum distortion", IRE Trans. IT-6 (1960), Table I: positive output
# levels of the MSE-optimal quantizer of N(0, 1), and its mean squared error.
MAX_1960 = {
    2: ([0.4528, 1.510], 0.1175),
    3: ([0.2451, 0.7560, 1.344, 2.152], 0.03454),
    4: ([0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733], 0.009497),
}


@pytest.mark.parametrize("bits", sorted(MAX_1960))
def test_gaussian_solver_reproduces_max_1960(bits):
    levels, mse = MAX_1960[bits]
    c = lloyd_max_codebook(bits, 0, distribution="gaussian")
    torch.testing.assert_close(c[2 ** (bits - 1):].double(), torch.tensor(levels, dtype=torch.float64),
                               rtol=0, atol=1.5e-3)
    assert abs(expected_mse(c, 0, "gaussian") - mse) < 2e-4


def sphere_coordinates(block: int, count: int) -> torch.Tensor:
    """sqrt(B) * one coordinate of uniform random unit vectors (normalized Gaussians)."""
    g = torch.Generator().manual_seed(block)
    x = torch.randn(count // block + 1, block, generator=g, dtype=torch.float64)
    return (x / x.norm(dim=-1, keepdim=True) * block ** 0.5).flatten()[:count]


def nearest(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Index of the nearest level (levels sorted: count the cell edges below t)."""
    c = c.double()
    return torch.bucketize(t, (c[1:] + c[:-1]) / 2)


def quantize(t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return c.double()[nearest(t, c)]


@pytest.mark.parametrize("bits,block", [(4, 8), (4, 64), (5, 64), (6, 256), (8, 64)])
def test_sphere_codebook_levels_are_cell_centroids(bits, block):
    c = lloyd_max_codebook(bits, block)
    assert c.dtype == torch.float32 and c.shape == (2 ** bits,)
    assert torch.all(c[1:] > c[:-1]) and torch.equal(c, -c.flip(0))
    assert c.abs().max() < block ** 0.5
    t = sphere_coordinates(block, 400_000)
    q = quantize(t, c)
    mse = (t - q).pow(2).mean().item()
    assert abs(mse - expected_mse(c, block)) < 0.05 * expected_mse(c, block)
    # centroid condition, checked where a cell holds enough samples for a tight mean
    idx = nearest(t, c)
    count = torch.bincount(idx, minlength=2 ** bits).double()
    mean = torch.bincount(idx, weights=t, minlength=2 ** bits) / count.clamp(min=1)
    var = torch.bincount(idx, weights=t * t, minlength=2 ** bits) / count.clamp(min=1) - mean ** 2
    full = count >= 1000
    se = (var.clamp(min=0) / count.clamp(min=1)).sqrt()
    assert full.sum() >= 2 ** bits // 4
    assert torch.all((mean - c.double()).abs()[full] < 5 * se[full] + 1e-4)


def test_sphere_codebook_beats_the_gaussian_one_on_small_blocks():
    # the reason for the choice: at B = 8 the marginal is far from N(0, 1)
    t = sphere_coordinates(8, 200_000)
    sphere = (t - quantize(t, lloyd_max_codebook(4, 8))).pow(2).mean()
    gauss = (t - quantize(t, lloyd_max_codebook(4, 0, distribution="gaussian"))).pow(2).mean()
    assert sphere < 0.9 * gauss


def test_sphere_codebook_tends_to_the_gaussian_one():
    diff = (lloyd_max_codebook(4, 256) - lloyd_max_codebook(4, 0, distribution="gaussian")).abs().max()
    assert diff < 0.03


def test_codebook_arguments_are_checked():
    with pytest.raises(ValueError, match="bits must be an int in 1..8, got 9"):
        lloyd_max_codebook(9, 64)
    with pytest.raises(ValueError, match="block must be an int >= 2, got 1"):
        lloyd_max_codebook(4, 1)
    with pytest.raises(ValueError, match="distribution must be 'sphere' or 'gaussian'"):
        lloyd_max_codebook(4, 64, distribution="laplace")
