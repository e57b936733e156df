// marlin::moe_gemm: y[m] = x[m] @ W_hat[expert_ids[m]]^T + bias[expert_ids[m]], every expert's
// weight in the canonical layout (docs/FORMAT.md) inside one [E, N, words] tensor. Two paths,
// chosen by the host (csrc/ops/moe.cpp) from the number of rows M:
//
//   moe_gemv   few rows (decode: a token's top-k rows): one gemv per row (gemv_impl of gemm.h)
//              on the slices of that row's expert, so only the selected experts' weights are
//              read, each packed byte once per row, and nothing waits for the host.
//   moe_sort + moe_gemm   more rows (prefill): moe_sort (one threadgroup) buckets the rows by
//              expert on the GPU (counts, prefix sums of rows and of 32-row tiles, a stable
//              row order); moe_gemm then runs the gemm tile of gemm.h (simdgroup_matrix MMA,
//              dequantized weight tiles in threadgroup memory) per (expert, 32-row tile,
//              32-column tile), gathering x rows through the order and scattering the outputs
//              back: each used expert's weights are read once per 32 of its rows (MLX's
//              gather_qmm idea; the grid is sized for the worst case and idle tiles exit).
//
// Kernels cannot raise: a row whose id lies outside [0, E) comes out as NaN (the torch op
// raises instead; checking on the host would need a GPU->CPU sync).
#pragma once

#include <metal_stdlib>

#include "args.h"
#include "gemm.h"

using namespace metal;

// Expert e's slices of the stacked per-expert tensors. Optional buffers (biases of codebook
// formats, global_scale outside nvfp4, the layer bias) are not offset: they may be unbound.
template <typename Fmt>
struct ExpertSlices {
  device const uint* weight;
  device const uchar* scales;
  device const uchar* biases;
  device const float* global_scale;
  device const float* bias;

  METAL_FUNC ExpertSlices(uint e, device const uint* weight_, device const uchar* scales_,
                          device const uchar* biases_, device const float* global_scale_,
                          device const float* bias_, constant GemmArgs& args, constant MoeArgs& moe)
      : weight(weight_ + ulong(e) * moe.expert_words),
        scales(scales_ + ulong(e) * moe.scale_bytes),
        biases(Fmt::affine ? biases_ + ulong(e) * moe.bias_bytes : biases_),
        global_scale(Fmt::global_scale ? global_scale_ + e : global_scale_),
        bias(args.has_bias ? bias_ + ulong(e) * args.n : bias_) {}
};

// ---------------------------------------------------------------------------------------------
// moe_gemv: threadgroup (x, m) computes the gemv threadgroup x of row m with its expert's slices.
template <typename T,          // activation / output type: half, bfloat or float
          typename Fmt,        // weight format decoder (formats/*.h)
          int group_size>      // G; -1 = per-channel
METAL_FUNC void moe_gemv_impl(device const uint* weight, device const uchar* scales,
                              device const uchar* biases, device const float* global_scale,
                              device const T* x, device const float* bias, device T* out,
                              device const int* expert_ids, constant GemmArgs& args,
                              constant MoeArgs& moe, uint2 group, uint tid, uint simd_gid,
                              uint lane) {
  const int e = expert_ids[group.y];  // uniform over the threadgroup
  if (e < 0 || uint(e) >= moe.num_experts) {
    // The rows this threadgroup would compute (gemv_lane: SIMDGROUPS * ROWS_PER_SLOT * slots).
    const uint rows = GemvShape::SIMDGROUPS * GemvShape::ROWS_PER_SLOT * (32u / args.gemv_lanes);
    for (uint n = group.x * rows + tid; n < min((group.x + 1) * rows, args.n); n += GemvShape::THREADS)
      out[ulong(group.y) * args.n + n] = T(NAN);
    return;
  }
  const ExpertSlices<Fmt> s(uint(e), weight, scales, biases, global_scale, bias, args, moe);
  gemv_impl<T, Fmt, group_size>(s.weight, s.scales, s.biases, s.global_scale, x, s.bias, out, args,
                                group, simd_gid, lane);
}

// ---------------------------------------------------------------------------------------------
// moe_sort: one threadgroup groups the M rows into E + 1 buckets (bucket E: ids out of range).
//   offsets[0 .. E+1]          row_start: bucket b's rows are order[row_start[b] .. row_start[b+1])
//   offsets[E+2 .. 2E+3]       tile_start: bucket b's 32-row tiles are tile_start[b] .. [b+1)
// Thread t owns buckets t, t + THREADS, ...: it counts its buckets' rows in one pass over the ids
// and, after the prefix sums, writes their row numbers in a second pass, in row order. So the
// order is stable and deterministic and needs no atomics; the cost is two passes over M ids
// per thread (ids are 4 bytes and every thread reads the same ones: served by the cache).
struct MoeSortShape {
  enum {
    THREADS = 256,
    MAX_BUCKETS = 1025,  // E <= 1024 (the host takes moe_gemv beyond)
  };
};

METAL_FUNC uint moe_bucket(int e, uint num_experts) {
  return e < 0 || uint(e) >= num_experts ? num_experts : uint(e);
}

METAL_FUNC void moe_sort_impl(device const int* expert_ids, device uint* order, device uint* offsets,
                              constant GemmArgs& args, constant MoeArgs& moe,
                              threadgroup uint* starts, uint tid) {
  const uint buckets = moe.num_experts + 1;
  for (uint b = tid; b < buckets; b += MoeSortShape::THREADS) {
    uint count = 0;
    for (uint m = 0; m < args.m; ++m) count += moe_bucket(expert_ids[m], moe.num_experts) == b;
    starts[b] = count;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {  // E + 1 <= 1025 adds: not worth a parallel scan
    uint rows = 0, tiles = 0;
    device uint* row_start = offsets;
    device uint* tile_start = offsets + buckets + 1;
    for (uint b = 0; b < buckets; ++b) {
      const uint count = starts[b];
      row_start[b] = rows;
      tile_start[b] = tiles;
      starts[b] = rows;
      rows += count;
      tiles += (count + GemmTile::BM - 1) / GemmTile::BM;
    }
    row_start[buckets] = rows;
    tile_start[buckets] = tiles;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint b = tid; b < buckets; b += MoeSortShape::THREADS) {
    uint pos = starts[b];
    for (uint m = 0; m < args.m; ++m)
      if (moe_bucket(expert_ids[m], moe.num_experts) == b) order[pos++] = m;
  }
}

// ---------------------------------------------------------------------------------------------
// moe_gemm: threadgroup (x, t) computes output columns 32x .. 32x + 31 of the t-th 32-row tile
// of the sorted rows (grid y: an upper bound on the tiles, ceil(M/32) + min(E + 1, M); tiles
// past tile_start[E + 1] exit at once). The tile's bucket is found by binary search in
// tile_start; its rows are gathered through `order` by the gemm loader, and the outputs written
// to their original rows.
template <typename T,          // activation / output type: half, bfloat or float
          typename Fmt,        // weight format decoder (formats/*.h)
          int group_size>      // G; -1 = per-channel
METAL_FUNC void moe_gemm_impl(device const uint* weight, device const uchar* scales,
                              device const uchar* biases, device const float* global_scale,
                              device const T* x, device const float* bias, device T* out,
                              device const uint* order, device const uint* offsets,
                              constant GemmArgs& args, constant MoeArgs& moe, threadgroup T* xs,
                              threadgroup T* ws, threadgroup float* cs, uint2 group, uint tid,
                              uint simd_gid) {
  const uint buckets = moe.num_experts + 1;
  device const uint* row_start = offsets;
  device const uint* tile_start = offsets + buckets + 1;
  const uint t = group.y;
  if (t >= tile_start[buckets]) return;  // uniform: the whole threadgroup leaves
  uint lo = 0, hi = buckets;  // tile_start[lo] <= t < tile_start[hi] (empty buckets repeat a start)
  while (hi - lo > 1) {
    const uint mid = (lo + hi) / 2;
    if (tile_start[mid] <= t) lo = mid; else hi = mid;
  }
  const uint b = lo;
  const uint m0 = row_start[b] + (t - tile_start[b]) * GemmTile::BM, m_end = row_start[b + 1];
  const uint n0 = group.x * GemmTile::BN;
  if (b == moe.num_experts) {  // ids out of range: NaN rows
    for (uint e = tid; e < GemmTile::BM * GemmTile::BN; e += GemmTile::THREADS) {
      const uint m = m0 + e / GemmTile::BN, n = n0 + e % GemmTile::BN;
      if (m < m_end && n < args.n) out[ulong(order[m]) * args.n + n] = T(NAN);
    }
    return;
  }
  const ExpertSlices<Fmt> s(b, weight, scales, biases, global_scale, bias, args, moe);
  const float gscale = Fmt::global_scale ? s.global_scale[0] : 1.0f;
  gemm_tile_impl<T, Fmt, group_size>(s.weight, s.scales, s.biases, gscale, x, order, m0, m_end, n0,
                                     0u, args.k, args, xs, ws, cs, tid, simd_gid);
  for (uint e = tid; e < GemmTile::BM * GemmTile::BN; e += GemmTile::THREADS) {
    const uint m = m0 + e / GemmTile::BN, n = n0 + e % GemmTile::BN;
    if (m >= m_end || n >= args.n) continue;
    out[ulong(order[m]) * args.n + n] = T(cs[e] + (args.has_bias ? s.bias[n] : 0.0f));
  }
}

// ---------------------------------------------------------------------------------------------
// Thin named kernels: marlin_moe_{gemv,gemm}_<format>_<dtype>_gs<G|K> and marlin_moe_sort;
// csrc/ops/moe.cpp builds the same names. Buffer slots 0-6 and 8 as the gemm family
// (marlin_gemm_common_params, GemmArgs at 8), then:
//   9 expert_ids (int32 [M]), 10 MoeArgs, 11 order (uint32 [M]), 12 offsets (uint32 [2E + 4]).

#define instantiate_moe_gemv(fmt_name, Fmt, type_name, T, gs_name, gs)                             \
  kernel void marlin_moe_gemv_##fmt_name##_##type_name##_gs##gs_name(                             \
      marlin_gemm_common_params(T), constant GemmArgs &args [[buffer(8)]],                        \
      device const int *expert_ids [[buffer(9)]], constant MoeArgs &moe [[buffer(10)]],           \
      uint2 group [[threadgroup_position_in_grid]], uint tid [[thread_index_in_threadgroup]],     \
      uint simd_gid [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) { \
    moe_gemv_impl<T, Fmt, gs>(weight, scales, biases, global_scale, x, bias, out, expert_ids,     \
                              args, moe, group, tid, simd_gid, lane);                             \
  }

#define instantiate_moe_gemm(fmt_name, Fmt, type_name, T, gs_name, gs)                             \
  kernel void marlin_moe_gemm_##fmt_name##_##type_name##_gs##gs_name(                             \
      marlin_gemm_common_params(T), constant GemmArgs &args [[buffer(8)]],                        \
      constant MoeArgs &moe [[buffer(10)]], device const uint *order [[buffer(11)]],              \
      device const uint *offsets [[buffer(12)]], uint2 group [[threadgroup_position_in_grid]],    \
      uint tid [[thread_index_in_threadgroup]], uint simd_gid [[simdgroup_index_in_threadgroup]]) { \
    threadgroup T xs[2 * GemmTile::BM * GemmTile::LDS];                                           \
    threadgroup T ws[2 * GemmTile::BN * GemmTile::LDS];                                           \
    threadgroup float cs[GemmTile::BM * GemmTile::BN];                                            \
    moe_gemm_impl<T, Fmt, gs>(weight, scales, biases, global_scale, x, bias, out, order, offsets, \
                              args, moe, xs, ws, cs, group, tid, simd_gid);                       \
  }

#define instantiate_moe_sort()                                                                    \
  kernel void marlin_moe_sort(                                                                    \
      constant GemmArgs &args [[buffer(8)]], device const int *expert_ids [[buffer(9)]],          \
      constant MoeArgs &moe [[buffer(10)]], device uint *order [[buffer(11)]],                    \
      device uint *offsets [[buffer(12)]], uint tid [[thread_index_in_threadgroup]]) {            \
    threadgroup uint starts[MoeSortShape::MAX_BUCKETS];                                           \
    moe_sort_impl(expert_ids, order, offsets, args, moe, starts, tid);                            \
  }
