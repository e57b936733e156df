"""Host side of the CUDA ``marlin::gemm``: check, flatten to M x K, pick a kernel by M, launch.

Paths (thresholds in :data:`GEMV_MAX_M` / :data:`DEQUANT_MIN_M`, measured on an H100, see
docs/CUDA.md and benchmarks/results/):

* ``gemv``: M <= GEMV_MAX_M. Every packed word read once, decoded in registers, used for all
  M rows of the program.
* ``gemm``: the tensor-core kernels, weight tiles dequantized in registers: ``gemm_pairs_kernel``
  (int4 / E2M1, 16-bit activations: the weight as the MMA's A operand) or ``gemm_kernel``.
* ``dequant``: M >= DEQUANT_MIN_M (but see FUSED_MAX_M). One Triton pass writes W_hat^T in the
  activation dtype, then cuBLAS. Its extra traffic (write and re-read 2 bytes per weight) costs
  less there than the fused kernels lose by not overlapping dequantization with the tensor
  cores (docs/CUDA.md).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, replace
from functools import cache

import torch

from .. import reference
from . import layout
from .layout import KernelFormat

# Thresholds measured on an H100 (benchmarks/results/sweep_h100.json, int4, Llama-3-8B shapes):
GEMV_MAX_M = 4  # M = 8: the tensor-core kernel (16-row tile, split-K 4) is 0.95x dense, the
#                 GEMV (two 4-row blocks) 0.74x
DEQUANT_MIN_M = 65  # M = 128: dequantize + cuBLAS 0.47x dense, the fused Triton GEMM 0.41x
# ... except for 4-bit formats up to FUSED_MAX_M rows: where one 128-row tile covers M and its
# 64-feature N tiles alone fill the GPU (FUSED_MIN_TILES_PER_SM; E2M1 on the generic tile:
# 4096 x 14336 at M = 128, 0.64x dense fused (128 x 64 x 64) against 0.45x for dequantize +
# cuBLAS, benchmarks/results/sweep_h100_gemm_pairs.json), and on large layers for int4 / E2M1
# with 16-bit activations (FUSED_PAIRS_MIN_WEIGHTS, gemm_pairs_kernel).
FUSED_MAX_M = 128
FUSED_MIN_TILES_PER_SM = 1.5
# Table formats (nf4, nf3): the 64-row tile serializes on its lookups (nf4 at M = 64: 0.06-0.08x
# dense fused, benchmarks/results/bench_gemm_h100.json, where dequantize + cuBLAS runs ~0.45x);
# at M = 32 the two are even (0.39-0.42x fused).
LUT_GEMM_MAX_M = 32
# int4 / E2M1 at M = 65-128 (gemm_pairs_kernel, benchmarks/results/sweep_h100_int4_a.json and
# sweep_h100_pairs_fp4.json): int4 0.81x dense at 4096 x 14336 and 0.58x at 14336 x 4096 against
# 0.45x / 0.48x for dequantize + cuBLAS, fp4 0.79x / 0.66x; at 4096 x 4096 (16.8 M weights)
# int4 0.43x against 0.54x, so dequantize + cuBLAS stays there.
FUSED_PAIRS_MIN_WEIGHTS = 1 << 25
PATHS = ("gemv", "gemm", "dequant")


@dataclass(frozen=True)
class PreparedWeight:
    """A quantized weight in the K-major form the kernels read (see :func:`prepare_cuda_weight`).

    Attributes:
        kfmt: the format as the kernels see it.
        group_size: G as stored (-1 = per-channel).
        in_features: K.
        out_features: N.
        weight: ``int32 [KW, N]``: the canonical uint32 words, transposed (3-bit rows padded to
            whole 3-word units).
        scales: float ``[n_groups, N]`` effective scales.
        biases: ``[n_groups, N]`` affine biases or None.
        lut: float32 code values on the weight's device (one dummy entry when unused).
    """

    kfmt: KernelFormat
    group_size: int
    in_features: int
    out_features: int
    weight: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor | None
    lut: torch.Tensor

    @property
    def group(self) -> int:
        return self.in_features if self.group_size == -1 else self.group_size


@dataclass(frozen=True)
class GemvConfig:
    block_m: int  # activation rows per program: 1, 2 or 4
    block_n: int  # output features per program
    chunk: int  # items (words; 3-word units for 3 bits) per K step, a power of two
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
    group_m: int = 8  # tiles grouped for L2 reuse (M tiles; weight tiles in gemm_pairs_kernel)
    pairs: bool = True  # int4 / E2M1, bf16/fp16: gemm_pairs_kernel (weight as the A operand;
    #                     block_n output features, block_m activation rows per tile)
    asm: bool = False  # int4: its scale and bias in packed bf16x2/f16x2 PTX (faster, less exact)


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
    check: bool = True,
) -> PreparedWeight:
    """The load-time repack of docs/CUDA.md: canonical tensors (docs/FORMAT.md) -> K-major.

    Allocates new tensors (the weight's size again, plus its scales); the canonical ones are
    not modified. Also turns ``mxfp4`` / ``nvfp4`` scales into float32 effective scales. Call
    it once per layer (``torch.ops.marlin.gemm`` on CUDA does, through a per-weight cache) and
    run :func:`gemm_prepared` with the result.
    """
    kfmt = layout.kernel_format(format)
    if check:
        reference.F.get_format(format).check_tensors(
            weight, scales, biases, global_scale, group_size, in_features)
    eff = layout.kernel_scales(format, scales, global_scale)
    return PreparedWeight(
        kfmt=kfmt,
        group_size=group_size,
        in_features=in_features,
        out_features=weight.shape[0],
        weight=layout.k_major(weight, kfmt.bits),
        scales=eff.t().contiguous(),
        biases=biases.t().contiguous() if kfmt.affine else None,
        lut=_lut(kfmt.lut, weight.device),
    )


# ---- per-weight cache of prepared weights ------------------------------------------------------

_cache_enabled = True
_CACHE: dict[tuple, tuple[weakref.ref, PreparedWeight]] = {}


def set_weight_cache(enabled: bool) -> None:
    """Keep (default) or do not keep the K-major copy of each weight between calls of
    ``torch.ops.marlin.gemm``. Without the cache every call repacks (correct, slower); with
    it each CUDA weight also occupies its K-major copy (the packed size again)."""
    global _cache_enabled
    _cache_enabled = bool(enabled)
    if not enabled:
        _CACHE.clear()


def clear_weight_cache() -> None:
    """Drop every cached K-major weight (they are rebuilt on next use)."""
    _CACHE.clear()


def _key(t: torch.Tensor | None) -> tuple:
    return (0, 0) if t is None else (t.data_ptr(), t._version)


def cached_prepare(weight, scales, biases, global_scale, format, group_size, in_features):
    """:func:`prepare_cuda_weight` through the cache: keyed by the tensors' storage and their
    version counters (an in-place update of any of them makes a new entry), held while the
    weight tensor object is alive."""
    if not _cache_enabled:
        return prepare_cuda_weight(weight, scales, biases, global_scale, format, group_size,
                                   in_features, check=False)
    key = (_key(weight), _key(scales), _key(biases), _key(global_scale), format, group_size,
           in_features, weight.shape[0], weight.device)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is weight:
        return hit[1]
    for k in [k for k, (ref, _) in _CACHE.items()
              if ref() is None or k[0][0] == key[0][0]]:  # dead weights, stale versions
        del _CACHE[k]
    pw = prepare_cuda_weight(weight, scales, biases, global_scale, format, group_size,
                             in_features, check=False)
    _CACHE[key] = (weakref.ref(weight), pw)
    return pw


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_gemv_config(m: int, n: int, k: int, bits: int, sms: int,
                        decode: int = layout.DECODE_LUT) -> GemvConfig:
    """Tuned on an H100 (benchmarks/results/sweep_h100*.json). M = 1: 16 features x 128 words
    per step with 8 warps for the integer formats (2.04-2.21x dense for int4 in
    sweep_h100_gemv_m1_b.json, ~12% ahead of 8 x 128 with 4 warps in the same run), 8 x 128 with
    4 warps for the others (3% ahead for fp4); each thread holds 16-byte vectors = one word of 4
    features. M = 2 and 4: 16 x 64. Split K only when the N blocks alone cannot give every SM
    one program: at N = 4096 (256 programs of 16 features on 132 SMs) splitting in two cost
    the zeroed fp32 buffer, the atomics and the cast: int4 4096 x 4096 at M = 1 ran 11.6 us split
    (benchmarks/results/bench_gemm_h100_prev.json) and 7.9 us unsplit (bench_gemm_h100_b.json)."""
    if m == 1:
        block_m, chunk = 1, 128
        block_n, warps = (16, 8) if decode == layout.DECODE_INT else (8, 4)
    elif m == 2:
        block_m, block_n, chunk, warps = 2, 16, 64, 8
    else:
        block_m, block_n, chunk, warps = 4, 16, 64, 4  # the kernel takes 1, 2 or 4 rows
    programs = -(-n // block_n) * -(-m // block_m)
    steps = -(-layout.items_per_row(k, bits) // chunk)
    split = 1
    if programs < sms:  # not one program per SM: split K (fp32 atomics, a zeroed buffer, a cast)
        split = max(1, min(steps // 2, -(-2 * sms // programs)))
    return GemvConfig(block_m, block_n, chunk, split, warps)


def default_gemm_config(m: int, n: int, k: int, bits: int, sms: int) -> GemmConfig:
    """``gemm_kernel`` tiles by M, tuned on an H100 (benchmarks/results/sweep_h100.json): a
    16-row tile with split-K 4 up to M = 16, 32 rows split 2 up to 32, 64 x 64 split 2 up to 64
    (split-K gives the narrow-M tiles enough programs to keep the weight stream busy). int4 and
    E2M1 with 16-bit activations run ``gemm_pairs_kernel`` with :func:`default_pairs_config`."""
    if m <= 16:
        cfg = GemmConfig(16, 64, 128, 4, 4, 4)
    elif m <= 32:
        cfg = GemmConfig(32, 64, 128, 2, 4, 4)
    elif m <= 64:
        cfg = GemmConfig(64, 64, 64, 2, 4, 4, pairs=False)
    else:  # 4096 x 14336, M = 128: 0.64x dense vs 0.47x for the 64 x 64 tile
        cfg = GemmConfig(128, 64, 64, 1, 4, 4, pairs=False)
    return replace(cfg, split_k=max(1, min(cfg.split_k, k // (2 * cfg.block_k))))


def default_pairs_config(m: int, n: int, k: int, sms: int) -> GemmConfig:
    """``gemm_pairs_kernel`` tiles, tuned on an H100 (benchmarks/results/sweep_h100_int4_a.json,
    ratios to dense bf16 at 4096 x 4096 / 4096 x 14336 / 14336 x 4096): M <= 16: 16 rows x 64
    features, split-K 4 (1.07 / 1.34 / 1.24x at M = 16); M <= 32: 32 x 64 split 4 (0.79 / 1.16 /
    1.13x); above, where the 128-feature tiles alone nearly fill the GPU, 64 x 128 split 2 (M <= 64,
    0.96x at 4096 x 14336) or 128 x 64 over all of K, 4 warps (M <= 128, 0.85x against 0.81x for
    128 x 128 with 8 warps, sweep_h100_pairs_m128_b.json), else 64 x 64 split 4 (0.63 / 0.95x at
    M = 64 for the N = 4096 layers, 0.58x at 14336 x 4096, M = 128).
    ``block_n`` (features) is the MMA's M: 64 per warpgroup."""
    wide = -(-n // 128) * -(-m // 128) >= 0.75 * sms
    if m <= 32:
        cfg = GemmConfig(16 if m <= 16 else 32, 64, 128, 4, 4, 3)
    elif wide:
        cfg = GemmConfig(64, 128, 128, 2, 8, 3) if m <= 64 else GemmConfig(128, 64, 128, 1, 4, 3)
    else:
        cfg = GemmConfig(64, 64, 128, 4, 4, 3)
    return replace(cfg, split_k=max(1, min(cfg.split_k, k // (2 * cfg.block_k))))


def pairs_eligible(kf: KernelFormat, dtype: torch.dtype, group: int, k: int, block_k: int) -> bool:
    """``gemm_pairs_kernel`` applies: 4-bit codes, affine integers or E2M1 (fp4, mxfp4, nvfp4),
    bf16/fp16 activations, a tile of ``block_k`` inputs (a multiple of 16: the MMA's K) inside
    one scale group."""
    pairs_format = kf.bits == 4 and (kf.decode == layout.DECODE_E2M1
                                     or (kf.decode == layout.DECODE_INT and kf.affine))
    return (pairs_format and dtype in (torch.bfloat16, torch.float16) and block_k >= 16
            and block_k % 16 == 0 and (group % block_k == 0 or group == k))


def choose_path(m: int, n: int = 0, sms: int = 132, kf: KernelFormat | None = None,
                group_tiles: bool = False, k: int = 0) -> str:
    """``gemv`` up to GEMV_MAX_M rows (but 3-4 rows of int4 / E2M1 on the wide layers take
    ``gemm``: 4096 x 14336 at M = 4, 31.0 us for the pairs kernel's 16-row tile against 43.9 us
    for the 4-row GEMV, benchmarks/results/sweep_h100_m2_4.json; at N = 4096 and at M = 2 the
    GEMV is as fast or faster), ``gemm`` below DEQUANT_MIN_M; up to FUSED_MAX_M rows also
    ``gemm`` for 4-bit formats whose scale groups hold whole 64-input tiles (``group_tiles``:
    measured with group 128): int4 and E2M1 (``gemm_pairs_kernel``) on layers of more than
    FUSED_PAIRS_MIN_WEIGHTS weights, E2M1 also on the wide layers (see the constants); else
    ``dequant``. Table formats take ``dequant`` above LUT_GEMM_MAX_M rows (the lookups of a
    64-row tile serialize: nf4 ran 0.06x dense fused at M = 64 and 128)."""
    wide = -(-n // 64) >= FUSED_MIN_TILES_PER_SM * sms
    pairs_format = kf is not None and kf.bits == 4 and kf.decode in (layout.DECODE_INT,
                                                                    layout.DECODE_E2M1)
    if m <= GEMV_MAX_M:
        return "gemm" if m > 2 and wide and pairs_format and group_tiles else "gemv"
    if kf is not None and kf.decode == layout.DECODE_LUT and m > LUT_GEMM_MAX_M:
        return "dequant"
    if m < DEQUANT_MIN_M:
        return "gemm"
    if m > FUSED_MAX_M or not group_tiles or kf is None or kf.bits != 4:
        return "dequant"
    if pairs_format and k * n > FUSED_PAIRS_MIN_WEIGHTS:
        return "gemm"
    if kf.decode == layout.DECODE_E2M1 and wide:
        return "gemm"
    return "dequant"


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
    sms = _sm_count(x.device)
    path = path or choose_path(m, n, sms, pw.kfmt, pw.group % 64 == 0 or pw.group == k, k)
    if path not in PATHS:
        raise ValueError(f"gemm_prepared: path must be one of {PATHS}, got {path!r}")
    kf = pw.kfmt
    group = pw.group
    biases = pw.biases if pw.biases is not None else pw.scales  # dummy pointer when unused
    has_bias = bias is not None
    bias_arg = bias if has_bias else pw.scales
    common = dict(BITS=kf.bits, DECODE=kf.decode, AFFINE=kf.affine, SCALE_MUL=kf.scale_mul)

    if path == "dequant":
        w_t = torch.empty(k, n, dtype=x.dtype, device=x.device)
        block_n, block_k = 64, 64
        grid = (triton_cdiv(n, block_n), triton_cdiv(k, block_k))
        kernels.dequant_kernel[grid](
            pw.weight, pw.scales, biases, pw.lut, w_t, n, k, group, **common,
            SCALE_ROW=(group % block_k == 0 or group == k),
            BLOCK_N=block_n, BLOCK_K=block_k, EVEN=(k % block_k == 0 and n % block_n == 0),
            num_warps=4,
        )
        y = x2 @ w_t
        if has_bias:
            y += bias
        return y.reshape(*lead, n)

    if path == "gemv":
        cfg = config or default_gemv_config(m, n, k, kf.bits, sms, kf.decode)
        if not isinstance(cfg, GemvConfig):
            raise TypeError(
                f"gemm_prepared: gemv path takes a GemvConfig, got {type(cfg).__name__}")
        if cfg.block_m not in (1, 2, 4):
            raise ValueError(f"GemvConfig.block_m must be 1, 2 or 4, got {cfg.block_m}")
        items = layout.items_per_row(k, kf.bits)
        steps = triton_cdiv(items, cfg.chunk)
        split = max(1, min(cfg.split_k, steps))
        per_split = triton_cdiv(steps, split)
        split = triton_cdiv(steps, per_split)
        even = (items * layout.codes_per_item(kf.bits) == k and items % cfg.chunk == 0
                and steps % split == 0 and n % cfg.block_n == 0)
        y = (torch.zeros(m, n, dtype=torch.float32, device=x.device) if split > 1
             else torch.empty(m, n, dtype=x.dtype, device=x.device))
        grid = (triton_cdiv(n, cfg.block_n), triton_cdiv(m, cfg.block_m), split)
        kernels.gemv_kernel[grid](
            x2, pw.weight, pw.scales, biases, pw.lut, bias_arg, y,
            m, n, k, items, layout.items_per_group(group, k, kf.bits), per_split,
            x2.stride(0), y.stride(0), **common, HAS_BIAS=has_bias,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CH=cfg.chunk, SPLIT_K=split, EVEN=even,
            num_warps=cfg.num_warps,
        )
        return y.to(x.dtype).reshape(*lead, n)

    cfg = config
    if cfg is None:
        cfg = default_pairs_config(m, n, k, sms)
        if not pairs_eligible(kf, x.dtype, group, k, cfg.block_k):
            cfg = default_gemm_config(m, n, k, kf.bits, sms)
    if not isinstance(cfg, GemmConfig):
        raise TypeError(f"gemm_prepared: gemm path takes a GemmConfig, got {type(cfg).__name__}")
    k_per_split = triton_cdiv(triton_cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton_cdiv(k, k_per_split)
    y = (torch.zeros(m, n, dtype=torch.float32, device=x.device) if split > 1
         else torch.empty(m, n, dtype=x.dtype, device=x.device))
    grid = (triton_cdiv(m, cfg.block_m) * triton_cdiv(n, cfg.block_n), split)
    even = k % k_per_split == 0 and k_per_split % cfg.block_k == 0 and n % cfg.block_n == 0
    if cfg.pairs and pairs_eligible(kf, x.dtype, group, k, cfg.block_k):
        kernels.gemm_pairs_kernel[grid](
            x2, pw.weight, pw.scales, biases, bias_arg, y,
            m, n, k, pw.weight.shape[0], group, k_per_split, x2.stride(0), y.stride(0),
            DECODE=kf.decode, AFFINE=kf.affine, SCALE_MUL=kf.scale_mul, HAS_BIAS=has_bias,
            FP16=x.dtype == torch.float16, ASM=cfg.asm,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_N=cfg.group_m,
            SPLIT_K=split, EVEN=even, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return y.to(x.dtype).reshape(*lead, n)
    kernels.gemm_kernel[grid](
        x2, pw.weight, pw.scales, biases, pw.lut, bias_arg, y,
        m, n, k, group, k_per_split, x2.stride(0), y.stride(0), **common, HAS_BIAS=has_bias,
        SCALE_ROW=(group % cfg.block_k == 0 or group == k),
        FP32_DOT=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SPLIT_K=split, EVEN=even,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.to(x.dtype).reshape(*lead, n)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm(x, weight, scales, biases, global_scale, bias, format, group_size):
    """The CUDA kernel of ``marlin::gemm`` (same arguments as the op): checks as the pure-torch
    kernel does, then runs :func:`gemm_prepared` on the canonical weight."""
    reference.check_gemm_args(x, weight, scales, biases, global_scale, bias, format, group_size)
    pw = cached_prepare(weight, scales, biases, global_scale, format, group_size, x.shape[-1])
    return gemm_prepared(x, pw, bias)


__all__ = [
    "DEQUANT_MIN_M", "FUSED_MAX_M", "GEMV_MAX_M", "GemmConfig", "GemvConfig", "PreparedWeight", "choose_path",
    "clear_weight_cache", "default_gemm_config", "default_gemv_config", "default_pairs_config", "gemm",
    "gemm_prepared",
    "interpreting", "prepare_cuda_weight", "set_weight_cache",
]
