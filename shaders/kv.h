// Quantized KV cache (TurboQuant-style): the kernels of marlin::kv_quantize, kv_dequantize,
// kv_dequantize_seq and kv_attention. The layout and the rule are docs/KV_CACHE.md §3; the
// pure-torch oracle is metal_marlin_torch/ops/kv.py, and every float operation here is the
// oracle's, in the same order (the norm's sum of squares is the oracle's halving tree), so the
// kernels' results are bitwise the oracle's wherever sqrt and division are correctly rounded
// (the emulator; Apple documents sqrt without fast math as precise, not its exact ULP bound).
//
// Cache of one stream (K or V): codes uint8 [H, C, D/2] (4-bit, element 2j in the low nibble
// of byte j) or [H, C, D] (5/6/8-bit), norms float [H, C, P], codebook float [2^bits].
#pragma once

#include <metal_stdlib>

#include "kv_args.h"

using namespace metal;

constant constexpr uint KV_MAX_THREADS = 256;  // threads of a quantize/dequantize threadgroup
constant constexpr uint KV_ATTN_SIMDGROUPS = 4;  // simdgroups of an attention threadgroup
constant constexpr uint KV_ATTN_HEADS = 8;       // query heads (of one GQA group) per attention threadgroup

// Bytes per position of a row's codes.
template <int BITS>
METAL_FUNC uint kv_packed_dim(uint d) { return BITS == 4 ? d / 2 : d; }

// Code of element e of one position's codes.
template <int BITS>
METAL_FUNC uint kv_code(device const uchar* codes, uint e) {
  if (BITS == 4) {
    const uint byte = codes[e >> 1];
    return (e & 1u) ? (byte >> 4) : (byte & 0xFu);
  }
  return codes[e];
}

// Dequantized element e: c[code] * (norm_b * (1/sqrt(B))), the oracle's order.
template <int BITS>
METAL_FUNC float kv_value(device const uchar* codes, device const float* norms, device const float* codebook,
                          constant KVArgs& a, uint e) {
  return codebook[kv_code<BITS>(codes, e)] * (norms[e / a.block] * a.rsqrt_block);
}

// Nearest level: the number of cell edges mid_j = (c_j + c_{j+1}) * 0.5 below u (binary search
// over the sorted edges; a tie goes to the lower level, as torch.searchsorted(left)).
template <int BITS>
METAL_FUNC uint kv_nearest(device const float* codebook, float u) {
  uint code = 0;
  for (uint step = (1u << BITS) / 2; step > 0; step >>= 1) {
    const uint j = code + step - 1;
    if ((codebook[j + 1] + codebook[j]) * 0.5f < u) code += step;
  }
  return code;
}

// ---- quantize: one threadgroup per (row, token) ------------------------------------------------
// Loads x in float into threadgroup memory, runs the FWHT stages of span 1, 2, ..., D/2 as the
// torch hadamard op does ((a, b) -> (a + b, a - b), then * 1/sqrt(D)), sums squares per block by
// the oracle's halving tree (first half + second half) in threadgroup memory, quantizes, and
// writes the position given by `positions`
// (positions outside [0, C) write nothing: on MPS the host cannot check them without a sync).
template <typename T,  // element type of x: half, bfloat or float
          int BITS,    // code width: 4, 5, 6 or 8
          int D>       // head_dim, a power of two
METAL_FUNC void kv_quantize_impl(device const T* x, device const long* positions, device uchar* packed,
                                 device float* norms, device const float* codebook, constant KVArgs& a,
                                 threadgroup float* tile, threadgroup float* sq, threadgroup uchar* codes,
                                 uint2 group, uint tid) {
  constexpr uint TR = D < int(KV_MAX_THREADS) ? D : KV_MAX_THREADS;  // threads
  constexpr uint R = D / TR;                                          // elements per thread
  constexpr uint B = D < 256 ? D : 256;                               // block of one norm
  constexpr uint P = D / B;
  const uint row = group.x, tok = group.y;
  device const T* src = x + (ulong(row) * a.n + tok) * D;
  for (uint r = 0; r < R; ++r) tile[r * TR + tid] = float(src[r * TR + tid]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint h = 1; h < uint(D); h <<= 1) {
    for (uint j = tid; j < uint(D) / 2; j += TR) {
      const uint i = (j / h) * 2 * h + (j % h);
      const float p = tile[i], q = tile[i + h];
      tile[i] = p + q;
      tile[i + h] = p - q;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint r = 0; r < R; ++r) {
    const uint e = r * TR + tid;
    const float y = tile[e] * a.rsqrt_dim;
    tile[e] = y;
    sq[e] = y * y;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint s = B / 2; s > 0; s >>= 1) {
    for (uint r = 0; r < R; ++r) {
      const uint e = r * TR + tid;
      if (e % B < s) sq[e] += sq[e + s];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (uint r = 0; r < R; ++r) {
    const uint e = r * TR + tid;
    const float norm = sqrt(sq[(e / B) * B]);
    const float inv = norm > 0.0f ? a.sqrt_block / norm : 0.0f;
    codes[e] = uchar(kv_nearest<BITS>(codebook, tile[e] * inv));
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const long pos = positions[tok];
  if (pos < 0 || pos >= long(a.capacity)) return;  // uniform over the threadgroup, after the last barrier
  const ulong slot = ulong(row) * a.capacity + ulong(pos);
  device uchar* dst = packed + slot * kv_packed_dim<BITS>(D);
  if (BITS == 4) {
    for (uint j = tid; j < uint(D) / 2; j += TR) dst[j] = uchar(codes[2 * j] | (codes[2 * j + 1] << 4));
  } else {
    for (uint r = 0; r < R; ++r) dst[r * TR + tid] = codes[r * TR + tid];
  }
  for (uint b = tid; b < P; b += TR) norms[slot * P + b] = sqrt(sq[b * B]);
}

// ---- dequantize: one threadgroup per (row, position) -----------------------------------------
// Positions [start, start + n) of every row -> out [H, n, D] float. kv_dequantize (one position)
// dispatches this same kernel with n = 1, so the seeds/003 parity contract holds by construction
// and is tested in the emulator.
template <int BITS>
METAL_FUNC void kv_dequantize_impl(device const uchar* packed, device const float* norms,
                                   device const float* codebook, device float* out, constant KVArgs& a,
                                   uint2 group, uint tid, uint threads) {
  const uint row = group.x, i = group.y;
  const ulong slot = ulong(row) * a.capacity + a.start + i;
  device const uchar* codes = packed + slot * kv_packed_dim<BITS>(a.head_dim);
  device const float* nrm = norms + slot * a.norms_per_pos;
  device float* dst = out + (ulong(row) * a.n + i) * a.head_dim;
  for (uint e = tid; e < a.head_dim; e += threads) dst[e] = kv_value<BITS>(codes, nrm, codebook, a, e);
}

// ---- decode attention, flash-decoding split ----------------------------------------------------
// Threadgroup (row r, head slice j, chunk c) serves query heads r * G + g for g in
// [j * 8, min(j * 8 + 8, G)) (GQA: the heads that share row r's keys and values) over positions
// [c * chunk, min((c + 1) * chunk, length)). Its 4 simdgroups take every 4th position; the 32
// lanes split D (lane l holds elements l, l + 32, ...), decode each position's codes straight
// from the cache once for all the slice's heads (no dequantized copy), reduce each head's score
// with simd_sum and keep an online softmax per head (running max m, sum l, accumulator). The
// simdgroups are merged through threadgroup memory, one head at a time, and the chunk's
// (m, l, acc[D]) written per head; a second kernel merges the chunks. q is already rotated and
// the output stays in the rotated domain.
template <int BITS,  // code width
          int D>     // head_dim (32..512)
METAL_FUNC void kv_attention_impl(device const float* q, device const uchar* k_packed, device const float* k_norms,
                                  device const uchar* v_packed, device const float* v_norms,
                                  device const float* codebook, device float* part_m, device float* part_l,
                                  device float* part_acc, constant KVArgs& a, threadgroup float* sm,
                                  threadgroup float* sl, threadgroup float* sacc, uint3 group, uint sgid,
                                  uint lane) {
  constexpr uint EPL = D / 32;  // elements per lane
  constexpr uint SG = KV_ATTN_SIMDGROUPS;
  constexpr uint MG = KV_ATTN_HEADS;
  const uint row = group.x, g0 = group.y * MG, c = group.z;
  const uint ng = min(MG, a.group - g0);  // heads of this slice
  const uint first = c * a.chunk, last = min(first + a.chunk, a.length);
  float qv[MG][EPL], acc[MG][EPL], m[MG], l[MG];
  for (uint g = 0; g < MG; ++g) {
    // -FLT_MAX, not -INFINITY: no infinities even under fast math; exp(-FLT_MAX - s) is 0
    m[g] = -FLT_MAX;
    l[g] = 0.0f;
    for (uint i = 0; i < EPL; ++i) {
      qv[g][i] = g < ng ? q[(ulong(row) * a.group + g0 + g) * D + lane + 32 * i] : 0.0f;
      acc[g][i] = 0.0f;
    }
  }
  const uint pd = kv_packed_dim<BITS>(D);
  for (uint p = first + sgid; p < last; p += SG) {
    const ulong slot = ulong(row) * a.capacity + p;
    float kval[EPL], vval[EPL];
    for (uint i = 0; i < EPL; ++i) {
      kval[i] = kv_value<BITS>(k_packed + slot * pd, k_norms + slot * a.norms_per_pos, codebook, a, lane + 32 * i);
      vval[i] = kv_value<BITS>(v_packed + slot * pd, v_norms + slot * a.norms_per_pos, codebook, a, lane + 32 * i);
    }
    for (uint g = 0; g < ng; ++g) {
      float dot = 0.0f;
      for (uint i = 0; i < EPL; ++i) dot += qv[g][i] * kval[i];
      const float s = simd_sum(dot) * a.scale;
      const float m_new = max(m[g], s);
      const float corr = exp(m[g] - m_new), w = exp(s - m_new);
      l[g] = l[g] * corr + w;
      for (uint i = 0; i < EPL; ++i) acc[g][i] = acc[g][i] * corr + w * vval[i];
      m[g] = m_new;
    }
  }
  const uint tid = sgid * 32 + lane;
  for (uint g = 0; g < ng; ++g) {
    if (lane == 0) {
      sm[sgid] = m[g];
      sl[sgid] = l[g];
    }
    for (uint i = 0; i < EPL; ++i) sacc[sgid * D + lane + 32 * i] = acc[g][i];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float big = sm[0];
    for (uint s = 1; s < SG; ++s) big = max(big, sm[s]);  // a real score: the chunk is never empty
    const ulong part = (ulong(row) * a.group + g0 + g) * a.chunks + c;
    for (uint e = tid; e < uint(D); e += 32 * SG) {
      float t = 0.0f;
      for (uint s = 0; s < SG; ++s) t += sacc[s * D + e] * exp(sm[s] - big);  // idle simdgroup: weight 0
      part_acc[part * D + e] = t;
    }
    if (tid == 0) {
      float total = 0.0f;
      for (uint s = 0; s < SG; ++s) total += sl[s] * exp(sm[s] - big);
      part_m[part] = big;
      part_l[part] = total;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // before the next head reuses sm, sl, sacc
  }
}

// Merge the chunks: out[qh, e] = Σ_c acc_c[e] e^(m_c - M) / Σ_c l_c e^(m_c - M), M = max_c m_c.
METAL_FUNC void kv_attention_reduce_impl(device const float* part_m, device const float* part_l,
                                         device const float* part_acc, device float* out, constant KVArgs& a,
                                         uint2 pos) {
  const uint e = pos.x, qh = pos.y;
  if (e >= a.head_dim || qh >= a.rows * a.group) return;
  device const float* pm = part_m + ulong(qh) * a.chunks;
  float big = pm[0];
  for (uint c = 1; c < a.chunks; ++c) big = max(big, pm[c]);
  float num = 0.0f, den = 0.0f;
  for (uint c = 0; c < a.chunks; ++c) {
    const float w = exp(pm[c] - big);
    num += part_acc[(ulong(qh) * a.chunks + c) * a.head_dim + e] * w;
    den += part_l[ulong(qh) * a.chunks + c] * w;
  }
  out[ulong(qh) * a.head_dim + e] = num / den;
}

// ---- thin named kernels (csrc/ops/kv.cpp builds the same names) ---------------------------------

#define instantiate_kv_quantize(type_name, T, bits, d)                                                    \
  kernel void marlin_kv_quantize_##type_name##_b##bits##_d##d(                                            \
      device const T* x [[buffer(0)]], device const long* positions [[buffer(1)]],                        \
      device uchar* packed [[buffer(2)]], device float* norms [[buffer(3)]],                              \
      device const float* codebook [[buffer(4)]], constant KVArgs& args [[buffer(5)]],                    \
      uint2 group [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]]) {        \
    threadgroup float tile[d];                                                                            \
    threadgroup float sq[d];                                                                              \
    threadgroup uchar codes[d];                                                                           \
    kv_quantize_impl<T, bits, d>(x, positions, packed, norms, codebook, args, tile, sq, codes, group, tid); \
  }

#define instantiate_kv_dequantize(bits)                                                                  \
  kernel void marlin_kv_dequantize_b##bits(                                                              \
      device const uchar* packed [[buffer(0)]], device const float* norms [[buffer(1)]],                 \
      device const float* codebook [[buffer(2)]], device float* out [[buffer(3)]],                       \
      constant KVArgs& args [[buffer(4)]], uint2 group [[threadgroup_position_in_grid]],                 \
      uint tid [[thread_position_in_threadgroup]], uint threads [[threads_per_threadgroup]]) {           \
    kv_dequantize_impl<bits>(packed, norms, codebook, out, args, group, tid, threads);                  \
  }

#define instantiate_kv_attention(bits, d)                                                                  \
  kernel void marlin_kv_attention_b##bits##_d##d(                                                          \
      device const float* q [[buffer(0)]], device const uchar* k_packed [[buffer(1)]],                     \
      device const float* k_norms [[buffer(2)]], device const uchar* v_packed [[buffer(3)]],               \
      device const float* v_norms [[buffer(4)]], device const float* codebook [[buffer(5)]],               \
      device float* part_m [[buffer(6)]], device float* part_l [[buffer(7)]],                              \
      device float* part_acc [[buffer(8)]], constant KVArgs& args [[buffer(9)]],                           \
      uint3 group [[threadgroup_position_in_grid]], uint sgid [[simdgroup_index_in_threadgroup]],          \
      uint lane [[thread_index_in_simdgroup]]) {                                                           \
    threadgroup float sm[KV_ATTN_SIMDGROUPS];                                                              \
    threadgroup float sl[KV_ATTN_SIMDGROUPS];                                                              \
    threadgroup float sacc[KV_ATTN_SIMDGROUPS * d];                                                        \
    kv_attention_impl<bits, d>(q, k_packed, k_norms, v_packed, v_norms, codebook, part_m, part_l, part_acc, \
                               args, sm, sl, sacc, group, sgid, lane);                                     \
  }

#define instantiate_kv_head_dims(macro, ...) \
  macro(__VA_ARGS__, 32)                     \
  macro(__VA_ARGS__, 64)                     \
  macro(__VA_ARGS__, 128)                    \
  macro(__VA_ARGS__, 256)                    \
  macro(__VA_ARGS__, 512)
