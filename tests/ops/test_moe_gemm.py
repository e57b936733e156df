"""``marlin::moe_gemm`` against a row-by-row reference built from the formats module."""

from __future__ import annotations

import pytest
import torch

from metal_marlin_torch import formats as F
from metal_marlin_torch import ops
from tests.ops.op_log import OpLog

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def make_experts(fmt: str, group: int, e: int, n: int, k: int, seed: int = 0):
    """Quantize ``e`` random experts ``[n, k]``; returns the per-expert QuantizedTensors and the
    stacked 3-D tensors the op takes."""
    g = torch.Generator().manual_seed(seed)
    qts = [F.quantize(torch.randn(n, k, generator=g), fmt, group) for _ in range(e)]

    def stack(attr):
        parts = [getattr(q, attr) for q in qts]
        return None if parts[0] is None else torch.stack(parts)

    global_scale = stack("global_scale")
    return qts, (stack("weight"), stack("scales"), stack("biases"), global_scale)


def reference(x, ids, qts, bias):
    """Row m times expert ids[m], dequantized by the formats module, in float64."""
    rows = []
    for m in range(x.shape[0]):
        e = int(ids[m])
        y = x[m].double() @ F.dequantize(qts[e]).double().T
        rows.append(y + bias[e].double() if bias is not None else y)
    return torch.stack(rows)


@pytest.mark.parametrize(
    "fmt,group",  # one of each family: codebook, affine (biases), two-level scale, E8M0 scale
    [("fp4", 32), ("int4", 64), ("nvfp4", 16), ("mxfp4", 32), ("nf3", -1), ("int8", 32)],
)
@pytest.mark.parametrize("m", [1, 7, 33])
def test_matches_row_reference(fmt, group, m):
    e, n, k = 4, 24, 64
    qts, (w, s, b, gs) = make_experts(fmt, group, e, n, k)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g) / k**0.5
    ids = torch.randint(0, e - 1, (m,), generator=g)  # expert e-1 never used
    bias = torch.randn(e, n, generator=g)
    for with_bias in (False, True):
        y = ops.moe_gemm(x, ids, w, s, b, gs, bias if with_bias else None, fmt, group)
        ref = reference(x, ids, qts, bias if with_bias else None)
        assert y.shape == (m, n) and y.dtype == x.dtype
        torch.testing.assert_close(y.double(), ref, atol=TOL[torch.float32], rtol=TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_activations(dtype):
    e, n, k = 3, 16, 64
    qts, (w, s, b, gs) = make_experts("fp4", 32, e, n, k)
    x = (torch.randn(9, k) / k**0.5).to(dtype)
    ids = torch.tensor([2, 0, 1, 2, 2, 0, 1, 1, 0], dtype=torch.int32)
    y = ops.moe_gemm(x, ids, w, s, b, gs, None, "fp4", 32)
    assert y.dtype == dtype
    ref = reference(x.float(), ids, qts, None)
    torch.testing.assert_close(y.double(), ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_gradients_match_dense_autograd():
    e, n, k = 3, 8, 32
    qts, (w, s, b, gs) = make_experts("int4", 32, e, n, k)
    dense = torch.stack([F.dequantize(q) for q in qts])
    ids = torch.tensor([1, 1, 0, 2, 1])
    x = torch.randn(5, k, requires_grad=True)
    bias = torch.randn(e, n, requires_grad=True)
    go = torch.randn(5, n)
    ops.moe_gemm(x, ids, w, s, b, gs, bias, "int4", 32).backward(go)
    x2 = x.detach().clone().requires_grad_()
    bias2 = bias.detach().clone().requires_grad_()
    y2 = torch.einsum("mk,mnk->mn", x2, dense[ids]) + bias2[ids]
    y2.backward(go)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bias.grad, bias2.grad, atol=1e-5, rtol=1e-5)


def test_backward_skips_grad_x_when_x_is_frozen():
    e, n, k = 3, 8, 32
    _, (w, s, b, gs) = make_experts("int4", 32, e, n, k)
    ids = torch.tensor([1, 1, 0, 2, 1])
    bias = torch.randn(e, n, requires_grad=True)
    y = ops.moe_gemm(torch.randn(5, k), ids, w, s, b, gs, bias, "int4", 32)
    with OpLog() as log:
        y.sum().backward()
    assert not any("moe_gemm_backward" in name for name in log.names), log.names
    torch.testing.assert_close(bias.grad, torch.bincount(ids, minlength=e)[:, None].float().expand(e, n))


def test_opcheck():
    e, n, k = 2, 8, 32
    _, (w, s, b, gs) = make_experts("int4", 32, e, n, k)
    x = torch.randn(4, k, requires_grad=True)
    ids = torch.tensor([1, 0, 1, 1])
    torch.library.opcheck(torch.ops.marlin.moe_gemm, (x, ids, w, s, b, gs, None, "int4", 32))


def test_fake_kernel_shape():
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, (w, s, b, gs) = make_experts("fp4", 32, 2, 8, 64)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(5, 64, dtype=torch.bfloat16)
        y = torch.ops.marlin.moe_gemm(x, torch.zeros(5, dtype=torch.long), w, s, b, gs, None, "fp4", 32)
    assert y.shape == (5, 8) and y.dtype == torch.bfloat16


def test_empty_batch():
    _, (w, s, b, gs) = make_experts("fp4", 32, 2, 8, 64)
    y = ops.moe_gemm(torch.empty(0, 64), torch.empty(0, dtype=torch.long), w, s, b, gs, None, "fp4", 32)
    assert y.shape == (0, 8)


def test_bad_input_names_the_argument():
    _, (w, s, b, gs) = make_experts("int4", 32, 2, 8, 64)
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match=r"expert_ids must lie in \[0, 2\)"):
        ops.moe_gemm(x, torch.tensor([0, 2, 1]), w, s, b, gs, None, "int4", 32)
    with pytest.raises(ValueError, match="expert_ids must be int32/int64"):
        ops.moe_gemm(x, torch.tensor([0.0, 1.0, 1.0]), w, s, b, gs, None, "int4", 32)
    # x [..., K] takes ids of its leading shape: a 3-D x with 1-D ids is refused
    with pytest.raises(ValueError, match=r"expert_ids must be int32/int64 of x's leading shape \(1, 3\)"):
        ops.moe_gemm(x[None], torch.tensor([0, 1, 1]), w, s, b, gs, None, "int4", 32)
    with pytest.raises(ValueError, match="weight must be 3-D"):
        ops.moe_gemm(x, torch.tensor([0, 1, 1]), w[0], s, b, gs, None, "int4", 32)
    with pytest.raises(ValueError, match="biases"):
        ops.moe_gemm(x, torch.tensor([0, 1, 1]), w, s, None, gs, None, "int4", 32)
    with pytest.raises(ValueError, match="words per row"):
        ops.moe_gemm(torch.randn(3, 32), torch.tensor([0, 1, 1]), w, s, b, gs, None, "int4", 32)
    with pytest.raises(ValueError, match=r"bias must have shape \(2, 8\)"):
        ops.moe_gemm(x, torch.tensor([0, 1, 1]), w, s, b, gs, torch.zeros(8), "int4", 32)


def test_leading_dimensions_match_the_flattened_call():
    # x [T, k, K] with ids [T, k] (a router's layout) equals the same rows flattened to [T*k, K]
    _, (w, s, b, gs) = make_experts("int4", 32, 3, 8, 64)
    x = torch.randn(2, 3, 64)
    ids = torch.tensor([[0, 2, 1], [2, 2, 0]])
    flat = ops.moe_gemm(x.reshape(6, 64), ids.reshape(6), w, s, b, gs, None, "int4", 32)
    y = ops.moe_gemm(x, ids, w, s, b, gs, None, "int4", 32)
    assert y.shape == (2, 3, 8)
    assert torch.equal(y.reshape(6, 8), flat)
    xr = x.clone().requires_grad_(True)
    ops.moe_gemm(xr, ids, w, s, b, gs, None, "int4", 32).sum().backward()
    xf = x.reshape(6, 64).clone().requires_grad_(True)
    ops.moe_gemm(xf, ids.reshape(6), w, s, b, gs, None, "int4", 32).sum().backward()
    assert torch.equal(xr.grad.reshape(6, 64), xf.grad)
