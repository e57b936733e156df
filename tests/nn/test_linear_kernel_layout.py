"""MarlinLinear in the CUDA kernels' layout (issue 24 item 3), on CPU: the repack, state_dict,
load_state_dict, dequantized_weight and ``marlin::gemm_prepared`` against the canonical layer.

The repack (``prepare_cuda_weight``) and its inverse are plain torch, so these run without a GPU;
``prepare_kernel_layout`` itself only acts on CUDA (tested in tests/nn/test_linear_cuda.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metal_marlin_torch import MarlinLinear
from metal_marlin_torch.ops.cuda import dispatch as D
from metal_marlin_torch.ops.cuda import layout as L

CASES = [("int4", 128), ("fp4", 32), ("nf4", 64), ("mxfp4", 32), ("nvfp4", 16), ("int3", 128),
         ("int8", 128), ("int2", -1), ("fp8_e4m3", 128)]


def _layer(fmt: str, group: int, n: int = 40, k: int = 256) -> MarlinLinear:
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=True)
    return MarlinLinear.from_linear(lin, fmt, group)


def _prepare_on_cpu(layer: MarlinLinear) -> None:
    pw = D.prepare_cuda_weight(layer.weight, layer.scales, layer.biases, layer.global_scale,
                               layer.format, layer.group_size, layer.in_features)
    layer._install_prepared(pw)


@pytest.mark.parametrize("fmt,group", CASES)
def test_kernel_layout_is_the_only_copy_and_saves_canonical(fmt, group):
    layer = _layer(fmt, group)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    w_hat = layer.dequantized_weight()
    x = torch.randn(3, layer.in_features)
    y_ref = layer(x)
    _prepare_on_cpu(layer)
    assert layer.kernel_layout
    # the weight buffer is the K-major tensor itself: no canonical [N, KW] copy is held
    assert layer.weight.dim() == 3 and layer.weight.shape[2] == L.N_BLOCK
    assert all(b.shape != before["weight"].shape for b in layer.buffers() if b.dtype == torch.int32)
    assert layer.scales.shape == (before["scales"].shape[1], before["scales"].shape[0])
    after = layer.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():  # bit-exact round trip, same dtypes
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k].view(torch.uint8) if v.dtype.itemsize == 1 else after[k],
                           v.view(torch.uint8) if v.dtype.itemsize == 1 else v), k
    torch.testing.assert_close(layer.dequantized_weight(), w_hat, rtol=0, atol=0)
    y = torch.ops.marlin.gemm_prepared(x, layer.weight, layer.scales, layer.biases, layer.bias,
                                       layer.format, layer.group_size, layer.in_features,
                                       layer.out_features)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    layer.to_canonical_layout()
    assert not layer.kernel_layout
    for k, v in layer.state_dict().items():
        assert torch.equal(v.view(torch.uint8) if v.dtype.itemsize == 1 else v,
                           before[k].view(torch.uint8) if v.dtype.itemsize == 1 else before[k]), k


def test_load_state_dict_into_kernel_layout():
    src = _layer("int4", 128)
    dst = _layer("int4", 128, )
    with torch.no_grad():
        dst.weight.zero_()
    _prepare_on_cpu(dst)
    dst.load_state_dict(src.state_dict())
    # prepare_kernel_layout does nothing on CPU: the loaded layer is canonical and equal
    assert not dst.kernel_layout
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k


def test_gemm_prepared_backward_matches_gemm():
    layer = _layer("int4", 128)
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    g_ref = x.grad.clone()
    _prepare_on_cpu(layer)
    x.grad = None
    torch.ops.marlin.gemm_prepared(x, layer.weight, layer.scales, layer.biases, layer.bias,
                                   layer.format, layer.group_size, layer.in_features,
                                   layer.out_features).sum().backward()
    torch.testing.assert_close(x.grad, g_ref)


def test_gemm_prepared_rejects_wrong_k():
    layer = _layer("int4", 128)
    _prepare_on_cpu(layer)
    with pytest.raises(ValueError, match="last dim 256"):
        torch.ops.marlin.gemm_prepared(torch.randn(1, 128), layer.weight, layer.scales, layer.biases,
                                       None, "int4", 128, 256, 40)
