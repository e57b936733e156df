"""The CPU kernels of the decoder-layer ops (ops/layer_cpu.py: torch's fused functions) against
the pure-torch oracle (ops/layer.py): the same math, so equal up to the order of a row's sum
(norms: within an ulp of the dtype) and bitwise where nothing is summed (activations, RoPE);
and the CPU dispatch of torch.ops.marlin runs them."""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch.ops import layer, layer_cpu

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 2e-6}


def _specials(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = float("nan")
    t.view(-1)[-2] = float("inf")
    return t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("specials", [False, True])
def test_norms_match_the_oracle(dtype, residual, specials):
    torch.manual_seed(0)
    x = (torch.randn(2, 3, 300) * 3 + 1).to(dtype)
    x = _specials(x) if specials else x
    w, b = torch.randn(300).to(dtype), torch.randn(300).to(dtype)
    r = torch.randn(2, 3, 300).to(dtype) if residual else None
    cases = [("rms_norm", (x, w, r, 1e-6)), ("layer_norm", (x, w, b, r, 1e-5)),
             ("layer_norm", (x, None, None, r, 1e-5))]
    for name, args in cases:
        got, want = getattr(layer_cpu, name)(*args), getattr(layer, name)(*args)
        assert len(got) == len(want) == (2 if residual else 1)
        torch.testing.assert_close(got[0], want[0], rtol=TOL[dtype], atol=TOL[dtype], equal_nan=True)
        if residual:
            assert torch.equal(got[1].nan_to_num(), want[1].nan_to_num())  # x + residual, one rounding
        if specials:  # a row holding NaN/Inf normalizes to NaN, the others stay finite
            assert torch.isnan(got[0][0, 0]).all() and torch.isfinite(got[0][0, 1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["silu_mul", "gelu_mul"])
def test_gated_acts_equal_the_oracle(dtype, name):
    g, u = _specials(torch.randn(3, 50) * 4).to(dtype), torch.randn(3, 50).to(dtype)
    for args in ((g, u), (torch.cat([g, u], -1), None)):
        got, want = getattr(layer_cpu, name)(*args), getattr(layer, name)(*args)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("interleaved", "half_rot"), [(False, 8), (True, 8), (False, 5), (True, 3)])
def test_rope_equals_the_oracle(dtype, interleaved, half_rot):
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 5, 16).to(dtype), torch.randn(2, 2, 5, 16).to(dtype)
    pos = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 9, 30]])
    inv = 1.0 / (10000.0 ** (torch.arange(half_rot).float() / half_rot))
    got, want = layer_cpu.rope(q, k, pos, inv, 1.3, interleaved), layer.rope(q, k, pos, inv, 1.3, interleaved)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_dispatch_runs_the_fast_kernels():
    x, w = torch.randn(4, 64) * 5 + 3, torch.randn(64)
    got = torch.ops.marlin.layer_norm(x, w, w, None, 1e-5)[0]
    assert torch.equal(got, layer_cpu.layer_norm(x, w, w, None, 1e-5)[0])
    with pytest.raises(ValueError, match="residual must have shape"):
        torch.ops.marlin.rms_norm(x, w, torch.randn(3, 64), 1e-5)  # the oracle's argument checks still run
