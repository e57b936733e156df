"""Host side of the CUDA ``marlin::gemm``: check, flatten to M x K, pick a kernel by M, launch.

Paths (thresholds in :data:`GEMV_MAX_M` / :data:`DEQUANT_MIN_M`, measured on an H100, see
docs/CUDA.md and benchmarks/results/):

* ``gemv``: M <= GEMV_MAX_M. Every packed word read once, decoded in registers, used for all
  M rows of the program.
* ``mma_gemv``: 2 <= M <= MMA_GEMV_MAX_M, affine int4 with 16-bit activations and scale groups
  of whole 128-input steps, where Gluon is available (:mod:`.mma_gemv`): the tensor-core GEMV.
  On sm_90 its operands come in by TMA (warp-specialized), it also takes fp4, and M = 1 on
  layers of at least MMA_GEMV_M1_MIN_WEIGHTS weights and MMA_GEMV_M1_MIN_N features.
* ``gemm``: the tensor-core kernels, weight tiles dequantized in registers: ``gemm_pairs_kernel``
  (int4 / E2M1, 16-bit activations: the weight as the MMA's A operand) or ``gemm_kernel``.
* ``dequant``: M >= DEQUANT_MIN_M (but see FUSED_MAX_M). One Triton pass writes W_hat^T in the
  activation dtype, then cuBLAS. Its extra traffic (write and re-read 2 bytes per weight) costs
  less there than the fused kernels lose by not overlapping dequantization with the tensor
  cores (docs/CUDA.md).
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass, replace
from functools import cache

import torch

from .. import reference
from . import layout
from .launch import Recorded, is_dry, launch, note_workspace, recording
from .layout import KernelFormat

# Thresholds measured on an H100 (benchmarks/results/sweep_h100.json, int4, Llama-3-8B shapes):
GEMV_MAX_M = 4  # M = 8: the tensor-core kernel (16-row tile, split-K 4) is 0.95x dense, the
#                 GEMV (two 4-row blocks) 0.74x
DEQUANT_MIN_M = 65  # M = 128: dequantize + cuBLAS 0.47x dense, the fused Triton GEMM 0.41x
# ... except for int4 / E2M1 up to FUSED_MAX_M rows (below); at M = 256 the pairs kernel and
# dequantize + cuBLAS tie (0.53x geo-mean, benchmarks/results/sweep_h100_m256_pairs.json), at
# 512 dequantize + cuBLAS leads (0.62x against 0.49x).
FUSED_MAX_M = 128
FUSED_MIN_TILES_PER_SM = 1.5  # "wide" layers: 64-feature tiles >= 1.5 per SM
# Table formats (nf4, nf3): the 64-row tile serializes on its lookups (nf4 at M = 64: 0.06-0.08x
# dense fused, benchmarks/results/bench_gemm_h100_before_lut_rule.json, where dequantize + cuBLAS runs ~0.45x);
# at M = 32 the two are even (0.39-0.42x fused).
LUT_GEMM_MAX_M = 32
# int4 / E2M1 at M = 65-128 take gemm_pairs_kernel on every layer since its split-K reduces in
# the kernel (benchmarks/results/sweep_h100_m128_split.json): int4 at 4096 x 4096 0.65x dense
# (split 4) against 0.52x for dequantize + cuBLAS; 0.91x / 0.94x at 4096 x 14336 / 14336 x 4096.
# 2-8 rows of affine int4: the Gluon tensor-core GEMV (benchmarks/results/sweep_h100_mma_gemv.json,
# bf16, group 128). M = 4: 19.5 / 19.8 us on 4096 x 14336 / 14336 x 4096 against 28.3-36.0 us
# for the pairs tile and the 4-row GEMV, 10.7 against 11.0 us (GEMV) at 4096 x 4096; M = 8:
# 20.4 / 20.6 / 11.5 us against 28.6-30.1 / 12.5 us (pairs). M = 2: 19.2 / 19.3 us against
# 24.0-24.1 us for the GEMV on the wide layers, but 10.3 against 9.1 us at 4096 x 4096, so two
# rows take it only on layers of at least MMA_GEMV_M2_MIN_WEIGHTS weights. M = 1 stays on the
# GEMV (17.3 / 18.4 / 9.3 us against 16.9 / 15.7 / 6.5 us).
# Round 7: on sm_90 the TMA-fed, warp-specialized kernel (benchmarks/results/
# sweep_h100_mma_gemv_ws.json, bf16, group 128, default configurations) ran int4 M = 4 in
# 9.2 / 15.1 / 17.4 us on 4096 x 4096 / 4096 x 14336 / 14336 x 4096 (the 4096 x 4096 default
# row read 109 us once, a disturbance) against 11.3 / 19.5 / 25.0 us for the best register-fed
# configuration timed. At M = 1 it ran 15.0 against 16.7 us for the GEMV at 4096 x 14336, but
# 16.8 against 15.8 us at 14336 x 4096 and 8.8 against 6.4 us at 4096 x 4096, so one row takes
# it only on layers of MMA_GEMV_M1_MIN_WEIGHTS weights with MMA_GEMV_M1_MIN_N features or more.
MMA_GEMV_MIN_M = 2
MMA_GEMV_MAX_M = 8
MMA_GEMV_M2_MIN_WEIGHTS = 1 << 25
MMA_GEMV_M1_MIN_WEIGHTS = 1 << 25
MMA_GEMV_M1_MIN_N = 8192
# Eager calls (not captured in a CUDA graph) do not take the TMA-fed GEMV: its launch encodes
# four TMA descriptors on the host (Triton's launcher, every call) and builds one over the
# activation, which costs more than its GPU-time gain at decode sizes. Measured on the H200
# (bench_decode_h200.md, issue 24): eager generate() ran int4 at 0.88x and fp4 at 0.74x dense
# with it on the MLP's wide layers, nf4 (GEMV everywhere) at 1.14x. Captured launches (CUDA
# graphs, torch.compile's reduce-overhead) still take it: there the host work is paid once.
EAGER_TMA = False
PATHS = ("gemv", "mma_gemv", "gemm", "dequant")
# Dequantize path: W_hat^T is written in slices of about this many bytes, each multiplied by
# cuBLAS right after it is written (0: the whole W_hat^T at once). Off: on the H200 at M = 2048
# every slice width was slower than one pass (int4 4096 x 14336: 345.0 us whole against 355.9 /
# 368.6 / 399.6 / 467.8 us in slices of 4096 / 2048 / 1024 / 512 features; the slice kept in L2
# did not save its DRAM round trip, and thinner GEMMs lost more;
# benchmarks/results/profile_decode_h200_shapes.md).
DEQUANT_SLICE_BYTES = 0
DEQUANT_SLICE_ALIGN = 64  # features: dequant_kernel's tile
DEQUANT_SLICE_MIN_COLS = 256
# Dequantize path: W_hat written [N, K] (nn.Linear's layout, cuBLAS "TN" as dense layers run)
# instead of W_hat^T [K, N].
DEQUANT_NK = False
ONE_BITS = 0x3F800000  # float32 1.0: gemv_kernel takes it at run time (kernels._unit_field)


@dataclass(frozen=True)
class PreparedWeight:
    """A quantized weight in the K-major form the kernels read (see :func:`prepare_cuda_weight`).

    Attributes:
        kfmt: the format as the kernels see it.
        group_size: G as stored (-1 = per-channel).
        in_features: K.
        out_features: N.
        weight: ``int32 [ceil(N / 16), KW, 16]``: the canonical uint32 words, K-major inside
            blocks of 16 features (layout.k_major; 3-, 5- and 6-bit rows padded to whole units).
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
    chunk: int  # items (words; bits-word units for 3, 5, 6 bits) per K step, a power of two
    split_k: int  # K splits (reduced in the kernel through a workspace when > 1)
    num_warps: int
    maxnreg: int | None = None  # register cap a thread (ptxas), to fit more programs on an SM


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


@dataclass(frozen=True)
class MmaGemvConfig:
    """``warps``: warps a program (32 output features each); ``split_k``: K splits (scale
    groups are not cut by the register-fed kernel); ``prefetch``: 128-input steps of words
    loaded ahead in registers (1 or 2); ``stages``: 0 for that register-fed kernel, 2-8 for the
    TMA-fed one (sm_90; shared-memory stages of one 128-input step; ``warps`` compute warps,
    4 or 8, plus one producer warp)."""

    warps: int
    split_k: int
    prefetch: int = 1
    stages: int = 0


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
    if _in_graph_pool(weight.device):
        # The repacked tensors were allocated in a CUDA graph's private pool (the weight is
        # then usually cudagraph trees' per-replay copy of a non-static input): caching them
        # would keep pool memory alive past the region, which cudagraph trees refuse
        # ("tensor(s) in the cudagraph pool not tracked as outputs"). The graph repacks on
        # each replay instead; layers (MarlinLinear) never come here, their plan holds the
        # kernels' layout.
        return pw
    if weight.device.type == "cuda" and not torch.compiler.is_compiling():
        reserve_split_workspace(weight.device, *workspace_need(pw, weight.device))
    _CACHE[key] = (weakref.ref(weight), pw)
    return pw


_SPLIT_BUFFERS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: list[tuple[torch.Tensor, torch.Tensor]] = []


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _in_graph_pool(device: torch.device) -> bool:
    """New allocations go to a CUDA graph's private pool: a stream capture, or the warm-up or
    recording of a cudagraph-trees function (torch.compile mode "reduce-overhead"), whose
    warm-up allocates from the pool without capturing."""
    if device.type != "cuda":
        return False
    if _capturing(device):
        return True
    trees = sys.modules.get("torch._inductor.cudagraph_trees")  # imported by inductor only
    if trees is None:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    manager = trees.get_manager(index, create_if_none_exists=False)
    return manager is not None and (manager.in_warmup or manager.in_recording)


def reserve_split_workspace(device: torch.device, numel: int, tiles: int) -> None:
    """Grow the device's shared split-K workspace to ``numel`` fp32 partials and ``tiles``
    zeroed counters. Called where allocating is safe: when a weight is prepared (a layer's
    load or first eager call, :func:`cached_prepare`), never from inside a compiled or captured
    region, so the buffers that captured graphs use never come from a graph's memory pool
    (torch.compile's cudagraph trees refuse a region that leaves tensors of its pool alive:
    "Detected 2 tensor(s) in the cudagraph pool not tracked as outputs", issue 24)."""
    if numel <= 0 and tiles <= 0:
        return
    key = str(device)
    ws, cnt = _SPLIT_BUFFERS.get(key, (None, None))
    if ws is not None and ws.numel() >= numel and cnt.numel() >= tiles:
        return
    if ws is not None:
        # a graph captured earlier may hold the old pointers: keep them alive
        _RETIRED.append((ws, cnt))
    numel = max(numel, 1 << 20, 0 if ws is None else 2 * ws.numel())
    tiles = max(tiles, 4096, 0 if cnt is None else cnt.numel())
    _SPLIT_BUFFERS[key] = (torch.empty(numel, dtype=torch.float32, device=device),
                           torch.zeros(tiles, dtype=torch.int32, device=device))


def split_buffers(device: torch.device, numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 workspace of ``numel`` partials and ``tiles`` zeroed int32 counters for a split-K
    launch (kernels._split_arrive): the device's shared buffers (:func:`reserve_split_workspace`).

    The kernels leave the counters at zero, so they are zeroed only when allocated, and launches
    can share them as long as they do not run at the same time: one device's launches run on
    one stream at a time (two streams running split-K launches concurrently would need their
    own buffers; nothing in this package does that). A launch that needs more than was
    reserved (a weight prepared by hand, a config override) gets fresh buffers while a graph
    is captured or a function compiled (temporaries of that region, never kept), and grows
    the shared ones otherwise.
    """
    ws, cnt = _SPLIT_BUFFERS.get(str(device), (None, None))
    if ws is not None and ws.numel() >= numel and cnt.numel() >= tiles:
        return ws, cnt
    if _capturing(device) or torch.compiler.is_compiling():
        return (torch.empty(numel, dtype=torch.float32, device=device),
                torch.zeros(tiles, dtype=torch.int32, device=device))
    reserve_split_workspace(device, numel, tiles)
    return _SPLIT_BUFFERS[str(device)]


# rows at which the dispatch's choices change (paths and split factors are constant between):
# the largest workspace of a weight is needed at one of them
_NEED_ROWS = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32, 64, FUSED_MAX_M)
_NEED_CACHE: dict[tuple, tuple[int, int]] = {}


def workspace_need(pw: PreparedWeight, device: torch.device) -> tuple[int, int]:
    """The largest split-K workspace (fp32 partials, tile counters) any call of
    :func:`gemm_prepared` on ``pw`` can ask for: the dispatch run dry (no launch) at the row
    counts where its choices change, for 16-bit and float32 activations."""
    key = (pw.kfmt, pw.group_size, pw.in_features, pw.out_features, str(device))
    got = _NEED_CACHE.get(key)
    if got is not None:
        return got
    from .launch import dry_run

    numel = tiles = 0
    with dry_run() as log:
        for dtype in (torch.bfloat16, torch.float32):
            for m in _NEED_ROWS:
                x = torch.empty(m, pw.in_features, dtype=dtype, device=device)
                gemm_prepared(x, pw)
    for entry in log:
        if entry[0] == "workspace":
            numel, tiles = max(numel, entry[1]), max(tiles, entry[2])
    _NEED_CACHE[key] = (numel, tiles)
    return numel, tiles


@cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_gemv_config(m: int, n: int, k: int, bits: int, sms: int,
                        decode: int = layout.DECODE_LUT) -> GemvConfig:
    """Tuned on an H100 with the blocked K-major weight
    (benchmarks/results/sweep_h100_m1_gemv_blocked_b.json). M = 1: 16 features x 128 words per
    step with 8 warps for 2/4-bit integer and E2M1 codes (int4: 6.9 / 18.5 / 19.2 us at
    4096 x 4096 / 4096 x 14336 / 14336 x 4096), 8 x 128 with 4 warps for the others (int8
    10.0 / 28.3 / 28.7 us against 9.8 / 29.3 / 32.7 us for 16 x 128; nf4 9.7 / 25.8 / 26.9 us
    against 18.9 / 62.6 / 56.6 us). At 16 x 128 x 8 warps a thread holds one word of 8
    features (two 16-byte vectors). The 2/4-bit integer and E2M1 tile is capped at 80
    registers a thread (ptxas wanted 98-103 for int4: two programs an SM; at 80 three, no
    spills: benchmarks/results/gemv_sass_sm90_maxnreg80.json): int4 4096 x 14336 17.1-17.6 us
    against 19.1-19.3 us, fp4 2-7% faster on every shape, the rest within the spread
    (sweep_h100_m1_gemv_round4.json, sweep_h100_m1_gemv_stream_k_div.json). M = 2 and 4:
    16 x 64. Split K only when the N blocks alone cannot give every SM one program (a split
    costs a partial round trip through the workspace)."""
    maxnreg = None
    if m == 1:
        block_m, chunk = 1, 128
        fast = bits in (2, 4) and decode in (layout.DECODE_INT, layout.DECODE_E2M1)
        block_n, warps = (16, 8) if fast else (8, 4)
        if fast:
            maxnreg = 80  # three 8-warp programs an SM instead of two, no spills
    elif m == 2:
        block_m, block_n, chunk, warps = 2, 16, 64, 8
    else:
        block_m, block_n, chunk, warps = 4, 16, 64, 4  # the kernel takes 1, 2 or 4 rows
    programs = -(-n // block_n) * -(-m // block_m)
    steps = -(-layout.items_per_row(k, bits) // chunk)
    split = 1
    if programs < sms:  # not one program per SM: split K
        split = max(1, min(steps // 2, -(-2 * sms // programs)))
    return GemvConfig(block_m, block_n, chunk, split, warps, maxnreg)


def default_mma_gemv_config(n: int, k: int, group: int, sms: int,
                            tma: bool = False) -> MmaGemvConfig:
    """Register-fed (``tma`` False): 4 warps (2 where N is not a multiple of 128); K split in
    powers of two until the grid has three programs an SM, at most one split per scale group.
    On the H100 (benchmarks/results/sweep_h100_mma_gemv.json, M = 1-8, the three Llama-3-8B
    shapes) it ran 0-9% behind the best of the six configurations timed.

    TMA-fed (sm_90, warp-specialized): 4 compute warps (128 features) and 4 stages; K split
    in powers of two while the grid stays within one program an SM (at most one split a
    128-input step). With the producer / consumer split, more programs than SMs ran slower:
    the kernel holds 255 registers a thread (benchmarks/results/mma_gemv_sass_sm90.json), so
    the register file takes one program of 5 warps an SM. Prototype sweep of this kernel
    (benchmarks/results/sweep_h100_mma_gemv_ws_proto.json, int4, bf16 scales, M = 1):
    4096 x 14336 15.4 us unsplit (112 programs) against 19.0 us with 2 splits; 14336 x 4096
    16.0 us with 4 splits (128 programs) against 19.7 us with 8; 4096 x 4096 7.6 us with 4
    splits against 10.5 us with 8. The shipped kernel (sweep_h100_mma_gemv_ws.json): the
    default was within 3% of the best of the six TMA-fed configurations timed in every cell
    but one disturbed row."""
    if tma:
        programs = n // 128
        split = 1
        while programs * split * 2 <= sms and split * 2 <= k // 128:
            split *= 2
        return MmaGemvConfig(4, split, stages=4)
    warps = 4 if n % 128 == 0 else 2
    programs = n // (32 * warps)
    split = 1
    while programs * split < 3 * sms and split * 2 <= k // group:
        split *= 2
    return MmaGemvConfig(warps, split)


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


def straddle_gemm_config(cfg: GemmConfig, group: int, k: int) -> GemmConfig:
    """``cfg`` fitted to 5- and 6-bit codes: a K tile inside one scale group (at most 64 inputs)
    and at most 3 stages. The straddling decode gathers two words per input and, when the tile
    spans groups, a scale and a bias per input, and Triton's pipeliner stages all of them in
    shared memory: the default 16 x 64 x 128 tile with 4 stages asked for 316 KB on the H200
    (int5 g64 / int6 g32, N = 384, K = 1024, M = 8: OutOfResources, limit 227 KB). Tiles of
    at most 64 inputs inside a group ran there (tests/ops/test_gemm_cuda.py forced configs).
    Not tuned for speed."""
    block_k = min(cfg.block_k, 64, group if group < k else 64)
    return replace(cfg, block_k=block_k, num_stages=min(cfg.num_stages, 3),
                   split_k=max(1, min(cfg.split_k, k // (2 * block_k))))


def default_pairs_config(m: int, n: int, k: int, sms: int) -> GemmConfig:
    """``gemm_pairs_kernel`` tiles, tuned on an H100 with the in-kernel split-K reduction
    (benchmarks/results/sweep_h100_m16_64_split.json, sweep_h100_m128_split.json): 16 / 32 /
    64 / 128 activation rows x 64 features (``block_n`` is the MMA's M: 64 per warpgroup),
    128 inputs per step, 4 warps. K is split until the tiles give the SMs several programs
    each: where the 64-feature tiles number fewer than the SMs (N = 4096), 8 splits up to
    M = 32 (int4 at 4096 x 4096, M = 16: 11.7 us against 13.4 us for 4 splits), 4 at M = 64
    and 128 (14336 x 4096, M = 128: 57.7 us, 0.94x dense, against 136.5 us unsplit); on wide
    layers 4 / 2 / 2 / 1 (4096 x 14336, M = 128: 51.8 us unsplit, 78.1 us split 4)."""
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    tiles = -(-n // 64) * -(-m // block_m)
    if tiles < sms:
        split = 8 if m <= 32 else 4
    else:
        split = 4 if m <= 16 else 2 if m <= 64 else 1
    cfg = GemmConfig(block_m, 64, 128, split, 4, 3)
    return replace(cfg, split_k=max(1, min(cfg.split_k, k // (2 * cfg.block_k))))


def pairs_eligible(kf: KernelFormat, dtype: torch.dtype, group: int, k: int, block_k: int) -> bool:
    """``gemm_pairs_kernel`` applies: 4-bit codes, affine integers or E2M1 (fp4, mxfp4, nvfp4),
    bf16/fp16 activations, a tile of ``block_k`` inputs (a multiple of 16: the MMA's K) inside
    one scale group."""
    pairs_format = kf.bits == 4 and (kf.decode == layout.DECODE_E2M1
                                     or (kf.decode == layout.DECODE_INT and kf.affine))
    return (pairs_format and dtype in (torch.bfloat16, torch.float16) and block_k >= 16
            and block_k % 16 == 0 and (group % block_k == 0 or group == k))


def mma_gemv_eligible(kf: KernelFormat, dtype: torch.dtype, group_size: int, k: int,
                      n: int, tma: bool = False) -> bool:
    """The tensor-core GEMV (:mod:`.mma_gemv`) applies: affine int4 codes (or, for the TMA-fed
    kernel, ``tma``, also E2M1 codes with a plain scale: fp4; mxfp4 / nvfp4 groups are too
    small), bf16/fp16 activations, scale groups of whole 128-input steps (not per-channel) and
    N a multiple of 64 (two 16-feature blocks a warp, 2 warps at least; 128 for the TMA-fed
    kernel, 4 compute warps)."""
    codes = kf.bits == 4 and ((kf.decode == layout.DECODE_INT and kf.affine)
                              or (tma and kf.decode == layout.DECODE_E2M1))
    if tma and n % 128:  # the TMA-fed kernel: 4 compute warps of 32 features at least
        return False
    return (codes and dtype in (torch.bfloat16, torch.float16) and group_size > 0
            and group_size % 128 == 0 and k % group_size == 0 and n % 64 == 0)


@cache
def mma_gemv_unavailable_reason(device: torch.device | None = None) -> str:
    """Empty when the Gluon tensor-core GEMV can run on ``device``, else why not (Triton
    without ``triton.experimental.gluon``, its CPU interpreter, or a GPU before sm_80)."""
    if interpreting():
        return "Triton's CPU interpreter does not run Gluon kernels"
    try:
        from . import mma_gemv  # noqa: F401 - Gluon, Triton >= 3.6
    except (ImportError, AttributeError) as exc:
        return f"Gluon (triton.experimental.gluon) unavailable: {type(exc).__name__}: {exc}"
    if device is not None and device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return f"needs sm_80 or newer (mma.sync bf16), this GPU is sm_{major}{minor}"
    return ""


@cache
def mma_gemv_tma_unavailable_reason(device: torch.device | None = None) -> str:
    """Empty when the TMA-fed tensor-core GEMV can run on ``device`` (a GPU of sm_90 or newer
    where the register-fed one runs), else why not."""
    reason = mma_gemv_unavailable_reason(device)
    if reason:
        return reason
    if device is None or device.type != "cuda":
        return "needs a CUDA device"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"needs sm_90 or newer (TMA), this GPU is sm_{major}{minor}"
    return ""


def gemv_takes_group(group: int, k: int, bits: int) -> bool:
    """Whether ``gemv_kernel`` can scale per group: its items (a word, or at 3 bits a 3-word unit
    of 32 codes) must not straddle two groups, so 3-bit groups of 16 (GGUF Q3_K imports) take
    the gemm kernel, whose tiles look a scale up per input."""
    return group == k or group % layout.codes_per_item(bits) == 0


def choose_path(m: int, n: int = 0, sms: int = 132, kf: KernelFormat | None = None,
                group_tiles: bool = False, k: int = 0, mma_gemv: bool = False,
                tma: bool = False) -> str:
    """``mma_gemv`` for MMA_GEMV_MIN_M to MMA_GEMV_MAX_M rows where it applies and runs
    (``mma_gemv``: :func:`mma_gemv_eligible` and no :func:`mma_gemv_unavailable_reason`; two rows
    only on layers of MMA_GEMV_M2_MIN_WEIGHTS weights or more), and for one row where its
    TMA-fed kernel runs (``tma``) on layers of MMA_GEMV_M1_MIN_WEIGHTS weights or more and
    MMA_GEMV_M1_MIN_N features or more.
    Otherwise ``gemv`` up to GEMV_MAX_M rows (but 3-4 rows of int4 / E2M1 on the wide layers take
    ``gemm``: 4096 x 14336 at M = 4, 31.0 us for the pairs kernel's 16-row tile against 43.9 us
    for the 4-row GEMV, benchmarks/results/sweep_h100_m2_4.json; at N = 4096 and at M = 2 the
    GEMV is as fast or faster), ``gemm`` below DEQUANT_MIN_M; up to FUSED_MAX_M rows also
    ``gemm`` for int4 and E2M1 whose scale groups hold whole 64-input tiles (``group_tiles``:
    measured with group 128; ``gemm_pairs_kernel``, see the constants); else ``dequant``.
    Table formats take ``dequant`` above LUT_GEMM_MAX_M rows (the lookups of a 64-row tile
    serialize: nf4 ran 0.06x dense fused at M = 64 and 128)."""
    if mma_gemv and MMA_GEMV_MIN_M <= m <= MMA_GEMV_MAX_M and (
            m > 2 or n * k >= MMA_GEMV_M2_MIN_WEIGHTS):
        return "mma_gemv"
    if (mma_gemv and tma and m == 1 and n >= MMA_GEMV_M1_MIN_N
            and n * k >= MMA_GEMV_M1_MIN_WEIGHTS):
        return "mma_gemv"
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
    return "gemm" if pairs_format else "dequant"


def gemm_prepared(
    x: torch.Tensor,
    pw: PreparedWeight,
    bias: torch.Tensor | None = None,
    path: str | None = None,
    config: GemvConfig | GemmConfig | MmaGemvConfig | None = None,
    tma: bool = True,
    slice_cols: int | None = None,
    dequant_nk: bool | None = None,
) -> torch.Tensor:
    """``x[..., K] @ W_hat.T + bias`` -> ``[..., N]`` in ``x.dtype``, fp32 accumulation.

    ``path`` / ``config`` override the choice by M (benchmarks and tests use them). ``tma``
    False keeps the choice by M off the TMA-fed GEMV (:data:`EAGER_TMA`: eager replays).
    ``slice_cols`` overrides the dequantize path's slice width (:func:`dequant_slice_cols`),
    ``dequant_nk`` its layout of the dequantized weight (:data:`DEQUANT_NK`).
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
    kf = pw.kfmt
    if path is None:
        small = m <= MMA_GEMV_MAX_M
        tma = (tma and small and mma_gemv_eligible(kf, x.dtype, pw.group_size, k, n, True)
               and not mma_gemv_tma_unavailable_reason(x.device))
        mma = tma or (small and mma_gemv_eligible(kf, x.dtype, pw.group_size, k, n)
                      and not mma_gemv_unavailable_reason(x.device))
        path = choose_path(m, n, sms, kf, pw.group % 64 == 0 or pw.group == k, k, mma, tma)
        if path == "gemv" and not gemv_takes_group(pw.group, k, kf.bits):
            path = "gemm"
    if path not in PATHS:
        raise ValueError(f"gemm_prepared: path must be one of {PATHS}, got {path!r}")
    if path == "gemv" and not gemv_takes_group(pw.group, k, kf.bits):
        raise ValueError(f"gemm_prepared: the gemv path needs scale groups of whole items "
                         f"({layout.codes_per_item(kf.bits)} codes at {kf.bits} bits), got group {pw.group}")
    group = pw.group
    biases = pw.biases if pw.biases is not None else pw.scales  # dummy pointer when unused
    has_bias = bias is not None
    bias_arg = bias if has_bias else pw.scales
    common = dict(BITS=kf.bits, DECODE=kf.decode, AFFINE=kf.affine, SCALE_MUL=kf.scale_mul)

    if path == "dequant":
        if is_dry():
            return x.new_empty(*lead, n)
        width = dequant_slice_cols(n, k, x.element_size()) if slice_cols is None else slice_cols
        nk = DEQUANT_NK if dequant_nk is None else dequant_nk
        if width >= n:
            w = torch.empty((n, k) if nk else (k, n), dtype=x.dtype, device=x.device)
            dequant_slice(pw, 0, n, w, nk)
            y = x2 @ (w.t() if nk else w)
        else:
            # W_hat^T a slice of features at a time through one buffer that stays in L2: cuBLAS
            # reads each slice from L2 right after it is written, and the next slice overwrites
            # the buffer's lines while they are still there (DEQUANT_SLICE_BYTES)
            y = torch.empty(m, n, dtype=x.dtype, device=x.device)
            buf = torch.empty((width, k) if nk else (k, width), dtype=x.dtype, device=x.device)
            for n0 in range(0, n, width):
                n1 = min(n, n0 + width)
                part = buf[:n1 - n0] if nk else buf[:, :n1 - n0]
                dequant_slice(pw, n0, n1, part, nk)
                torch.mm(x2, part.t() if nk else part, out=y[:, n0:n1])
        if has_bias:
            y += bias
        return y.reshape(*lead, n)

    if path == "mma_gemv":
        from . import mma_gemv

        if config is not None and not isinstance(config, MmaGemvConfig):
            raise TypeError(f"gemm_prepared: mma_gemv path takes an MmaGemvConfig, got "
                            f"{type(config).__name__}")
        reason = mma_gemv_unavailable_reason(x.device)
        if reason:
            raise RuntimeError(f"gemm_prepared: the mma_gemv path cannot run here: {reason}")
        tma_reason = mma_gemv_tma_unavailable_reason(x.device)
        if config is not None and config.stages and tma_reason:
            raise RuntimeError(f"gemm_prepared: MmaGemvConfig.stages={config.stages} asks for the "
                               f"TMA-fed kernel, which cannot run here: {tma_reason}")
        tma = not tma_reason and (config.stages > 0 if config is not None else
                                  mma_gemv_eligible(kf, x.dtype, pw.group_size, k, n, True))
        if not mma_gemv_eligible(kf, x.dtype, pw.group_size, k, n, tma) or m > MMA_GEMV_MAX_M:
            raise ValueError(
                f"gemm_prepared: the mma_gemv path takes up to {MMA_GEMV_MAX_M} rows of affine "
                f"int4 (and fp4 with the TMA-fed kernel, sm_90) with bf16/fp16 activations, "
                f"groups a multiple of 128 dividing K and N a multiple of 64 (TMA-fed: 128); "
                f"got M={m}, "
                f"format={kf.name}, dtype={x.dtype}, group_size={pw.group_size}, K={k}, N={n}, "
                f"TMA-fed={tma}")
        cfg = config or default_mma_gemv_config(n, k, pw.group, sms, tma)
        y = mma_gemv.launch(x2, pw, bias, _split_args, cfg)
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
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        grid = (triton_cdiv(n, cfg.block_n), triton_cdiv(m, cfg.block_m), split)
        ws, cnt = _split_args(y, split, grid[0] * grid[1])
        launch(
            kernels.gemv_kernel, grid, x2, pw.weight, pw.scales, biases, pw.lut, bias_arg, y, ws, cnt,
            m, n, k, items, layout.items_per_group(group, k, kf.bits), per_split,
            x2.stride(0), y.stride(0), ONE_BITS, **common, HAS_BIAS=has_bias,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CH=cfg.chunk, SPLIT_K=split, EVEN=even,
            num_warps=cfg.num_warps, **({} if cfg.maxnreg is None else {"maxnreg": cfg.maxnreg}),
        )
        return y.reshape(*lead, n)

    cfg = config
    if cfg is None:
        cfg = default_pairs_config(m, n, k, sms)
        if not pairs_eligible(kf, x.dtype, group, k, cfg.block_k):
            cfg = default_gemm_config(m, n, k, kf.bits, sms)
            if kf.bits in (5, 6):
                cfg = straddle_gemm_config(cfg, group, k)
    if not isinstance(cfg, GemmConfig):
        raise TypeError(f"gemm_prepared: gemm path takes a GemmConfig, got {type(cfg).__name__}")
    k_per_split = triton_cdiv(triton_cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton_cdiv(k, k_per_split)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton_cdiv(m, cfg.block_m) * triton_cdiv(n, cfg.block_n), split)
    ws, cnt = _split_args(y, split, grid[0])
    even = k % k_per_split == 0 and k_per_split % cfg.block_k == 0 and n % cfg.block_n == 0
    if cfg.pairs and pairs_eligible(kf, x.dtype, group, k, cfg.block_k):
        launch(
            kernels.gemm_pairs_kernel, grid, x2, pw.weight, pw.scales, biases, bias_arg, y, ws, cnt,
            m, n, k, pw.weight.shape[1], group, k_per_split, x2.stride(0), y.stride(0),
            DECODE=kf.decode, AFFINE=kf.affine, SCALE_MUL=kf.scale_mul, HAS_BIAS=has_bias,
            FP16=x.dtype == torch.float16, ASM=cfg.asm,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_N=cfg.group_m,
            SPLIT_K=split, EVEN=even, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return y.reshape(*lead, n)
    launch(
        kernels.gemm_kernel, grid, x2, pw.weight, pw.scales, biases, pw.lut, bias_arg, y, ws, cnt,
        m, n, k, pw.weight.shape[1], group, k_per_split, x2.stride(0), y.stride(0), **common,
        HAS_BIAS=has_bias, SCALE_ROW=(group % cfg.block_k == 0 or group == k),
        FP32_DOT=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        SPLIT_K=split, EVEN=even,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y.reshape(*lead, n)


def dequant_slice_cols(n: int, k: int, elem: int) -> int:
    """Features per slice of the dequantize path's ``W_hat^T`` (all ``n`` when it is not
    sliced): about :data:`DEQUANT_SLICE_BYTES` of the activation dtype, a multiple of
    :data:`DEQUANT_SLICE_ALIGN`, and only where at least two slices result."""
    if DEQUANT_SLICE_BYTES <= 0:
        return n
    width = DEQUANT_SLICE_BYTES // (k * elem) // DEQUANT_SLICE_ALIGN * DEQUANT_SLICE_ALIGN
    width = max(width, DEQUANT_SLICE_MIN_COLS)
    return n if 2 * width > n else width


def dequant_slice(pw: PreparedWeight, n0: int, n1: int, out: torch.Tensor, nk: bool = False) -> None:
    """``out[K, n1 - n0] = W_hat[n0:n1].T`` in ``out``'s dtype (``nk``: ``out[n1 - n0, K] =
    W_hat[n0:n1]``): one ``dequant_kernel`` launch over a slice of features (``n0`` a multiple
    of 16, the K-major block; ``out`` may be a view whose rows are longer than the slice)."""
    from . import kernels

    kf = pw.kfmt
    k, n = pw.in_features, pw.out_features
    if n0 % layout.N_BLOCK or not 0 <= n0 < n1 <= n:
        raise ValueError(f"dequant_slice: need 0 <= n0 < n1 <= {n} with n0 a multiple of "
                         f"{layout.N_BLOCK}, got n0={n0}, n1={n1}")
    want = (n1 - n0, k) if nk else (k, n1 - n0)
    if tuple(out.shape) != want or out.stride(1) != 1:
        raise ValueError(f"dequant_slice: out must be {list(want)} with unit column stride, "
                         f"got shape {tuple(out.shape)} strides {out.stride()}")
    width = n1 - n0
    block_n, block_k = 64, 64
    biases = pw.biases if pw.biases is not None else pw.scales
    launch(
        kernels.dequant_kernel, (triton_cdiv(width, block_n), triton_cdiv(k, block_k)),
        pw.weight[n0 // layout.N_BLOCK:], pw.scales[:, n0:], biases[:, n0:], pw.lut, out,
        width, k, pw.weight.shape[1], pw.group, n, out.stride(0),
        BITS=kf.bits, DECODE=kf.decode, AFFINE=kf.affine, SCALE_MUL=kf.scale_mul,
        SCALE_ROW=(pw.group % block_k == 0 or pw.group == k),
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN=(k % block_k == 0 and width % block_n == 0),
        OUT_NK=nk, num_warps=4,
    )


def _split_args(y: torch.Tensor, split: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The workspace and counters of a launch with ``split`` K splits over ``tiles`` output
    tiles (``y`` itself stands in for both when there is no split: the kernel never reads them)."""
    if split == 1:
        return y, y
    if is_dry():
        note_workspace(split * y.numel(), tiles)
        return y, y
    return split_buffers(y.device, split * y.numel(), tiles)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm(x, weight, scales, biases, global_scale, bias, format, group_size):
    """The CUDA kernel of ``marlin::gemm`` (same arguments as the op): checks as the pure-torch
    kernel does, then runs :func:`gemm_prepared` on the canonical weight."""
    reference.check_gemm_args(x, weight, scales, biases, global_scale, bias, format, group_size)
    pw = cached_prepare(weight, scales, biases, global_scale, format, group_size, x.shape[-1])
    return gemm_prepared(x, pw, bias)


# ---- per-layer plans: everything decided once, launches replayed -----------------------------

_fast_launch = os.environ.get("MARLIN_CUDA_FAST_LAUNCH", "1") != "0"
_PLANS: dict[int, weakref.ref] = {}  # weight data_ptr -> its LayerPlan (the op looks it up)


def set_fast_launch(enabled: bool) -> None:
    """Replay recorded launches (default; environment ``MARLIN_CUDA_FAST_LAUNCH=0`` turns it
    off) or take Triton's own launch path on every call (for comparison and debugging)."""
    global _fast_launch
    _fast_launch = bool(enabled)


class LayerPlan:
    """One prepared weight and its launches, decided once per layer (issue 24 item 1).

    Keyed by (rows, activation dtype, layer bias or not): the first call with a key runs
    :func:`gemm_prepared` under :func:`.launch.recording` and keeps its one Triton launch
    (:class:`.launch.Recorded`); later calls with that key allocate the output and replay the
    launch with the new activation, output and bias. Paths that are not one launch
    (dequantize + cuBLAS, M > FUSED_MAX_M) and calls whose activation is not contiguous and
    16-byte aligned run :func:`gemm_prepared` as before. At most :attr:`MAX_KEYS` keys are
    recorded. Eager calls choose without the TMA-fed GEMV (:data:`EAGER_TMA`); a call made
    while a CUDA graph is captured neither replays nor records: it runs the full choice
    through Triton's own launch (its host cost is paid once, at capture). Building a plan
    reserves the device's split-K workspace for every row count (:func:`workspace_need`), so
    no later call allocates one.
    """

    MAX_KEYS = 64

    def __init__(self, pw: PreparedWeight) -> None:
        self.pw = pw
        self.launches: dict[tuple, Recorded | None] = {}
        dev = pw.weight.device
        if dev.type == "cuda":
            reserve_split_workspace(dev, *workspace_need(pw, dev))
        _PLANS[pw.weight.data_ptr()] = weakref.ref(self)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        pw = self.pw
        k = pw.in_features
        if x.shape[-1] != k:
            raise ValueError(f"marlin.gemm: x must have last dim K={k}, got shape {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        if _capturing(x2.device):
            # a graph being captured: the launch's host cost is paid once, so the full choice
            # (TMA-fed GEMV included) and Triton's own launch path
            return gemm_prepared(x, pw, bias)
        key = (x2.shape[0], x2.dtype, bias is None)
        rec = self.launches.get(key, False)
        if rec and rec.matches(x2, bias):
            return rec(x2, bias).view(*lead, pw.out_features)
        if (rec is False and _fast_launch and len(self.launches) < self.MAX_KEYS
                and x2.shape[0] <= FUSED_MAX_M):
            with recording() as log:
                y = gemm_prepared(x2, pw, bias, tma=EAGER_TMA)
            self.launches[key] = (Recorded.build(log[0], x2, y, bias)
                                  if len(log) == 1 and y.dim() == 2 else None)
            return y.view(*lead, pw.out_features)
        return gemm_prepared(x, pw, bias, tma=EAGER_TMA)


def plan_for(weight: torch.Tensor) -> LayerPlan | None:
    """The live :class:`LayerPlan` whose prepared weight is ``weight`` (same storage)."""
    ref = _PLANS.get(weight.data_ptr())
    plan = None if ref is None else ref()
    if plan is None or plan.pw.weight.data_ptr() != weight.data_ptr() or plan.pw.weight.shape != weight.shape:
        return None
    return plan


def gemm_prepared_op(x, weight, scales, biases, bias, format, group_size, in_features, out_features):
    """The CUDA kernel of ``marlin::gemm_prepared`` (a layer already in the kernels' layout,
    what ``MarlinLinear`` calls under ``torch.compile``): the layer's plan where one is live,
    else :func:`gemm_prepared` on the tensors as given."""
    plan = plan_for(weight)
    if plan is not None:
        return plan(x, bias)
    kfmt = layout.kernel_format(format)
    pw = PreparedWeight(kfmt, group_size, in_features, out_features, weight, scales,
                        biases if kfmt.affine else None, _lut(kfmt.lut, weight.device))
    return gemm_prepared(x, pw, bias)


__all__ = [
    "LayerPlan", "gemm_prepared_op", "plan_for", "reserve_split_workspace", "set_fast_launch",
    "split_buffers", "workspace_need",
    "DEQUANT_MIN_M", "FUSED_MAX_M", "GEMV_MAX_M", "GemmConfig", "GemvConfig", "PreparedWeight", "choose_path",
    "clear_weight_cache", "default_gemm_config", "default_gemv_config", "default_pairs_config", "gemm",
    "gemm_prepared",
    "interpreting", "prepare_cuda_weight", "set_weight_cache",
]
