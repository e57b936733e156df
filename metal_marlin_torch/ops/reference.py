"""Pure-torch kernels of the ``marlin`` ops: the CPU/CUDA implementation and the oracle that
every other backend (Metal, the emulator, the CUDA fast path) is tested against.

Vectorized throughout (no Python loops over elements), fp32 arithmetic, results cast to the
input's dtype at the end.
"""

from __future__ import annotations

import math

import torch

from .. import formats as F

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32, or kept in fp64 when it is fp64 (never computed below fp32)."""
    return x if x.dtype == torch.float64 else x.float()


def _same_device(where: str, ref: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            raise ValueError(f"{where}: {name} is on {t.device} but x/weight is on {ref.device}")


def check_activation(where: str, x: torch.Tensor) -> None:
    """``x`` has one of the kernels' activation dtypes (``ACTIVATION_DTYPES``)."""
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"{where}: x must be float16/bfloat16/float32, got {x.dtype}")


def check_gemm_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    format: str,
    group_size: int,
) -> F.WeightFormat:
    """Validate ``marlin::gemm`` arguments; returns the format. Errors name the argument."""
    fmt = F.get_format(format)
    check_activation("marlin.gemm", x)
    if x.dim() < 1:
        raise ValueError("marlin.gemm: x must have at least one dimension [..., K]")
    _same_device("marlin.gemm", weight, x=x, scales=scales, biases=biases,
                 global_scale=global_scale, bias=bias)
    fmt.check_tensors(weight, scales, biases, global_scale, group_size, x.shape[-1])
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"marlin.gemm: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    return fmt


def dequantize(weight, scales, biases, global_scale, format, group_size, in_features, dtype):
    fmt = F.get_format(format)
    _same_device("marlin.dequantize", weight, scales=scales, biases=biases, global_scale=global_scale)
    return fmt.dequantize_packed(weight, scales, biases, global_scale, group_size, in_features, dtype)


def gemm(x, weight, scales, biases, global_scale, bias, format, group_size):
    fmt = check_gemm_args(x, weight, scales, biases, global_scale, bias, format, group_size)
    k = x.shape[-1]
    w_hat = fmt.dequantize_packed(weight, scales, biases, global_scale, group_size, k, torch.float32,
                                  check=False)  # check_gemm_args checked them
    y = x.reshape(-1, k).float() @ w_hat.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def canonical_from_prepared(weight, scales, biases, format, group_size, in_features, out_features):
    """``(weight, scales, biases, global_scale)`` in docs/FORMAT.md's layout from a layer in
    the CUDA kernels' layout (``marlin::gemm_prepared``'s tensors). The effective scales of
    mxfp4 / nvfp4 are returned as float32 with a unit global scale (same values)."""
    from .cuda import layout  # plain torch

    fmt = F.get_format(format)
    w = layout.from_k_major(weight, out_features, in_features, fmt.bits)
    s = scales.t().contiguous()
    b = biases.t().contiguous() if biases is not None else None
    return w, s, b


def dequantize_prepared(weight, scales, biases, format, group_size, in_features, out_features,
                        dtype=torch.float32):
    """``W_hat [N, K]`` of a layer in the CUDA kernels' layout (pure torch)."""
    w, s, b = canonical_from_prepared(weight, scales, biases, format, group_size, in_features,
                                      out_features)
    fmt = F.get_format(format)
    if fmt.fixed_scale_dtype is None and not fmt.has_global_scale:
        return fmt.dequantize_packed(w, s, b, None, group_size, in_features, dtype)
    # mxfp4 / nvfp4: the kernels' scales are float32 effective scales of E2M1 codes
    codes = F.unpack(w, fmt.bits, in_features).long()
    grid = torch.tensor(F.E2M1_VALUES, dtype=torch.float32, device=w.device)
    g = group_size
    vals = grid[codes].view(out_features, in_features // g, g) * s.float().unsqueeze(-1)
    return vals.view(out_features, in_features).to(dtype)


def gemm_prepared(x, weight, scales, biases, bias, format, group_size, in_features, out_features):
    """Pure-torch ``marlin::gemm_prepared``: dequantize the kernels' layout, fp32 matmul."""
    check_activation("marlin.gemm_prepared", x)
    if x.shape[-1] != in_features:
        raise ValueError(f"marlin.gemm_prepared: x must have last dim {in_features}, got {tuple(x.shape)}")
    w_hat = dequantize_prepared(weight, scales, biases, format, group_size, in_features,
                                out_features)
    y = x.reshape(-1, in_features).float() @ w_hat.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], out_features)


def quantize(w, format, group_size, scale_dtype):
    qt = F.get_format(format).quantize(w, group_size, scale_dtype)
    # unused outputs are distinct empty tensors: custom-op outputs must not alias each other
    return [qt.weight, qt.scales,
            qt.biases if qt.biases is not None else w.new_empty(0, dtype=torch.float32),
            qt.global_scale if qt.global_scale is not None else w.new_empty(0, dtype=torch.float32)]


def check_fake_quantize_args(x: torch.Tensor, bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"marlin.fake_quantize: bits must be an int in 1..16, got {bits!r}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"marlin.fake_quantize: x must be floating point, got {x.dtype}")


def fake_quantize(x, bits):
    check_fake_quantize_args(x, bits)
    xf = _wide(x)
    if bits == 1:
        # One bit has two levels: sign quantization (+1 for x >= 0). NaN stays NaN.
        y = torch.where(xf < 0, -1.0, 1.0)
        y = torch.where(torch.isnan(xf), xf, y)
    else:
        s = float(2 ** (bits - 1) - 1)
        y = torch.round(xf.clamp(-1.0, 1.0) * s) / s
    return y.to(x.dtype)


def check_hadamard_args(x: torch.Tensor, block: int) -> None:
    if not isinstance(block, int) or block < 1 or block & (block - 1):
        raise ValueError(f"marlin.hadamard: block must be a power of two >= 1, got {block!r}")
    if x.dim() < 1 or x.shape[-1] % block:
        raise ValueError(
            f"marlin.hadamard: last dim {tuple(x.shape)[-1:]} must be divisible by block={block}"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(f"marlin.hadamard: x must be floating point, got {x.dtype}")


def hadamard(x, block):
    """Normalized FWHT of each ``block`` of the last dim, Sylvester order, in fp32 (fp64 for fp64)."""
    check_hadamard_args(x, block)
    shape = x.shape
    y = _wide(x).reshape(-1, shape[-1] // block, block)
    h = 1
    while h < block:
        # butterflies of span h: (a, b) -> (a + b, a - b) over pairs h apart
        y = y.view(y.shape[0], y.shape[1], block // (2 * h), 2, h)
        a, b = y[:, :, :, 0, :], y[:, :, :, 1, :]
        y = torch.stack((a + b, a - b), dim=3).view(y.shape[0], y.shape[1], block)
        h *= 2
    return (y * (1.0 / math.sqrt(block))).reshape(shape).to(x.dtype)
