"""Host side of the CUDA ``marlin::gemm``: check, flatten to M x K, pick a kernel by M, launch.

Paths (thresholds in :data:`GEMV_MAX_M` / :data:`DEQUANT_MIN_M`, measured on an H100, see
docs/CUDA.md and benchmarks/results/):

* ``gemv``: M <= GEMV_MAX_M. Memory bound: every packed word read once, decoded in registers,
  used for all M rows of the program.
* ``gemm``: the tensor-core kernel, weight tiles dequantized in registers.
* ``dequant``: M >= DEQUANT_MIN_M. One Triton pass writes W_hat in the activation dtype, then
  cuBLAS; the extra 4 bytes per weight of traffic are small next to the matmul there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import cache

import torch

from .. import reference
from . import layout
from .layout import KernelFormat

GEMV_MAX_M = 8  # above this, tensor cores win over re-decoding the weight per 8 rows
DEQUANT_MIN_M = 4096  # from here a dequantized copy plus cuBLAS beats the fused GEMM
PATHS = ("gemv", "gemm", "dequant")


@dataclass(frozen=True)
class PreparedWeight:
    """A quantized weight in the form the kernels read (see :func:`prepare_cuda_weight`).

    Attributes:
        kfmt: the format as the kernels see it.
        group_size: G as stored (-1 = per-channel).
        in_features: K.
        weight: ``int32 [N, KW]`` (the uint32 words reinterpreted), canonical or interleaved.
        interleave_block: words per interleave block (docs/CUDA.md), 0 for canonical.
        scales: float ``[N, n_groups]`` effective scales.
        biases: ``[N, n_groups]`` affine biases or None.
        lut: float32 code values on the weight's device (one dummy entry when unused).
    """

    kfmt: KernelFormat
    group_size: int
    in_features: int
    weight: torch.Tensor
    interleave_block: int
    scales: torch.Tensor
    biases: torch.Tensor | None
    lut: torch.Tensor

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def group(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size


@dataclass(frozen=True)
class GemvConfig:
    block_m: int  # activation rows per program
    block_n: int  # weight rows per program
    chunk_codes: int  # inputs per K chunk (a power of two)
    split_k: int  # K splits (fp32 atomics when > 1)
    num_warps: int


@dataclass(frozen=True)
class GemmConfig:
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8


@cache
def _lut(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(values or (0.0,), dtype=torch.float32, device=device)


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``): kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def prepare_cuda_weight(
    weight: torch.Tensor,
    scales: torch.Tensor,
    biases: torch.Tensor | None,
    global_scale: torch.Tensor | None,
    format: str,
    group_size: int,
    in_features: int,
    interleave: bool = False,
    block: int = 64,
    check: bool = True,
) -> PreparedWeight:
    """Turn canonical tensors (docs/FORMAT.md) into a :class:`PreparedWeight`.

    Does the per-weight work once instead of per call: effective float scales for ``mxfp4`` /
    ``nvfp4``, and with ``interleave=True`` the load-time repack of docs/CUDA.md (a new
    tensor; the canonical one is not modified). Call it when a layer moves to CUDA and keep
    the result; :func:`gemm_prepared` then runs the GEMM.
    """
    kfmt = layout.kernel_format(format)
    if check:
        reference.F.get_format(format).check_tensors(
            weight, scales, biases, global_scale, group_size, in_features)
    group = in_features if group_size == -1 else group_size
    w = weight.contiguous()
    iblock = layout.interleave_block(in_features, group, kfmt.bits, block) if interleave else 0
    if iblock:
        w = layout.interleave(w, kfmt.bits, iblock)
    return PreparedWeight(
        kfmt=kfmt,
        group_size=group_size,
        in_features=in_features,
        weight=w.view(torch.int32),
        interleave_block=iblock,
        scales=layout.kernel_scales(format, scales, global_scale).contiguous(),
        biases=biases.contiguous() if kfmt.affine else None,
        lut=_lut(kfmt.lut, weight.device),
    )


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_gemv_config(m: int, n: int, k: int, bits: int, sms: int) -> GemvConfig:
    """Tuned on an H100 (benchmarks/results): 8 rows x 512 inputs per chunk, 4 warps, so each
    thread loads 16 bytes of 4-bit weight per chunk; split K only when the N blocks alone
    cannot give every SM two programs."""
    block_m = min(4, 1 << max(0, (m - 1).bit_length()))  # the kernel takes 1, 2 or 4
    block_n = 8
    chunk = 512 if bits != 8 else 256
    programs = -(-n // block_n) * -(-m // block_m)
    chunks = -(-k // chunk)
    split = 1
    if programs < 2 * sms:
        split = max(1, min(chunks // 2, -(-2 * sms // programs)))
    return GemvConfig(block_m, block_n, chunk, split, 4)


def default_gemm_config(m: int, n: int, k: int, bits: int, sms: int) -> GemmConfig:
    """Tile by M (tuned on an H100, benchmarks/results): small M uses narrow tiles and split-K
    so that there are enough programs; large M uses 128 x 128 tiles."""
    if m <= 16:
        cfg = GemmConfig(16, 64, 128, 1, 4, 4)
    elif m <= 64:
        cfg = GemmConfig(64, 64, 64, 1, 4, 4)
    else:
        cfg = GemmConfig(128, 128, 64, 1, 8, 3)
    tiles = -(-m // cfg.block_m) * -(-n // cfg.block_n)
    if tiles < sms:
        split = max(1, min(-(-sms // tiles), k // (4 * cfg.block_k)))
        cfg = replace(cfg, split_k=split)
    return cfg


def choose_path(m: int) -> str:
    if m <= GEMV_MAX_M:
        return "gemv"
    if m >= DEQUANT_MIN_M:
        return "dequant"
    return "gemm"


def gemm_prepared(
    x: torch.Tensor,
    pw: PreparedWeight,
    bias: torch.Tensor | None = None,
    path: str | None = None,
    config: GemvConfig | GemmConfig | None = None,
) -> torch.Tensor:
    """``x[..., K] @ W_hat.T + bias`` -> ``[..., N]`` in ``x.dtype``, fp32 accumulation.

    ``path`` / ``config`` override the choice by M (benchmarks and tests use them).
    """
    from . import kernels  # Triton: imported on first use only

    k = pw.in_features
    if x.shape[-1] != k:
        raise ValueError(f"marlin.gemm: x must have last dim K={k}, got shape {tuple(x.shape)}")
    n = pw.out_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m == 0 or n == 0:
        return x.new_zeros(*lead, n)
    path = path or choose_path(m)
    if path not in PATHS:
        raise ValueError(f"gemm_prepared: path must be one of {PATHS}, got {path!r}")
    kf = pw.kfmt
    group = pw.group
    biases = pw.biases if pw.biases is not None else pw.scales  # dummy pointer when unused
    has_bias = bias is not None
    bias_arg = bias if has_bias else pw.scales
    sms = _sm_count(x.device)

    if path == "dequant":
        w_hat = torch.empty(n, k, dtype=x.dtype, device=x.device)
        block_n, block_k = 32, 256
        grid = (triton_cdiv(n, block_n), triton_cdiv(k, block_k))
        kernels.dequant_kernel[grid](
            pw.weight, pw.scales, biases, pw.lut, w_hat,
            n, k, group, pw.weight.stride(0), pw.scales.stride(0), w_hat.stride(0),
            BITS=kf.bits, DECODE=kf.decode, AFFINE=kf.affine, SCALE_MUL=kf.scale_mul,
            INTERLEAVED=pw.interleave_block > 0, WT=max(pw.interleave_block, 1),
            SCALE_ROW=(group % block_k == 0 or group == k),
            BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        )
        y = torch.nn.functional.linear(x2, w_hat, bias)
        return y.reshape(*lead, n)

    if path == "gemv":
        cfg = config or default_gemv_config(m, n, k, kf.bits, sms)
        if not isinstance(cfg, GemvConfig):
            raise TypeError(
                f"gemm_prepared: gemv path takes a GemvConfig, got {type(cfg).__name__}")
        cpi = layout.codes_per_item(kf.bits)
        chunk_items = max(1, cfg.chunk_codes // cpi)
        gpb, wt = layout.gemv_chunk(k, group, kf.bits, chunk_items, pw.interleave_block)
        items = layout.items_per_row(k, kf.bits)
        n_chunks = triton_cdiv(items, gpb * wt)
        split = max(1, min(cfg.split_k, n_chunks))
        per_split = triton_cdiv(n_chunks, split)
        split = triton_cdiv(n_chunks, per_split)
        even = items % (gpb * wt) == 0 and n_chunks % split == 0 and n % cfg.block_n == 0
        y = (torch.zeros(m, n, dtype=torch.float32, device=x.device) if split > 1
             else torch.empty(m, n, dtype=x.dtype, device=x.device))
        grid = (triton_cdiv(n, cfg.block_n), triton_cdiv(m, cfg.block_m), split)
        kernels.gemv_kernel[grid](
            x2, pw.weight, pw.scales, biases, pw.lut, bias_arg, y,
            m, n, k, pw.weight.shape[1], items,
            layout.items_per_group(group, k, kf.bits), pw.scales.shape[1], per_split,
            x2.stride(0), pw.weight.stride(0), pw.scales.stride(0), y.stride(0),
            BITS=kf.bits, DECODE=kf.decode, AFFINE=kf.affine, HAS_BIAS=has_bias,
            SCALE_MUL=kf.scale_mul, INTERLEAVED=pw.interleave_block > 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, GPB=gpb, WT=wt, SPLIT_K=split,
            EVEN=even, num_warps=cfg.num_warps,
        )
        return y.to(x.dtype).reshape(*lead, n)

    cfg = config or default_gemm_config(m, n, k, kf.bits, sms)
    if not isinstance(cfg, GemmConfig):
        raise TypeError(f"gemm_prepared: gemm path takes a GemmConfig, got {type(cfg).__name__}")
    k_per_split = triton_cdiv(triton_cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton_cdiv(k, k_per_split)
    y = (torch.zeros(m, n, dtype=torch.float32, device=x.device) if split > 1
         else torch.empty(m, n, dtype=x.dtype, device=x.device))
    grid = (triton_cdiv(m, cfg.block_m) * triton_cdiv(n, cfg.block_n), split)
    kernels.gemm_kernel[grid](
        x2, pw.weight, pw.scales, biases, pw.lut, bias_arg, y,
        m, n, k, group, k_per_split,
        x2.stride(0), pw.weight.stride(0), pw.scales.stride(0), y.stride(0),
        BITS=kf.bits, DECODE=kf.decode, AFFINE=kf.affine, HAS_BIAS=has_bias,
        SCALE_MUL=kf.scale_mul, INTERLEAVED=pw.interleave_block > 0,
        WT=max(pw.interleave_block, 1),
        SCALE_ROW=(group % cfg.block_k == 0 or group == k),
        FP32_DOT=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SPLIT_K=split, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.to(x.dtype).reshape(*lead, n)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm(x, weight, scales, biases, global_scale, bias, format, group_size):
    """The CUDA kernel of ``marlin::gemm`` (same arguments as the op): checks as the pure-torch
    kernel does, then runs :func:`gemm_prepared` on the canonical weight."""
    reference.check_gemm_args(x, weight, scales, biases, global_scale, bias, format, group_size)
    pw = prepare_cuda_weight(weight, scales, biases, global_scale, format, group_size,
                             x.shape[-1], check=False)
    return gemm_prepared(x, pw, bias)


__all__ = [
    "DEQUANT_MIN_M", "GEMV_MAX_M", "GemmConfig", "GemvConfig", "PreparedWeight", "choose_path",
    "default_gemm_config", "default_gemv_config", "gemm", "gemm_prepared", "interpreting",
    "prepare_cuda_weight",
]
