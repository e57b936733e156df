// marlin::gemm: y[M, N] = x[M, K] @ W_hat[N, K]^T + bias, the weight read in its canonical
// packed layout (docs/FORMAT.md) and dequantized on the fly. Three kernels, chosen by the host
// (csrc/ops/gemm.cpp) from M:
//
//   gemv       M = 1      memory bound: every packed weight byte is read once, by one lane,
//                         x stays in registers, scales and biases are read once per group.
//   gemv_rows  M = 2..8   still memory bound: each decoded weight piece is reused for up to 8
//                         rows of x, so the weights are read once for all rows.
//   gemm       M > 8      compute bound: 32x32 output tiles, weight tiles dequantized into
//                         threadgroup memory by all 128 threads, simdgroup_matrix 8x8 MMA with
//                         fp32 accumulators, double-buffered; optionally split along K.
//
// The unit of work of one thread everywhere is the *piece* (formats/decode.h): 8 consecutive
// codes of a row, `bits` bytes, decoded by Decode8. It is small on purpose. A lane that owns a
// piece needs the 8 matching activations, 16 bytes for half/bfloat: one 16-byte load. With one
// piece per lane, 32 lanes read 32 adjacent pieces, so every simdgroup memory instruction reads
// one contiguous run, for the weights (bits * 32 bytes) and for x (512 bytes) alike; a larger
// unit per lane (the 32-code chunk of earlier versions) strides lanes apart in x by 64 bytes and
// wastes 7/8 of the lines each x load touches. Small pieces also let a short row (K = 512 is 64
// pieces, a per-channel K = 100 is 13) still occupy every lane (GemvShape).
// Accumulation is fp32 throughout; results are converted to the activation type once.
#pragma once

#include <metal_stdlib>

#include "args.h"
#include "formats/decode.h"

using namespace metal;

// ---------------------------------------------------------------------------------------------
// Loads.

// The `bits` bytes of one piece at p (p is 2-byte aligned for bits = 2, 4-byte for bits = 4,
// 8-byte for bits = 8 when the host found rows 8-byte aligned: args.wide_loads). One load per
// lane, adjacent lanes adjacent; 3-bit pieces (3 bytes) are three byte loads, 5-bit pieces five,
// 6-bit pieces three 2-byte loads.
template <int bits>
struct PieceLoad;
template <>
struct PieceLoad<2> {
  static METAL_FUNC void run(device const uchar* p, bool wide, thread uint* w) {
    (void)wide;
    w[0] = uint(*(device const ushort*)p);
  }
};
template <>
struct PieceLoad<3> {
  static METAL_FUNC void run(device const uchar* p, bool wide, thread uint* w) {
    (void)wide;
    w[0] = uint(p[0]) | (uint(p[1]) << 8) | (uint(p[2]) << 16);
  }
};
template <>
struct PieceLoad<5> {  // 5 bytes at any byte offset: five byte loads (w[1]: stream bits 32..39)
  static METAL_FUNC void run(device const uchar* p, bool wide, thread uint* w) {
    (void)wide;
    w[0] = uint(p[0]) | (uint(p[1]) << 8) | (uint(p[2]) << 16) | (uint(p[3]) << 24);
    w[1] = uint(p[4]);
  }
};
template <>
struct PieceLoad<6> {  // 6 bytes at an even offset (6 * piece): three 2-byte loads
  static METAL_FUNC void run(device const uchar* p, bool wide, thread uint* w) {
    (void)wide;
    device const ushort* h = (device const ushort*)p;
    w[0] = uint(h[0]) | (uint(h[1]) << 16);
    w[1] = uint(h[2]);
  }
};
template <>
struct PieceLoad<4> {
  static METAL_FUNC void run(device const uchar* p, bool wide, thread uint* w) {
    (void)wide;
    w[0] = *(device const uint*)p;
  }
};
template <>
struct PieceLoad<8> {
  static METAL_FUNC void run(device const uchar* p, bool wide, thread uint* w) {
    if (wide) {
      const uint2 v = *(device const uint2*)p;
      w[0] = v.x;
      w[1] = v.y;
    } else {
      w[0] = ((device const uint*)p)[0];
      w[1] = ((device const uint*)p)[1];
    }
  }
};

// Words holding one piece (formats/decode.h: w[1] only for 5-, 6- and 8-bit codes).
template <int bits>
struct PieceWords {
  enum { value = bits > 4 ? 2 : 1 };
};

// Piece `piece` of a row of `row_bytes` bytes (words_per_row * 4). The last piece of a
// per-channel row can run past the row's last word (8-bit codes, K % 8 = 4): bytes past the row
// read as 0, byte by byte (never past the row; rows never share a word).
template <int bits>
METAL_FUNC void load_piece(device const uint* row, uint piece, uint row_bytes, bool wide,
                           thread uint* w) {
  const uint first = piece * bits;
  device const uchar* p = (device const uchar*)row + first;
  if (first + bits <= row_bytes) {
    PieceLoad<bits>::run(p, wide, w);
  } else {
    uint v[2] = {0u, 0u};
    for (int j = 0; j < bits; ++j)
      if (first + j < row_bytes) v[j / 4] |= uint(p[j]) << (8 * (j % 4));
    for (int j = 0; j < PieceWords<bits>::value; ++j) w[j] = v[j];
  }
}

// The 8 activations of a piece, for 2-byte types one 16-byte load (reinterpreted as 4 pairs:
// 32 lanes then read 512 contiguous bytes in one instruction; two 4-vector loads would each
// touch every line with half the lanes' bytes). `wide`: the host found x's rows 8-element
// aligned (args.x_wide_loads) and the piece lies inside K. Otherwise element by element,
// zeros past `valid` (the short last piece of a per-channel row: never read x past K).
template <typename T>
struct XPiece {  // half, bfloat
  static METAL_FUNC void load(device const T* p, uint valid, bool wide, thread T* out) {
    if (wide && valid == 8) {
      const uint4 u = *(device const uint4*)p;
      const vec<T, 2> a = as_type<vec<T, 2>>(u.x), b = as_type<vec<T, 2>>(u.y);
      const vec<T, 2> c = as_type<vec<T, 2>>(u.z), d = as_type<vec<T, 2>>(u.w);
      out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y;
      out[4] = c.x; out[5] = c.y; out[6] = d.x; out[7] = d.y;
    } else {
      for (uint j = 0; j < 8; ++j) out[j] = j < valid ? p[j] : T(0.0f);
    }
  }
};
template <>
struct XPiece<float> {  // 32 bytes: two 16-byte loads (each instruction half the lanes' lines)
  static METAL_FUNC void load(device const float* p, uint valid, bool wide, thread float* out) {
    if (wide && valid == 8) {
      const float4 a = *(device const float4*)p, b = *(device const float4*)(p + 4);
      out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
      out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    } else {
      for (uint j = 0; j < 8; ++j) out[j] = j < valid ? p[j] : 0.0f;
    }
  }
};

template <typename T>
METAL_FUNC void load_x8(device const T* p, uint valid, bool wide, thread float* out) {
  T v[8];
  XPiece<T>::load(p, valid, wide, v);
  for (int j = 0; j < 8; ++j) out[j] = float(v[j]);
}

// Scale (.x) and bias (.y) of group g, loaded by one lane (`leader`) and handed to the lanes
// whose pieces lie in the same group by simd_shuffle: a group's scale crosses memory once per
// row instead of once per lane (a group of 128 spans 16 lanes). Every lane of the simdgroup
// must call it (uniform control flow); `load` is false for the lanes that only receive.
template <typename Fmt>
METAL_FUNC float2 group_params(device const uchar* scales, device const uchar* biases, uint g,
                               uint scale_kind, uint bias_kind, bool load, ushort leader) {
  float2 sb = float2(0.0f, 0.0f);
  if (load) {
    sb.x = load_scale(scales, g, scale_kind);
    if (Fmt::affine) sb.y = load_scale(biases, g, bias_kind);
  }
  if (Fmt::affine) return simd_shuffle(sb, leader);
  return float2(simd_shuffle(sb.x, leader), 0.0f);
}

// Sum over the `lanes` lanes of each aligned lane segment (lanes a power of two dividing 32):
// a butterfly of shuffles when several rows share the simdgroup, one simd_sum otherwise.
METAL_FUNC float segment_sum(float v, uint lanes) {
  if (lanes == 32) return simd_sum(v);
  for (ushort off = ushort(lanes / 2); off > 0; off >>= 1) v += simd_shuffle_xor(v, off);
  return v;
}

// ---------------------------------------------------------------------------------------------
// Piece dot products (gemv): d = sum_i x[i] * code_value(i) over one piece (8 codes, one group:
// groups are >= 16 codes and pieces start at multiples of 8). The scale is applied by the
// caller once per piece, not per weight.

// Generic: decode the 8 codes (formats/decode.h, branch-free) and dot in fp32. Codes at or past
// `valid` (padding bits in the last word of a per-channel row) are dropped, not multiplied by a
// zero activation: a padding code may decode to NaN (fp8).
template <typename Fmt>
struct PieceDot {
  static METAL_FUNC void prepare(thread float* x) { (void)x; }
  static METAL_FUNC float run(thread const float* x, thread const uint* w, uint valid) {
    float q[8];
    Decode8<Fmt, Fmt::bits>::run(w, q);
    float d = 0.0f;
    for (uint i = 0; i < 8; ++i) d = fma(x[i], i < valid ? q[i] : 0.0f, d);
    return d;
  }
};

// Integer codes of 2, 4, 8 bits: activations pre-scaled to remove the shifts (MLX's qdot
// trick). The piece is read as 16-bit halves (as_type, free); code i of a half sits at bit
// b*(i % PER_HALF), so (half & (mask << b*(i % PER_HALF))) converted to float is q * 2^(b*(i %
// PER_HALF)) exactly, and x was divided by that power of two once per piece (exact). One AND
// and one convert per code, no shift, and the prepared x serves all the rows a lane handles.
// Integer codes are finite, so the zero activations past K cancel padding codes.
template <int b>
struct PieceDot<int_magic_bias<b>> {
  enum { PER_WORD = 32 / b, PER_HALF = 16 / b };
  static METAL_FUNC void prepare(thread float* x) {
    for (int i = 0; i < 8; ++i) x[i] *= 1.0f / float(1u << (b * (i % PER_HALF)));
  }
  static METAL_FUNC float run(thread const float* x, thread const uint* w, uint valid) {
    (void)valid;
    float d = 0.0f;
    for (int i = 0; i < 8; ++i) {
      const ushort2 h = as_type<ushort2>(w[i / PER_WORD]);
      const uint half_word = (i % PER_WORD) < PER_HALF ? uint(h.x) : uint(h.y);
      const uint mask = ((1u << b) - 1u) << (b * (i % PER_HALF));
      d = fma(x[i], float(half_word & mask), d);
    }
    return d;
  }
};

// ---------------------------------------------------------------------------------------------
// gemv: M = 1.
//
// Threadgroup = 2 simdgroups. The host picks L = args.gemv_lanes, the lanes that share one
// weight row: the number of pieces in a row (ceil(K/8)) rounded up to a power of two, at most
// 32. A simdgroup is then 32/L *slots* of L lanes; slot s takes rows n_base + i*(32/L) + s for
// i < 4, lane p of a slot takes pieces p, p + L, ... of its row. So for K >= 256 one row spans
// the simdgroup (32 pieces = 256 codes per instruction), and a short row no longer leaves lanes
// idle: K = 512 (64 pieces) keeps all 32 lanes busy for two steps (a lane per 32-code chunk used
// only 16); a per-channel K = 100 (13 pieces) runs two rows side by side in 16-lane slots (13
// of 16 lanes busy, where a lane per chunk used 4 of 32), and the 32/L rows one instruction
// reads are adjacent in memory. Per piece a lane loads its 8 activations once (one 16-byte
// load) and for each of its 4 rows loads the piece (bits bytes) and accumulates
//     acc += s * sum(x * q)                 (codebook formats)
//     acc += s * sum(x * q) + b * sum(x)    (affine: w = s*q + b, so sum(x*w) factors)
// with s, b loaded once per group by one lane and shuffled to the others (group_params); a
// per-channel row applies its scale (and bias times sum(x)) once, after the reduction. nvfp4's
// global scale multiplies the final sum. A segment_sum per row reduces a slot's lanes; the
// slot's first lane writes.
struct GemvShape {
  enum {
    SIMDGROUPS = 2,    // per threadgroup
    ROWS_PER_SLOT = 4, // weight rows (outputs) per slot: x registers reused 4 times
    PIECE = 8,         // codes per lane and step (formats/decode.h)
    THREADS = SIMDGROUPS * 32,
    MAX_M = 8,         // gemv_rows: rows of x per threadgroup (host: M <= 8 uses gemv_rows)
  };
};

// Where a lane works in gemv / gemv_rows (GemvShape): its slot, its first piece, its rows.
struct GemvLane {
  uint lanes;    // L: lanes per row
  uint slots;    // 32 / L: rows side by side in one simdgroup
  uint slot;     // this lane's slot
  uint p0;       // this lane's first piece of a row (then p0 + L, ...)
  uint n_base;   // first row of the simdgroup; row i of this lane: n_base + i * slots + slot
  uint steps;    // ceil(pieces / L), the same for every lane (shuffles need all 32 lanes)
  ushort leader; // lane that loads the group parameters this lane's piece uses
};

template <int group_size>
METAL_FUNC GemvLane gemv_lane(constant GemmArgs& args, uint group_x, uint simd_gid, uint lane) {
  GemvLane g;
  g.lanes = args.gemv_lanes;
  g.slots = 32u / g.lanes;
  g.slot = lane / g.lanes;
  g.p0 = lane % g.lanes;
  g.n_base = (group_x * GemvShape::SIMDGROUPS + simd_gid) * GemvShape::ROWS_PER_SLOT * g.slots;
  const uint pieces = (args.k + GemvShape::PIECE - 1) / GemvShape::PIECE;
  g.steps = (pieces + g.lanes - 1) / g.lanes;
  // Lanes of one slot step through a row L pieces at a time from a multiple of L, and a group
  // (a power of two >= 16 codes) starts at a multiple of its G/8 pieces: the lanes sharing a
  // group are the aligned run of min(G/8, L) lanes (per-channel: the slot) around this one.
  const uint run = group_size > 0 ? min(uint(group_size) / GemvShape::PIECE, g.lanes) : g.lanes;
  g.leader = ushort(lane & ~(run - 1u));
  return g;
}

template <typename T,          // activation / output type: half, bfloat or float
          typename Fmt,        // weight format decoder (formats/*.h)
          int group_size>      // G; -1 = per-channel
METAL_FUNC void gemv_impl(device const uint* weight, device const uchar* scales,
                          device const uchar* biases, device const float* global_scale,
                          device const T* x, device const float* bias, device T* out,
                          constant GemmArgs& args, uint2 group, uint simd_gid, uint lane) {
  enum { R = GemvShape::ROWS_PER_SLOT };
  const GemvLane gl = gemv_lane<group_size>(args, group.x, simd_gid, lane);
  const uint m = group.y;
  device const T* xm = x + ulong(m) * args.k;
  const uint row_bytes = args.words_per_row * 4u;

  float acc[R];
  for (int i = 0; i < R; ++i) acc[i] = 0.0f;
  float xsum_all = 0.0f;  // per-channel affine: sum(x) over this lane's pieces
  for (uint step = 0; step < gl.steps; ++step) {
    const uint piece = step * gl.lanes + gl.p0;
    const uint k0 = piece * GemvShape::PIECE;
    const uint valid = k0 < args.k ? min(uint(GemvShape::PIECE), args.k - k0) : 0u;
    float xv[8];
    load_x8<T>(xm + k0, valid, args.x_wide_loads != 0, xv);
    float xsum = 0.0f;
    if (Fmt::affine)
      for (int j = 0; j < 8; ++j) xsum += xv[j];
    xsum_all += xsum;
    PieceDot<Fmt>::prepare(xv);
    for (int i = 0; i < R; ++i) {
      const uint n = gl.n_base + uint(i) * gl.slots + gl.slot;
      const bool ok = valid > 0 && n < args.n;  // not uniform: every lane goes on to the shuffle
      float d = 0.0f;
      if (ok) {
        uint w[PieceWords<Fmt::bits>::value];
        load_piece<Fmt::bits>(weight + ulong(n) * args.words_per_row, piece, row_bytes,
                              args.wide_loads != 0, w);
        d = PieceDot<Fmt>::run(xv, w, valid);
      }
      if (group_size > 0) {
        const uint g = n * args.groups_per_row + k0 / uint(group_size);
        const float2 sb = group_params<Fmt>(scales, biases, g, args.scale_kind, args.bias_kind,
                                            ok && lane == gl.leader, gl.leader);
        if (ok) acc[i] += Fmt::affine ? fma(sb.y, xsum, sb.x * d) : sb.x * d;
      } else {
        acc[i] += d;
      }
    }
  }
  const float gscale = Fmt::global_scale ? global_scale[0] : 1.0f;
  const float xsum_row = group_size < 0 && Fmt::affine ? segment_sum(xsum_all, gl.lanes) : 0.0f;
  for (int i = 0; i < R; ++i) {
    float y = segment_sum(acc[i], gl.lanes);  // every lane takes part, even for rows past N
    const uint n = gl.n_base + uint(i) * gl.slots + gl.slot;
    if (gl.p0 == 0 && n < args.n) {
      if (group_size < 0) {  // per-channel: the row's one scale (and bias), applied once
        y *= load_scale(scales, n, args.scale_kind);
        if (Fmt::affine) y = fma(load_scale(biases, n, args.bias_kind), xsum_row, y);
      }
      out[ulong(m) * args.n + n] = T(y * gscale + (args.has_bias ? bias[n] : 0.0f));
    }
  }
}

// gemv_rows: M = 2..8 (rows m0 .. m0 + 7 of x, masked by M).
//
// Same lanes, slots and pieces as gemv, but each decoded piece is dequantized once
// (v = s*q + b or s*q, one multiply-add per weight, the torch op's order) and then used for
// every row of x: the weights are read from memory once for all M rows. The factored form of
// gemv would cost M extra adds per weight instead of one. A lane loads the 8 activations of
// its piece for every row of x once per step (64 registers at M = 8) and reuses them for its
// 4 weight rows; x (at most 8 * K values, shared by every threadgroup) comes from cache.
template <typename T,          // activation / output type: half, bfloat or float
          typename Fmt,        // weight format decoder (formats/*.h)
          int group_size>      // G; -1 = per-channel
METAL_FUNC void gemv_rows_impl(device const uint* weight, device const uchar* scales,
                               device const uchar* biases, device const float* global_scale,
                               device const T* x, device const float* bias, device T* out,
                               constant GemmArgs& args, uint2 group, uint simd_gid, uint lane) {
  enum { R = GemvShape::ROWS_PER_SLOT, ROWS = GemvShape::MAX_M };
  const GemvLane gl = gemv_lane<group_size>(args, group.x, simd_gid, lane);
  const uint m0 = group.y * ROWS;
  const uint rows = min(uint(ROWS), args.m - m0);  // uniform
  const uint row_bytes = args.words_per_row * 4u;
  const float gscale = Fmt::global_scale ? global_scale[0] : 1.0f;

  // Per-channel: each row's one scale (and bias), loaded once by the slot's first lane.
  float2 row_sb[R];
  for (int i = 0; i < R; ++i) {
    const uint n = gl.n_base + uint(i) * gl.slots + gl.slot;
    row_sb[i] = group_size < 0 ? group_params<Fmt>(scales, biases, n, args.scale_kind,
                                                   args.bias_kind, n < args.n && lane == gl.leader,
                                                   gl.leader)
                               : float2(0.0f, 0.0f);
  }

  float acc[ROWS][R];
  for (int r = 0; r < ROWS; ++r)
    for (int i = 0; i < R; ++i) acc[r][i] = 0.0f;
  for (uint step = 0; step < gl.steps; ++step) {
    const uint piece = step * gl.lanes + gl.p0;
    const uint k0 = piece * GemvShape::PIECE;
    const uint valid = k0 < args.k ? min(uint(GemvShape::PIECE), args.k - k0) : 0u;
    float xv[ROWS][8];
    for (uint r = 0; r < rows; ++r)
      load_x8<T>(x + ulong(m0 + r) * args.k + k0, valid, args.x_wide_loads != 0, xv[r]);
    for (int i = 0; i < R; ++i) {
      const uint n = gl.n_base + uint(i) * gl.slots + gl.slot;
      const bool ok = valid > 0 && n < args.n;  // not uniform: every lane goes on to the shuffle
      float2 sb = row_sb[i];
      if (group_size > 0)
        sb = group_params<Fmt>(scales, biases, n * args.groups_per_row + k0 / uint(group_size),
                               args.scale_kind, args.bias_kind, ok && lane == gl.leader, gl.leader);
      if (!ok) continue;
      uint w[PieceWords<Fmt::bits>::value];
      load_piece<Fmt::bits>(weight + ulong(n) * args.words_per_row, piece, row_bytes,
                            args.wide_loads != 0, w);
      float v[8];
      Decode8<Fmt, Fmt::bits>::run(w, v);
      const float se = Fmt::affine ? sb.x : sb.x * gscale;  // the torch op: q * (s * global)
      for (uint j = 0; j < 8; ++j)  // padding codes past K (maybe NaN) are dropped, not scaled
        v[j] = j < valid ? (Fmt::affine ? fma(v[j], se, sb.y) : v[j] * se) : 0.0f;
      for (uint r = 0; r < rows; ++r) {
        float d = 0.0f;
        for (int j = 0; j < 8; ++j) d = fma(xv[r][j], v[j], d);
        acc[r][i] += d;
      }
    }
  }
  for (uint r = 0; r < rows; ++r)
    for (int i = 0; i < R; ++i) {
      const float y = segment_sum(acc[r][i], gl.lanes);
      const uint n = gl.n_base + uint(i) * gl.slots + gl.slot;
      if (gl.p0 == 0 && n < args.n)
        out[ulong(m0 + r) * args.n + n] = T(y + (args.has_bias ? bias[n] : 0.0f));
    }
}

// ---------------------------------------------------------------------------------------------
// gemm: M > 8.
//
// Threadgroup = 4 simdgroups (128 threads) computing a BM x BN = 32 x 32 output tile; each
// simdgroup owns a 16 x 16 quarter = 2 x 2 simdgroup_matrix<float, 8, 8> accumulators. Per K
// step of BK = 32 the tiles are 32 rows x 4 pieces, for x and for the weights, and thread t
// takes piece t % 4 of row t / 4 of both:
//   - it loads its 8 activations (one 16-byte load for half/bfloat);
//   - it loads its weight piece (bits bytes) and, if it leads its group's lanes, the scale;
//     after the MMAs it receives the scale by simd_shuffle, decodes and dequantizes its 8
//     values in registers (fp32, the torch op's order) and stores them as T into the 32 x 32
//     weight tile: the weights cross memory once, packed, and become T only in threadgroup
//     memory.
//   All 128 threads decode (each 8 of a step's 1024 weights). Earlier, one thread per weight
//   row decoded a whole 32-code chunk, so 3 of the 4 simdgroups idled through the decode
//   and the other one did 4 times the work, every step. A simdgroup's instruction now reads
//   8 rows x 4 adjacent pieces (8 runs of bits * 4 bytes), where it used to read 32 rows x 1
//   chunk.
//   - each simdgroup runs 4 k-steps of 2 x 2 MMAs from threadgroup memory (A = x tile rows,
//     B = weight tile rows loaded transposed).
// Double buffering: the global loads of step k+1 are issued into registers before the MMAs of
// step k and stored into the other threadgroup buffer after them, so device latency hides
// behind the math; one barrier per step suffices because a step's stash writes the buffer the
// MMAs of the previous step read, and the barrier that ended the previous step separates them.
// Rows are padded by 8 elements (16 bytes for half) so the 8 rows a simdgroup_load touches
// start in different banks.
// Edge tiles: x rows >= M, weight rows >= N and columns >= the split's K end load as zeros
// (weights too, so a NaN code of the next split never meets a zero activation), outputs are
// written through threadgroup memory with bounds checks. Split-K (group.z = split index):
// each split writes fp32 partial sums [splits, M, N]; gemm_reduce adds them and the bias.
struct GemmTile {
  enum {
    BM = 32,           // output rows (of x) per threadgroup
    BN = 32,           // output columns (weight rows) per threadgroup
    BK = 32,           // K per step
    LDS = BK + 8,      // threadgroup row stride in elements (padding against bank conflicts)
    THREADS = 128,     // 4 simdgroups, 2 x 2 over the tile
    SM = 16,           // rows of the tile per simdgroup
    SN = 16,           // columns of the tile per simdgroup
    PIECES = BK / 8,   // pieces per tile row and step: thread t takes piece t % 4 of row t / 4
  };
};
static_assert(GemmTile::BM * GemmTile::PIECES == GemmTile::THREADS &&
                  GemmTile::BN * GemmTile::PIECES == GemmTile::THREADS,
              "one x piece and one weight piece per thread and step");

// The global -> register -> threadgroup path of one gemm threadgroup (MLX's BlockLoader idea).
template <typename T, typename Fmt, int group_size>
struct GemmLoader {
  device const uint* weight;
  device const uchar* scales;
  device const uchar* biases;
  device const T* x;
  device const uint* row_map;  // x row of each tile row index (moe: rows sorted by expert); null: identity
  uint m, n, k, words_per_row, groups_per_row, scale_kind, bias_kind;  // copied from GemmArgs (m: end row)
  bool wide, x_wide;
  uint row, part;  // this thread's tile row and piece in it (tid / 4, tid % 4)
  ushort leader;   // lane that loads this thread's group scale
  uint m0, n0, k_end;
  float gscale;
  // registers of the step in flight
  T xreg[8];
  uint wreg[PieceWords<Fmt::bits>::value];
  float2 sbreg;  // scale, bias: loaded by the leader only, kept while the group lasts
  uint g_held;   // group whose parameters sbreg holds (~0u: none)
  uint k0;       // first K of this thread's piece
  bool w_ok;     // the piece exists (row < N, k0 < the split's end)

  METAL_FUNC GemmLoader(device const uint* weight_, device const uchar* scales_,
                        device const uchar* biases_, float gscale_, device const T* x_,
                        device const uint* row_map_, uint m_end_, constant GemmArgs& args_,
                        uint tid_, uint m0_, uint n0_, uint k_end_)
      : weight(weight_), scales(scales_), biases(biases_), x(x_), row_map(row_map_), m(m_end_), n(args_.n),
        k(args_.k), words_per_row(args_.words_per_row), groups_per_row(args_.groups_per_row),
        scale_kind(args_.scale_kind), bias_kind(args_.bias_kind), wide(args_.wide_loads != 0),
        x_wide(args_.x_wide_loads != 0), row(tid_ / GemmTile::PIECES),
        part(tid_ % GemmTile::PIECES), m0(m0_), n0(n0_), k_end(k_end_), gscale(gscale_),
        sbreg(0.0f, 0.0f), g_held(~0u), k0(0), w_ok(false) {
    // The 4 pieces of a row and step share a group unless G = 16 (nvfp4: pairs do); lanes are
    // tid % 32 and a row's 4 threads are an aligned run of lanes.
    const uint run = group_size > 0 ? min(uint(group_size) / 8u, uint(GemmTile::PIECES))
                                    : uint(GemmTile::PIECES);
    leader = ushort((tid_ % 32u) & ~(run - 1u));
  }

  // Issue the device reads of the step starting at kstart (a multiple of 32).
  METAL_FUNC void fetch(uint kstart, uint lane) {
    k0 = kstart + part * 8u;
    const uint xm = m0 + row;
    const uint valid = xm < m && k0 < k_end ? min(8u, k_end - k0) : 0u;
    const uint src = xm < m ? (row_map ? row_map[xm] : xm) : 0u;
    XPiece<T>::load(x + ulong(src) * k + k0, valid, x_wide, xreg);
    const uint wn = n0 + row;
    w_ok = wn < n && k0 < k_end;
    if (w_ok) {
      load_piece<Fmt::bits>(weight + ulong(wn) * words_per_row, k0 / 8u, words_per_row * 4u, wide,
                            wreg);
      // A group spans G/32 steps (per-channel: all of them): its scale is loaded once, when the
      // group starts, and kept in the leader's register, not re-read every step.
      const uint g = wn * groups_per_row + (group_size > 0 ? k0 / uint(group_size) : 0u);
      if (lane == leader && g != g_held) {
        sbreg.x = load_scale(scales, g, scale_kind);
        if (Fmt::affine) sbreg.y = load_scale(biases, g, bias_kind);
        g_held = g;
      }
    }
  }

  // Decode and store the fetched step into threadgroup buffers xs, ws (one stage each). Every
  // thread calls it (the shuffle needs all lanes).
  METAL_FUNC void stash(threadgroup T* xs, threadgroup T* ws) {
    const uint col = part * 8u;
    for (int j = 0; j < 8; ++j) xs[row * GemmTile::LDS + col + j] = xreg[j];
    const float2 sb = Fmt::affine ? simd_shuffle(sbreg, leader)
                                  : float2(simd_shuffle(sbreg.x, leader), 0.0f);
    float v[8];
    if (w_ok) {
      Decode8<Fmt, Fmt::bits>::run(wreg, v);
      const float se = Fmt::affine ? sb.x : sb.x * gscale;  // the torch op: q * (s * global)
      for (uint j = 0; j < 8; ++j)
        v[j] = k0 + j < k_end ? (Fmt::affine ? fma(v[j], se, sb.y) : v[j] * se) : 0.0f;
    } else {
      for (int j = 0; j < 8; ++j) v[j] = 0.0f;
    }
    for (int j = 0; j < 8; ++j) ws[row * GemmTile::LDS + col + j] = T(v[j]);
  }
};

// The main loop of one output tile: rows m0 .. min(m0 + BM, m_end) (of x, or of row_map when
// it is not null: moe_gemm's rows sorted by expert) times weight rows n0 .. n0 + BN over K range
// [k_begin, k_end). Leaves the fp32 tile in cs (BM x BN, row-major) after a barrier; the caller
// writes it out.
template <typename T,          // activation / output type: half, bfloat or float
          typename Fmt,        // weight format decoder (formats/*.h)
          int group_size>      // G; -1 = per-channel
METAL_FUNC void gemm_tile_impl(device const uint* weight, device const uchar* scales,
                               device const uchar* biases, float gscale, device const T* x,
                               device const uint* row_map, uint m0, uint m_end, uint n0,
                               uint k_begin, uint k_end, constant GemmArgs& args,
                               threadgroup T* xs, threadgroup T* ws, threadgroup float* cs,
                               uint tid, uint simd_gid) {
  const uint steps = (k_end - k_begin + GemmTile::BK - 1) / GemmTile::BK;
  const uint lane = tid % 32u;
  GemmLoader<T, Fmt, group_size> loader(weight, scales, biases, gscale, x, row_map, m_end, args, tid,
                                        m0, n0, k_end);

  const uint sm = simd_gid / 2 * GemmTile::SM, sn = simd_gid % 2 * GemmTile::SN;
  simdgroup_matrix<float, 8, 8> acc[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);

  const uint x_stage = GemmTile::BM * GemmTile::LDS, w_stage = GemmTile::BN * GemmTile::LDS;
  loader.fetch(k_begin, lane);
  loader.stash(xs, ws);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = 0; s < steps; ++s) {
    const uint cur = s & 1u;
    const bool more = s + 1 < steps;  // uniform: every thread runs the same steps
    if (more) loader.fetch(k_begin + (s + 1) * GemmTile::BK, lane);
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
  // Accumulators -> threadgroup memory, from where the caller's bounds-checked, coalesced
  // stores read them (adjacent threads write adjacent outputs of a row).
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j)
      simdgroup_store(acc[i][j], cs + (sm + 8 * i) * GemmTile::BN + sn + 8 * j, GemmTile::BN);
  threadgroup_barrier(mem_flags::mem_threadgroup);
}

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
  const float gscale = Fmt::global_scale ? global_scale[0] : 1.0f;
  gemm_tile_impl<T, Fmt, group_size>(weight, scales, biases, gscale, x, (device const uint*)nullptr,
                                     m0, args.m, n0, k_begin, k_end, args, xs, ws, cs, tid, simd_gid);
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

// The affine integer formats: the standard groups and 16 (GGUF's K-quant sub-blocks).
#define instantiate_gemm_affine_groups(inst, fmt_name, Fmt)    \
  instantiate_gemm_types(inst, fmt_name, Fmt, 16, 16)          \
  instantiate_gemm_groups(inst, fmt_name, Fmt)

// One row per format (the table of docs/FORMAT.md §3), for kernel family `inst`.
#define instantiate_gemm_formats(inst)                           \
  instantiate_gemm_groups(inst, fp4, fp4_format)                 \
  instantiate_gemm_types(inst, mxfp4, mxfp4_format, 32, 32)      \
  instantiate_gemm_types(inst, nvfp4, nvfp4_format, 16, 16)      \
  instantiate_gemm_affine_groups(inst, int8, int8_format)        \
  instantiate_gemm_affine_groups(inst, int4, int4_format)        \
  instantiate_gemm_affine_groups(inst, int3, int3_format)        \
  instantiate_gemm_affine_groups(inst, int2, int2_format)        \
  instantiate_gemm_groups(inst, nf4, nf4_format)                 \
  instantiate_gemm_groups(inst, nf3, nf3_format)                 \
  instantiate_gemm_groups(inst, fp8_e4m3, fp8_e4m3_format)       \
  instantiate_gemm_groups(inst, fp8_e5m2, fp8_e5m2_format)       \
  instantiate_gemm_affine_groups(inst, int6, int6_format)        \
  instantiate_gemm_affine_groups(inst, int5, int5_format)
