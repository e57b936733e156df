// marlin::gemm: y[M, N] = x[M, K] @ W_hat[N, K]^T + bias, the weight read in its canonical
// packed layout (docs/FORMAT.md) and dequantized on the fly. Three kernels, chosen by the host
// (csrc/ops/gemm.cpp) from M:
//
//   gemv       M = 1      memory bound: every packed weight word is read once, x stays in
//                         registers, scales and biases are applied once per 32 codes.
//   gemv_rows  M = 2..8   still memory bound: each decoded weight chunk is reused for up to 8
//                         rows of x, so the weights are read once for all rows.
//   gemm       M > 8      compute bound: 32x32 output tiles, weight tiles dequantized into
//                         threadgroup memory, simdgroup_matrix 8x8 MMA with fp32 accumulators,
//                         double-buffered; optionally split along K (+ gemm_reduce).
//
// The unit of weight access everywhere is the *chunk*: 32 consecutive codes of a row, which
// occupy exactly `bits` words for every format (docs/FORMAT.md §2; 3 bits: 3 words), so a chunk
// never needs bits of a neighbouring chunk and is decoded by Decode32 (formats/decode.h).
// Accumulation is fp32 throughout; results are converted to the activation type once.
#pragma once

#include <metal_stdlib>

#include "args.h"
#include "formats/decode.h"

using namespace metal;

// ---------------------------------------------------------------------------------------------
// Chunk loads.

// The `bits` words of one chunk. bits = 2, 4, 8 read them as one or two vector loads when the
// host found the rows 8/16-byte aligned (args.wide_loads): a simdgroup then reads 32 adjacent
// 16-byte pieces = 512 contiguous bytes of a row per instruction, the widest coalesced access
// Metal offers. 3-bit chunks (12 bytes) and unaligned rows use scalar words, which the
// hardware still coalesces across lanes (same cache lines, more instructions).
template <int bits>
struct ChunkLoad {
  static METAL_FUNC void run(device const uint* p, bool wide, thread uint* w) {
    (void)wide;
    for (int j = 0; j < bits; ++j) w[j] = p[j];
  }
};
template <>
struct ChunkLoad<2> {
  static METAL_FUNC void run(device const uint* p, bool wide, thread uint* w) {
    if (wide) {
      const uint2 v = *(device const uint2*)p;
      w[0] = v.x;
      w[1] = v.y;
    } else {
      w[0] = p[0];
      w[1] = p[1];
    }
  }
};
template <>
struct ChunkLoad<4> {
  static METAL_FUNC void run(device const uint* p, bool wide, thread uint* w) {
    if (wide) {
      const uint4 v = *(device const uint4*)p;
      w[0] = v.x;
      w[1] = v.y;
      w[2] = v.z;
      w[3] = v.w;
    } else {
      for (int j = 0; j < 4; ++j) w[j] = p[j];
    }
  }
};
template <>
struct ChunkLoad<8> {
  static METAL_FUNC void run(device const uint* p, bool wide, thread uint* w) {
    if (wide) {
      const uint4 a = *(device const uint4*)p;
      const uint4 b = *(device const uint4*)(p + 4);
      w[0] = a.x; w[1] = a.y; w[2] = a.z; w[3] = a.w;
      w[4] = b.x; w[5] = b.y; w[6] = b.z; w[7] = b.w;
    } else {
      for (int j = 0; j < 8; ++j) w[j] = p[j];
    }
  }
};

// Chunk `chunk` of a row. The last chunk of a per-channel row whose K * bits is not a multiple
// of 32 is cut short: its missing words read as 0 (never past the row; rows never share a word).
template <int bits>
METAL_FUNC void load_chunk(device const uint* row, uint chunk, uint words_per_row, bool wide,
                           thread uint* w) {
  const uint first = chunk * bits;
  if (first + bits <= words_per_row) {
    ChunkLoad<bits>::run(row + first, wide, w);
  } else {
    for (int j = 0; j < bits; ++j) w[j] = first + j < words_per_row ? row[first + j] : 0u;
  }
}

// `count` (a multiple of 4) activations starting at p, as fp32. When the host found x's rows
// 8-element aligned (args.x_wide_loads) they are read as 4-vectors: a quarter of the load
// instructions of scalar reads, which matters where x is re-read per weight row (gemv_rows).
template <typename T, int count>
METAL_FUNC void load_x(device const T* p, bool wide, thread float* out) {
  if (wide) {
    for (int j = 0; j < count; j += 4) {
      const float4 v = float4(*(device const vec<T, 4>*)(p + j));
      out[j] = v.x;
      out[j + 1] = v.y;
      out[j + 2] = v.z;
      out[j + 3] = v.w;
    }
  } else {
    for (int j = 0; j < count; ++j) out[j] = float(p[j]);
  }
}

// ---------------------------------------------------------------------------------------------
// Chunk dot products (gemv): d[p] = sum over slice p of x[i] * code_value(i), slices of
// 32 / parts codes (parts = 2 only for nvfp4's 16-element groups). The scale is applied by
// the caller once per slice, not per weight.

// Generic: decode the 32 codes (formats/decode.h, branch-free) and dot in fp32.
template <typename Fmt, int parts>
struct ChunkDot {
  static METAL_FUNC void prepare(thread float* x) { (void)x; }
  static METAL_FUNC void run(thread const float* x, thread const uint* w, thread float* d) {
    float q[32];
    Decode32<Fmt, Fmt::bits>::run(w, q);
    for (int p = 0; p < parts; ++p) {
      float s = 0.0f;
      for (int i = p * (32 / parts); i < (p + 1) * (32 / parts); ++i) s = fma(x[i], q[i], s);
      d[p] = s;
    }
  }
};

// Integer codes of 2, 4, 8 bits: activations pre-scaled to remove the shifts (MLX's qdot
// trick). A word is read as two 16-bit halves (as_type, free); code i of a half sits at bit
// b*i, so (half & (mask << b*i)) converted to float is q * 2^(b*i) exactly, and x was divided
// by 2^(b*i) once per chunk (exact: a power of two). One AND and one convert per code, no
// shift, and the prepared x is shared by all the weight rows a lane handles.
template <int b, int parts>
struct ChunkDot<int_magic_bias<b>, parts> {
  enum { PER_WORD = 32 / b, PER_HALF = 16 / b };
  static METAL_FUNC void prepare(thread float* x) {
    for (int i = 0; i < 32; ++i) x[i] *= 1.0f / float(1u << (b * (i % PER_HALF)));
  }
  static METAL_FUNC void run(thread const float* x, thread const uint* w, thread float* d) {
    for (int p = 0; p < parts; ++p) d[p] = 0.0f;
    for (int j = 0; j < b; ++j) {
      const ushort2 h = as_type<ushort2>(w[j]);
      for (int i = 0; i < PER_WORD; ++i) {
        const int c = j * PER_WORD + i;  // code index in the chunk
        const uint mask = ((1u << b) - 1u) << (b * (i % PER_HALF));
        const uint half_word = i < PER_HALF ? uint(h.x) : uint(h.y);
        d[c / (32 / parts)] = fma(x[c], float(half_word & mask), d[c / (32 / parts)]);
      }
    }
  }
};

// Group of slice p of a chunk starting at k0 (per-channel: group 0 of the row).
template <int group_size>
METAL_FUNC uint chunk_group(uint k0, int p, int parts) {
  return group_size > 0 ? (k0 + uint(p) * (32u / uint(parts))) / uint(group_size) : 0u;
}

// ---------------------------------------------------------------------------------------------
// gemv: M = 1.
//
// Threadgroup = 2 simdgroups; each simdgroup owns 4 consecutive weight rows (outputs), so a
// threadgroup produces 8 outputs. Lane l takes chunks l, l + 32, ... of K: for each, it loads
// 32 activations once into registers (fp32), then for each of its 4 rows loads that row's chunk
// (bits * 4 bytes, adjacent lanes adjacent: coalesced) and accumulates
//     acc += s * sum(x * q)            (codebook formats)
//     acc += s * sum(x * q) + b * sum(x)   (affine: w = s*q + b, so sum(x*w) factors)
// per group slice, so scales and biases cost one multiply-add per 32 weights, and sum(x) is
// computed once per chunk for all 4 rows. nvfp4's global scale multiplies the final sum. A
// simd_sum per row reduces the 32 lanes; lane 0 writes.
struct GemvShape {
  enum {
    SIMDGROUPS = 2,     // per threadgroup
    ROWS_PER_SIMD = 4,  // weight rows (outputs) per simdgroup: x registers reused 4 times
    ROWS_PER_GROUP = SIMDGROUPS * ROWS_PER_SIMD,
    THREADS = SIMDGROUPS * 32,
    MAX_M = 8,          // gemv_rows: rows of x per threadgroup (host: M <= 8 uses gemv_rows)
  };
};

template <typename T,          // activation / output type: half, bfloat or float
          typename Fmt,        // weight format decoder (formats/*.h)
          int group_size>      // G; -1 = per-channel
METAL_FUNC void gemv_impl(device const uint* weight, device const uchar* scales,
                          device const uchar* biases, device const float* global_scale,
                          device const T* x, device const float* bias, device T* out,
                          constant GemmArgs& args, uint2 group, uint simd_gid, uint lane) {
  enum {
    PARTS = group_size > 0 && group_size < 32 ? 32 / group_size : 1,  // groups per chunk
    SLICE = 32 / PARTS,
    R = GemvShape::ROWS_PER_SIMD,
  };
  const uint n0 = (group.x * GemvShape::SIMDGROUPS + simd_gid) * R;
  const uint m = group.y;
  device const T* xm = x + ulong(m) * args.k;
  const uint chunks = (args.k + 31) / 32;

  float acc[R];
  for (int i = 0; i < R; ++i) acc[i] = 0.0f;
  for (uint c = lane; c < chunks; c += 32) {
    const uint k0 = c * 32;
    float xv[32];
    if (k0 + 32 <= args.k) {
      load_x<T, 32>(xm + k0, args.x_wide_loads != 0, xv);
    } else {  // the short last chunk of a per-channel row: zeros past K
      for (int i = 0; i < 32; ++i) xv[i] = k0 + i < args.k ? float(xm[k0 + i]) : 0.0f;
    }
    float xsum[PARTS];
    for (int p = 0; p < PARTS; ++p) {
      float s = 0.0f;
      if (Fmt::affine)
        for (int i = p * SLICE; i < (p + 1) * SLICE; ++i) s += xv[i];
      xsum[p] = s;
    }
    ChunkDot<Fmt, PARTS>::prepare(xv);
    for (int i = 0; i < R; ++i) {
      const uint n = n0 + i;
      if (n >= args.n) break;  // uniform across the simdgroup
      uint w[Fmt::bits];
      load_chunk<Fmt::bits>(weight + ulong(n) * args.words_per_row, c, args.words_per_row,
                            args.wide_loads != 0, w);
      float d[PARTS];
      ChunkDot<Fmt, PARTS>::run(xv, w, d);
      for (int p = 0; p < PARTS; ++p) {
        const uint g = n * args.groups_per_row + chunk_group<group_size>(k0, p, PARTS);
        float a = load_scale(scales, g, args.scale_kind) * d[p];
        if (Fmt::affine) a = fma(load_scale(biases, g, args.bias_kind), xsum[p], a);
        acc[i] += a;
      }
    }
  }
  const float gscale = Fmt::global_scale ? global_scale[0] : 1.0f;
  for (int i = 0; i < R; ++i) {
    const float y = simd_sum(acc[i]);  // every lane takes part, even for rows past N
    const uint n = n0 + i;
    if (lane == 0 && n < args.n)
      out[ulong(m) * args.n + n] = T(y * gscale + (args.has_bias ? bias[n] : 0.0f));
  }
}

// gemv_rows: M = 2..8 (rows m0 .. m0 + 7 of x, masked by M).
//
// Same grid of weight rows and chunks as gemv, but each decoded chunk is dequantized once
// (v = s*q + b or s*q, one multiply-add per weight) and then used for every row of x: the
// weights are read from memory once for all M rows. The factored form of gemv would cost
// M extra adds per weight instead of one. x (at most 8 * K values, shared by every
// threadgroup) is read from device memory where the cache serves it; only the weights
// stream from DRAM.
template <typename T,          // activation / output type: half, bfloat or float
          typename Fmt,        // weight format decoder (formats/*.h)
          int group_size>      // G; -1 = per-channel
METAL_FUNC void gemv_rows_impl(device const uint* weight, device const uchar* scales,
                               device const uchar* biases, device const float* global_scale,
                               device const T* x, device const float* bias, device T* out,
                               constant GemmArgs& args, uint2 group, uint simd_gid, uint lane) {
  enum {
    PARTS = group_size > 0 && group_size < 32 ? 32 / group_size : 1,
    SLICE = 32 / PARTS,
    R = GemvShape::ROWS_PER_SIMD,
    ROWS = GemvShape::MAX_M,
  };
  const uint n0 = (group.x * GemvShape::SIMDGROUPS + simd_gid) * R;
  const uint m0 = group.y * ROWS;
  const uint rows = min(uint(ROWS), args.m - m0);
  const uint chunks = (args.k + 31) / 32;
  const float gscale = Fmt::global_scale ? global_scale[0] : 1.0f;

  float acc[ROWS][R];
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < R; ++i) acc[r][i] = 0.0f;
  for (uint c = lane; c < chunks; c += 32) {
    const uint k0 = c * 32;
    const uint valid = min(32u, args.k - k0);
    for (int i = 0; i < R; ++i) {
      const uint n = n0 + i;
      if (n >= args.n) break;  // uniform across the simdgroup
      uint w[Fmt::bits];
      load_chunk<Fmt::bits>(weight + ulong(n) * args.words_per_row, c, args.words_per_row,
                            args.wide_loads != 0, w);
      float v[32];
      Decode32<Fmt, Fmt::bits>::run(w, v);
      for (int p = 0; p < PARTS; ++p) {
        const uint g = n * args.groups_per_row + chunk_group<group_size>(k0, p, PARTS);
        const float s = load_scale(scales, g, args.scale_kind);
        if (Fmt::affine) {
          const float b = load_scale(biases, g, args.bias_kind);
          for (int j = p * SLICE; j < (p + 1) * SLICE; ++j) v[j] = v[j] * s + b;
        } else {
          const float se = s * gscale;  // the torch op's order: q * (scale * global_scale)
          for (int j = p * SLICE; j < (p + 1) * SLICE; ++j) v[j] = v[j] * se;
        }
      }
      for (int r = 0; r < ROWS; ++r) {
        if (uint(r) >= rows) break;
        device const T* xr = x + ulong(m0 + r) * args.k + k0;
        float xv[32];
        if (valid == 32) {
          load_x<T, 32>(xr, args.x_wide_loads != 0, xv);
        } else {  // short last chunk of a per-channel row: never read x past K
          for (int j = 0; j < 32; ++j) xv[j] = uint(j) < valid ? float(xr[j]) : 0.0f;
        }
        float d = 0.0f;
        for (int j = 0; j < 32; ++j) d = fma(xv[j], v[j], d);
        acc[r][i] += d;
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < R; ++i) {
      const float y = simd_sum(acc[r][i]);
      const uint n = n0 + i;
      if (lane == 0 && uint(r) < rows && n < args.n)
        out[ulong(m0 + r) * args.n + n] = T(y + (args.has_bias ? bias[n] : 0.0f));
    }
}

// ---------------------------------------------------------------------------------------------
// gemm: M > 8.
//
// Threadgroup = 4 simdgroups (128 threads) computing a BM x BN = 32 x 32 output tile; each
// simdgroup owns a 16 x 16 quarter = 2 x 2 simdgroup_matrix<float, 8, 8> accumulators. Per K
// step of BK = 32 (one chunk per weight row):
//   - every thread loads 8 activations of the 32 x 32 x tile (a row's 8 adjacent elements);
//   - threads 0..31 each load one weight row's chunk (bits * 4 bytes) and its scale(s), decode
//     and dequantize the 32 values in registers (fp32, the torch op's order), and store them
//     as T into the 32 x 32 weight tile: the weights cross memory once, packed, and become T
//     only in threadgroup memory;
//   - each simdgroup runs 4 k-steps of 2 x 2 MMAs from threadgroup memory (A = x tile rows,
//     B = weight tile rows loaded transposed).
// Double buffering: the global loads of step k+1 are issued into registers before the MMAs of
// step k and stored into the other threadgroup buffer after them, so device latency hides
// behind the math and one barrier per step suffices. Rows are padded by 8 elements (16 bytes
// for half) so the 8 rows a simdgroup_load touches start in different banks.
// Edge tiles: x rows >= M, weight rows >= N and columns >= the split's K end load as zeros
// (weights too, so a NaN code of the next split never meets a zero activation), outputs are
// written through threadgroup memory with bounds checks. Split-K (group.z = split index):
// each split writes fp32 partial sums [splits, M, N]; gemm_reduce adds them and the bias.
struct GemmTile {
  enum {
    BM = 32,           // output rows (of x) per threadgroup
    BN = 32,           // output columns (weight rows) per threadgroup
    BK = 32,           // K per step = one 32-code chunk per weight row
    LDS = BK + 8,      // threadgroup row stride in elements (padding against bank conflicts)
    THREADS = 128,     // 4 simdgroups, 2 x 2 over the tile
    SM = 16,           // rows of the tile per simdgroup
    SN = 16,           // columns of the tile per simdgroup
    X_PER_THREAD = BM * BK / THREADS,  // 8 activations loaded by each thread per step (the
                                       // two 4-vector loads of GemmLoader::fetch)
  };
};

// The global -> register -> threadgroup path of one gemm threadgroup (MLX's BlockLoader idea).
template <typename T, typename Fmt, int group_size>
struct GemmLoader {
  enum { PARTS = group_size > 0 && group_size < 32 ? 32 / group_size : 1, SLICE = 32 / PARTS };
  device const uint* weight;
  device const uchar* scales;
  device const uchar* biases;
  device const T* x;
  uint m, n, k, words_per_row, groups_per_row, scale_kind, bias_kind;  // copied from GemmArgs
  bool wide, x_wide;
  uint tid, m0, n0, k_end;
  float gscale;
  // registers of the step in flight
  T xreg[GemmTile::X_PER_THREAD];
  uint wreg[Fmt::bits];
  float sreg[PARTS], breg[PARTS];
  uint k0;

  METAL_FUNC GemmLoader(device const uint* weight_, device const uchar* scales_,
                        device const uchar* biases_, float gscale_, device const T* x_,
                        constant GemmArgs& args_, uint tid_, uint m0_, uint n0_, uint k_end_)
      : weight(weight_), scales(scales_), biases(biases_), x(x_), m(args_.m), n(args_.n),
        k(args_.k), words_per_row(args_.words_per_row), groups_per_row(args_.groups_per_row),
        scale_kind(args_.scale_kind), bias_kind(args_.bias_kind), wide(args_.wide_loads != 0),
        x_wide(args_.x_wide_loads != 0), tid(tid_), m0(m0_), n0(n0_), k_end(k_end_), gscale(gscale_), k0(0) {}

  // Issue the device reads of the step starting at k (a multiple of 32).
  METAL_FUNC void fetch(uint kstart) {
    k0 = kstart;
    const uint row = tid / (GemmTile::BK / GemmTile::X_PER_THREAD);
    const uint col = tid % (GemmTile::BK / GemmTile::X_PER_THREAD) * GemmTile::X_PER_THREAD;
    static_assert(GemmTile::X_PER_THREAD == 8, "fetch reads x as two 4-vectors");
    const uint xm = m0 + row, kx = kstart + col;
    if (xm < m && kx + GemmTile::X_PER_THREAD <= k_end && x_wide) {
      // 8 adjacent activations: two 4-vector loads (col and k are multiples of 8).
      device const vec<T, 4>* src = (device const vec<T, 4>*)(x + ulong(xm) * k + kx);
      const vec<T, 4> a = src[0], b = src[1];
      xreg[0] = a.x; xreg[1] = a.y; xreg[2] = a.z; xreg[3] = a.w;
      xreg[4] = b.x; xreg[5] = b.y; xreg[6] = b.z; xreg[7] = b.w;
    } else {
      for (int j = 0; j < GemmTile::X_PER_THREAD; ++j)
        xreg[j] = xm < m && kx + j < k_end ? x[ulong(xm) * k + kx + j] : T(0.0f);
    }
    const uint wn = n0 + tid;
    if (tid < GemmTile::BN && wn < n) {
      load_chunk<Fmt::bits>(weight + ulong(wn) * words_per_row, kstart / 32, words_per_row, wide, wreg);
      for (int p = 0; p < PARTS; ++p) {
        const uint g = wn * groups_per_row + chunk_group<group_size>(kstart, p, PARTS);
        sreg[p] = load_scale(scales, g, scale_kind);
        breg[p] = Fmt::affine ? load_scale(biases, g, bias_kind) : 0.0f;
      }
    }
  }

  // Decode and store the fetched step into threadgroup buffers xs, ws (one stage each).
  METAL_FUNC void stash(threadgroup T* xs, threadgroup T* ws) {
    const uint row = tid / (GemmTile::BK / GemmTile::X_PER_THREAD);
    const uint col = tid % (GemmTile::BK / GemmTile::X_PER_THREAD) * GemmTile::X_PER_THREAD;
    for (int j = 0; j < GemmTile::X_PER_THREAD; ++j) xs[row * GemmTile::LDS + col + j] = xreg[j];
    if (tid >= GemmTile::BN) return;
    float v[32];
    if (n0 + tid < n) {
      Decode32<Fmt, Fmt::bits>::run(wreg, v);
      for (int p = 0; p < PARTS; ++p) {
        if (Fmt::affine) {
          for (int j = p * SLICE; j < (p + 1) * SLICE; ++j) v[j] = v[j] * sreg[p] + breg[p];
        } else {
          const float se = sreg[p] * gscale;
          for (int j = p * SLICE; j < (p + 1) * SLICE; ++j) v[j] = v[j] * se;
        }
      }
      for (int j = 0; j < 32; ++j) v[j] = k0 + j < k_end ? v[j] : 0.0f;
    } else {
      for (int j = 0; j < 32; ++j) v[j] = 0.0f;
    }
    for (int j = 0; j < 32; ++j) ws[tid * GemmTile::LDS + j] = T(v[j]);
  }
};

template <typename T,          // activation / output type: half, bfloat or float
          typename Fmt,        // weight format decoder (formats/*.h)
          int group_size>      // G; -1 = per-channel
METAL_FUNC void gemm_impl(device const uint* weight, device const uchar* scales,
                          device const uchar* biases, device const float* global_scale,
                          device const T* x, device const float* bias, device T* out,
                          device float* partials, constant GemmArgs& args,
                          threadgroup T* xs, threadgroup T* ws, threadgroup float* cs,
                          uint3 group, uint tid, uint simd_gid) {
  const uint m0 = group.y * GemmTile::BM, n0 = group.x * GemmTile::BN;
  const uint k_begin = group.z * args.k_per_split;
  const uint k_end = min(args.k, k_begin + args.k_per_split);
  const uint steps = (k_end - k_begin + GemmTile::BK - 1) / GemmTile::BK;
  const float gscale = Fmt::global_scale ? global_scale[0] : 1.0f;
  GemmLoader<T, Fmt, group_size> loader(weight, scales, biases, gscale, x, args, tid, m0, n0, k_end);

  const uint sm = simd_gid / 2 * GemmTile::SM, sn = simd_gid % 2 * GemmTile::SN;
  simdgroup_matrix<float, 8, 8> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  const uint x_stage = GemmTile::BM * GemmTile::LDS, w_stage = GemmTile::BN * GemmTile::LDS;
  loader.fetch(k_begin);
  loader.stash(xs, ws);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = 0; s < steps; ++s) {
    const uint cur = s & 1u;
    const bool more = s + 1 < steps;  // uniform: every thread runs the same steps
    if (more) loader.fetch(k_begin + (s + 1) * GemmTile::BK);
    threadgroup const T* xa = xs + cur * x_stage;
    threadgroup const T* wb = ws + cur * w_stage;
    for (int kk = 0; kk < GemmTile::BK; kk += 8) {
      simdgroup_matrix<T, 8, 8> a[2], b[2];
      for (int i = 0; i < 2; ++i)
        simdgroup_load(a[i], xa + (sm + 8 * i) * GemmTile::LDS + kk, GemmTile::LDS);
      // B[k][n] = W[n][k]: the weight tile is stored row n = output column, so load transposed.
      for (int j = 0; j < 2; ++j)
        simdgroup_load(b[j], wb + (sn + 8 * j) * GemmTile::LDS + kk, GemmTile::LDS, ulong2(0, 0), true);
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
    }
    if (more) loader.stash(xs + (cur ^ 1u) * x_stage, ws + (cur ^ 1u) * w_stage);
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }

  // Accumulators -> threadgroup memory -> bounds-checked, coalesced stores (adjacent threads
  // write adjacent outputs of a row).
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      simdgroup_store(acc[i][j], cs + (sm + 8 * i) * GemmTile::BN + sn + 8 * j, GemmTile::BN);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint e = tid; e < GemmTile::BM * GemmTile::BN; e += GemmTile::THREADS) {
    const uint m = m0 + e / GemmTile::BN, n = n0 + e % GemmTile::BN;
    if (m >= args.m || n >= args.n) continue;
    const float v = cs[e];
    if (args.splits > 1) {
      partials[(ulong(group.z) * args.m + m) * args.n + n] = v;
    } else {
      out[ulong(m) * args.n + n] = T(v + (args.has_bias ? bias[n] : 0.0f));
    }
  }
}

// Split-K epilogue: out = sum of the splits' fp32 partials + bias, one thread per output.
template <typename T>
METAL_FUNC void gemm_reduce_impl(device const float* partials, device const float* bias,
                                 device T* out, constant GemmArgs& args, uint idx) {
  const uint total = args.m * args.n;
  if (idx >= total) return;
  float s = 0.0f;
  for (uint p = 0; p < args.splits; ++p) s += partials[ulong(p) * total + idx];
  if (args.has_bias) s += bias[idx % args.n];
  out[idx] = T(s);
}

// ---------------------------------------------------------------------------------------------
// Thin named kernels: marlin_{gemv,gemv_rows,gemm}_<format>_<dtype>_gs<G|K> and
// marlin_gemm_reduce_<dtype>; csrc/ops/gemm.cpp builds the same names. Buffer slots are shared
// by all of them (the host binds by these indices):
//   0 weight, 1 scales, 2 biases, 3 global_scale, 4 x, 5 bias (float32), 6 out,
//   7 partials (gemm split-K / gemm_reduce), 8 args.

#define marlin_gemm_common_params(T)                                                              \
  device const uint *weight [[buffer(0)]], device const uchar *scales [[buffer(1)]],             \
      device const uchar *biases [[buffer(2)]], device const float *global_scale [[buffer(3)]],  \
      device const T *x [[buffer(4)]], device const float *bias [[buffer(5)]],                   \
      device T *out [[buffer(6)]]

#define instantiate_gemv(fmt_name, Fmt, type_name, T, gs_name, gs)                                 \
  kernel void marlin_gemv_##fmt_name##_##type_name##_gs##gs_name(                                 \
      marlin_gemm_common_params(T), constant GemmArgs &args [[buffer(8)]],                        \
      uint2 group [[threadgroup_position_in_grid]],                                               \
      uint simd_gid [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) { \
    gemv_impl<T, Fmt, gs>(weight, scales, biases, global_scale, x, bias, out, args, group,        \
                          simd_gid, lane);                                                        \
  }                                                                                               \
  kernel void marlin_gemv_rows_##fmt_name##_##type_name##_gs##gs_name(                            \
      marlin_gemm_common_params(T), constant GemmArgs &args [[buffer(8)]],                        \
      uint2 group [[threadgroup_position_in_grid]],                                               \
      uint simd_gid [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) { \
    gemv_rows_impl<T, Fmt, gs>(weight, scales, biases, global_scale, x, bias, out, args, group,   \
                               simd_gid, lane);                                                   \
  }

#define instantiate_gemm(fmt_name, Fmt, type_name, T, gs_name, gs)                                 \
  kernel void marlin_gemm_##fmt_name##_##type_name##_gs##gs_name(                                 \
      marlin_gemm_common_params(T), device float *partials [[buffer(7)]],                         \
      constant GemmArgs &args [[buffer(8)]], uint3 group [[threadgroup_position_in_grid]],        \
      uint tid [[thread_index_in_threadgroup]], uint simd_gid [[simdgroup_index_in_threadgroup]]) { \
    threadgroup T xs[2 * GemmTile::BM * GemmTile::LDS];                                           \
    threadgroup T ws[2 * GemmTile::BN * GemmTile::LDS];                                           \
    threadgroup float cs[GemmTile::BM * GemmTile::BN];                                            \
    gemm_impl<T, Fmt, gs>(weight, scales, biases, global_scale, x, bias, out, partials, args, xs, \
                          ws, cs, group, tid, simd_gid);                                          \
  }

#define instantiate_gemm_reduce(type_name, T)                                                     \
  kernel void marlin_gemm_reduce_##type_name(                                                     \
      device const float *partials [[buffer(7)]], device const float *bias [[buffer(5)]],         \
      device T *out [[buffer(6)]], constant GemmArgs &args [[buffer(8)]],                         \
      uint idx [[thread_position_in_grid]]) {                                                     \
    gemm_reduce_impl<T>(partials, bias, out, args, idx);                                          \
  }

// Stacks: activation types, then the standard group sizes (docs/FORMAT.md §3).
#define instantiate_gemm_types(inst, fmt_name, Fmt, gs_name, gs) \
  inst(fmt_name, Fmt, float16, half, gs_name, gs)                 \
  MARLIN_IF_BFLOAT(inst(fmt_name, Fmt, bfloat16, bfloat, gs_name, gs)) \
  inst(fmt_name, Fmt, float32, float, gs_name, gs)

#define instantiate_gemm_groups(inst, fmt_name, Fmt)           \
  instantiate_gemm_types(inst, fmt_name, Fmt, 32, 32)          \
  instantiate_gemm_types(inst, fmt_name, Fmt, 64, 64)          \
  instantiate_gemm_types(inst, fmt_name, Fmt, 128, 128)        \
  instantiate_gemm_types(inst, fmt_name, Fmt, 256, 256)        \
  instantiate_gemm_types(inst, fmt_name, Fmt, K, -1)

// One row per format (the table of docs/FORMAT.md §3), for kernel family `inst`.
#define instantiate_gemm_formats(inst)                           \
  instantiate_gemm_groups(inst, fp4, fp4_format)                 \
  instantiate_gemm_types(inst, mxfp4, mxfp4_format, 32, 32)      \
  instantiate_gemm_types(inst, nvfp4, nvfp4_format, 16, 16)      \
  instantiate_gemm_groups(inst, int8, int8_format)               \
  instantiate_gemm_groups(inst, int4, int4_format)               \
  instantiate_gemm_groups(inst, int3, int3_format)               \
  instantiate_gemm_groups(inst, int2, int2_format)               \
  instantiate_gemm_groups(inst, nf4, nf4_format)                 \
  instantiate_gemm_groups(inst, nf3, nf3_format)                 \
  instantiate_gemm_groups(inst, fp8_e4m3, fp8_e4m3_format)       \
  instantiate_gemm_groups(inst, fp8_e5m2, fp8_e5m2_format)
