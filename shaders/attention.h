// Attention over fp16/bf16/fp32 K/V, as the torch op computes it (metal_marlin_torch/ops/
// attention.py). Three kernels; the host (csrc/ops/layer.cpp, attention_plan) picks by shape:
//
// 1. attention_impl (decode, and any row when the prefill kernel does not apply): one threadgroup
//    of ATTN_SIMDGROUPS simdgroups per query row and key slice. The slice's keys are split among
//    the simdgroups: simdgroup g takes keys lo + g, lo + g + 8, ...; its 32 lanes split the head
//    dim (lane holds dims lane, lane + 32, ...), a score is one simd_sum. Each simdgroup keeps an
//    online softmax in float (running max m, sum l, weighted sum acc, rescaled by
//    exp(m_old - m_new)); the simdgroups' partial results are merged through threadgroup memory.
//    Split along the sequence (flash-decoding): with splits > 1 the grid's y is the slice, each
//    threadgroup covers keys_per_split keys of the row's range and writes its partial (m, l) and
//    unnormalized output (fp32) instead of the output; attention_reduce merges the slices. A
//    decode step has few rows (B * Hq), so without the split a long cache would run on a few
//    threadgroups while most of the GPU idles.
// 2. attention_reduce: thread (c, row) merges the slices' partials of one output element:
//    out = sum_s o_s exp(m_s - M) / sum_s l_s exp(m_s - M), M = max_s m_s.
// 3. attention_prefill_impl (flash attention): one threadgroup of 4 simdgroups per 32-row query
//    tile of one head; simdgroup g owns query rows 8g .. 8g + 7 of the tile. The Q tile is staged
//    once through threadgroup memory into simdgroup_matrix registers (D/8 tiles of 8 x 8 per
//    simdgroup). Then per 16-key tile: all 128 threads copy the K and V rows into threadgroup
//    memory (zero past Sk and past D); each simdgroup computes its 8 x 16 scores S = Q K^T with
//    simdgroup_multiply_accumulate (K loaded transposed), stores them to its own rows of the
//    score tile, and four lanes per query row apply the mask and the online softmax in fp32
//    (running max m and sum l per row; p = exp(s - m) is written back over the score); the
//    output accumulators O (8 x D in D/8 float matrices) are rescaled by exp(m_old - m_new) per
//    row and O += P V by simdgroup matrices again. At the end O / l is written through an 8 x 8
//    scratch with bounds checks. Only key tiles that some row of the query tile may attend are
//    visited (causal: up to the tile's last position; window: from its first row's window).
//
// NaN/Inf policy (the same in all three and in the torch op): scores are accumulated in float; a
// NaN score (NaN in q or k) makes the rows that attend that key NaN; a +inf score gives NaN (inf -
// inf), a -inf score gets weight 0, a row whose every attended score is -inf is NaN (0 / 0), as
// softmax does. A NaN or Inf in v reaches the rows that attend its key. The one difference: the
// torch op's matmul also multiplies the masked keys' v by their weight 0, so a non-finite v of a
// key *outside* a row's mask turns that row NaN there; the kernels skip such keys (row kernel) or
// do so only within the key tiles they visit (prefill), so tests keep v finite outside masks.
#pragma once

#include <metal_stdlib>

#include "formats/common.h"
#include "layer_args.h"

using namespace metal;

constant constexpr uint ATTN_SIMDGROUPS = 8;
constant constexpr uint ATTN_THREADS = ATTN_SIMDGROUPS * 32;
constant constexpr uint ATTN_MAX_D = 256;
constant constexpr uint ATTN_DIMS_PER_LANE = ATTN_MAX_D / 32;
constant constexpr uint ATTN_GROUP = 4;  // most query heads of one GQA group per row threadgroup

// Online-softmax helpers shared by the kernels. A key with score -inf (masked or -inf) adds
// weight 0, and a running max that stays -inf keeps the old sums (scale 1): so no inf - inf
// appears unless a score is +inf or NaN, which then spreads as it does through softmax.
METAL_FUNC float attn_weight(float s, float m) { return s == -INFINITY ? 0.0f : exp(s - m); }
METAL_FUNC float attn_rescale(float m_old, float m_new) { return m_old == m_new ? 1.0f : exp(m_old - m_new); }

// Where K and V come from, as the kernels' element type T: element `at` (= token * D + dim) with
// its token's scale (token `tok` = (b * Hk + h) * Sk + j). Plain: the T tensors (scale 1, unused).
// FP8: E4M3 bytes times the token's float32 scale, rounded to T (what the torch op's dequantize
// gives: FP8Store.dequantize). The scales are read by one lane per token and handed to the others
// by simd_shuffle (scale_of), so a token's scale crosses memory once, not once per element.
template <typename T>
struct AttnKvPlain {
  enum { has_scales = 0 };
  device const T* k;
  device const T* v;
  uint heads_k, seq_k;
  // token j of K/V head h of batch b: [B, Hk, Sk, D]
  METAL_FUNC ulong token(uint b, uint h, uint j) const { return (ulong(b) * heads_k + h) * seq_k + j; }
  METAL_FUNC float2 scales(ulong tok) const { return float2(1.0f); }
  METAL_FUNC T key(ulong at, float s) const { return k[at]; }
  METAL_FUNC T value(ulong at, float s) const { return v[at]; }
};
template <typename T>
struct AttnKvFp8 {
  enum { has_scales = 1 };
  device const uchar* k;
  device const uchar* v;
  device const float* k_scales;  // [B, Hk, Sk]
  device const float* v_scales;
  uint heads_k, seq_k;
  METAL_FUNC ulong token(uint b, uint h, uint j) const { return (ulong(b) * heads_k + h) * seq_k + j; }
  METAL_FUNC float2 scales(ulong tok) const { return float2(k_scales[tok], v_scales[tok]); }
  METAL_FUNC T key(ulong at, float s) const { return T(fp8_e4m3_to_float(k[at]) * s); }
  METAL_FUNC T value(ulong at, float s) const { return T(fp8_e4m3_to_float(v[at]) * s); }
};
// Paged K/V (fp16/bf16/fp32): pages [num_pages, Hk, P, D] (a head's P tokens contiguous), sequence
// b's token j on page block_table[b][j / P] at slot j % P. The host cannot check the table's
// entries without reading them back; the torch op does.
template <typename T>
struct AttnKvPaged {
  enum { has_scales = 0 };
  device const T* k;
  device const T* v;
  device const int* block_table;  // [B, pages_per_seq]
  uint heads_k, page_size, pages_per_seq;
  METAL_FUNC ulong token(uint b, uint h, uint j) const {
    const ulong page = ulong(uint(block_table[ulong(b) * pages_per_seq + j / page_size]));
    return (page * heads_k + h) * page_size + j % page_size;
  }
  METAL_FUNC float2 scales(ulong tok) const { return float2(1.0f); }
  METAL_FUNC T key(ulong at, float s) const { return k[at]; }
  METAL_FUNC T value(ulong at, float s) const { return v[at]; }
};

// (k scale, v scale) of token tok, read by lane `leader` only and shuffled to the calling lanes
// (every lane of the simdgroup calls it; `valid`: the token exists, else (1, 1)).
template <typename KV>
METAL_FUNC float2 scale_of(KV kv, ulong tok, bool valid, uint lane, uint leader) {
  if (!KV::has_scales) return float2(1.0f);  // compile-time: the plain kernels skip the shuffle
  const float2 s = (valid && lane == leader) ? kv.scales(tok) : float2(1.0f);
  return simd_shuffle(s, ushort(leader));
}

template <typename T,   // element type of q and the output: half, bfloat or float
          typename KV>  // K/V source (AttnKvPlain<T>, AttnKvFp8<T> or AttnKvPaged<T>)
METAL_FUNC void attention_impl(device const T* q, KV kv, device T* out,
                               device float* part_ml, device float* part_o, constant AttentionArgs& args,
                               threadgroup float* part_m, threadgroup float* part_l, threadgroup float* part_acc,
                               uint unit, uint split, uint tid, uint sg, uint lane) {
  // unit = (first query head's b * Hq + h) / heads_per_tg * Sq + i: this threadgroup serves query
  // row i of heads_per_tg consecutive query heads of one GQA group, which share the K/V head, so
  // each key and value element is read once for all of them.
  const uint d = args.d, gh = args.heads_per_tg;
  const uint i = unit % args.seq_q;
  const uint bh0 = unit / args.seq_q * gh;  // b * Hq + h of the first head
  const uint h0 = bh0 % args.heads_q, b = bh0 / args.heads_q;
  const uint kv_head = h0 / (args.heads_q / args.heads_k);
  const uint pos = args.seq_k - args.seq_q + i;
  const uint row_hi = args.causal ? pos + 1 : args.seq_k;  // the row's keys: [row_lo, row_hi)
  const uint row_lo = (args.window > 0 && pos + 1 > args.window) ? pos + 1 - args.window : 0;
  // this threadgroup's slice of them (the whole range when splits = 1; may be empty)
  const uint lo = min(row_hi, row_lo + split * args.keys_per_split);
  const uint hi = min(row_hi, lo + args.keys_per_split);

  float qv[ATTN_GROUP][ATTN_DIMS_PER_LANE], acc[ATTN_GROUP][ATTN_DIMS_PER_LANE];
  float m[ATTN_GROUP], l[ATTN_GROUP];
  for (uint g = 0; g < ATTN_GROUP; ++g) {
    device const T* qrow = q + (ulong(bh0 + min(g, gh - 1)) * args.seq_q + i) * d;
    for (uint t = 0; t < ATTN_DIMS_PER_LANE; ++t) {
      const uint c = lane + 32 * t;
      qv[g][t] = (g < gh && c < d) ? float(qrow[c]) : 0.0f;
      acc[g][t] = 0.0f;
    }
    m[g] = -INFINITY;
    l[g] = 0.0f;
  }
  for (uint j = lo + sg; j < hi; j += ATTN_SIMDGROUPS) {
    const ulong tok = kv.token(b, kv_head, j);
    const float2 kvs = scale_of(kv, tok, true, lane, 0);
    float kf[ATTN_DIMS_PER_LANE], vf[ATTN_DIMS_PER_LANE];
    for (uint t = 0; t < ATTN_DIMS_PER_LANE; ++t) {
      const uint c = lane + 32 * t;
      kf[t] = c < d ? float(kv.key(tok * d + c, kvs.x)) : 0.0f;
      vf[t] = c < d ? float(kv.value(tok * d + c, kvs.y)) : 0.0f;
    }
    for (uint g = 0; g < gh; ++g) {
      float s = 0.0f;
      for (uint t = 0; t < ATTN_DIMS_PER_LANE; ++t) s += qv[g][t] * kf[t];
      s = simd_sum(s) * args.scale;
      const float m_new = max(m[g], s);
      const float keep = attn_rescale(m[g], m_new);
      const float p = attn_weight(s, m_new);
      l[g] = l[g] * keep + p;
      for (uint t = 0; t < ATTN_DIMS_PER_LANE; ++t) acc[g][t] = acc[g][t] * keep + p * vf[t];
      m[g] = m_new;
    }
  }
  // merge the simdgroups' partial softmaxes, one head at a time through threadgroup memory
  for (uint g = 0; g < gh; ++g) {
    const uint row = (bh0 + g) * args.seq_q + i;
    if (lane == 0) {
      part_m[sg] = m[g];
      part_l[sg] = l[g];
    }
    for (uint t = 0; t < ATTN_DIMS_PER_LANE; ++t) {
      const uint c = lane + 32 * t;
      if (c < d) part_acc[sg * ATTN_MAX_D + c] = acc[g][t];
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (tid < d) {
      float big = -INFINITY;
      for (uint w = 0; w < ATTN_SIMDGROUPS; ++w) big = max(big, part_m[w]);
      float num = 0.0f, den = 0.0f;
      for (uint w = 0; w < ATTN_SIMDGROUPS; ++w) {
        // l = 0 exactly: the simdgroup added no weight (no key, or only -inf scores); its acc is 0
        const float wt = part_l[w] == 0.0f ? 0.0f : exp(part_m[w] - big);
        num += part_acc[w * ATTN_MAX_D + tid] * wt;
        den += part_l[w] * wt;
      }
      if (args.splits == 1) {
        out[ulong(row) * d + tid] = T(num / den);
      } else {
        const ulong slot = ulong(row) * args.splits + split;
        part_o[slot * d + tid] = num;
        if (tid == 0) {
          part_ml[2 * slot] = big;
          part_ml[2 * slot + 1] = den;
        }
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the next head reuses part_m, part_l, part_acc
  }
}

template <typename T>  // output type: half, bfloat or float
METAL_FUNC void attention_reduce_impl(device const float* part_ml, device const float* part_o, device T* out,
                                      constant AttentionArgs& args, uint c, uint row) {
  if (c >= args.d) return;
  const uint splits = args.splits;
  const ulong base = ulong(row) * splits;
  float big = -INFINITY;
  for (uint s = 0; s < splits; ++s) big = max(big, part_ml[2 * (base + s)]);
  float num = 0.0f, den = 0.0f;
  for (uint s = 0; s < splits; ++s) {
    const float l = part_ml[2 * (base + s) + 1];
    const float w = l == 0.0f ? 0.0f : exp(part_ml[2 * (base + s)] - big);  // empty slice: weight 0
    num += part_o[(base + s) * args.d + c] * w;
    den += l * w;
  }
  out[ulong(row) * args.d + c] = T(num / den);
}

// ---------------------------------------------------------------------------------------------
// Prefill (flash attention with simdgroup matrices); see the top of the file.
struct AttnTile {
  enum {
    BQ = 32,          // query rows per threadgroup (8 per simdgroup)
    BK = 16,          // keys per K/V tile
    MAX_D = 128,      // head dims the prefill kernel serves (D/8 Q and O matrices per simdgroup)
    LD = MAX_D + 8,   // threadgroup row stride in elements (padding against bank conflicts, as gemm)
    SIMDGROUPS = 4,
    THREADS = SIMDGROUPS * 32,
    DC = MAX_D / 8,   // 8-column chunks of the head dim
  };
};
constant constexpr uint ATTN_PREFILL_MAX_D = AttnTile::MAX_D;
// The Q tile is staged through the K/V tile's memory (BQ rows = 2 * BK rows).
static_assert(AttnTile::BQ == 2 * AttnTile::BK, "the Q tile must fit the K and V tiles' memory");
static_assert(AttnTile::BQ == 8 * AttnTile::SIMDGROUPS, "8 query rows per simdgroup");
static_assert(AttnTile::BK == 16, "4 lanes x 4 keys per query row in the softmax step");
static_assert(AttnTile::BK * 8 == AttnTile::THREADS, "8 threads per key row in the K/V tile copy");

template <typename T,   // element type of q and the output: half, bfloat or float
          typename KV>  // K/V source (AttnKvPlain<T> or AttnKvFp8<T>)
METAL_FUNC void attention_prefill_impl(device const T* q, KV kv, device T* out,
                                       constant AttentionArgs& args, threadgroup T* kv_tile,
                                       threadgroup float* s_tile, threadgroup float* scratch, uint q_tile,
                                       uint bh, uint tid, uint sg, uint lane) {
  const uint d = args.d, sq = args.seq_q, sk = args.seq_k;
  const uint dc = (d + 7) / 8;  // 8-column chunks in use (columns d .. 8 dc - 1 are zero)
  const uint dp = dc * 8;
  const uint h = bh % args.heads_q, b = bh / args.heads_q;
  const uint kv_head = h / (args.heads_q / args.heads_k);
  device const T* qh = q + ulong(bh) * sq * d;
  device T* oh = out + ulong(bh) * sq * d;
  const uint q0 = q_tile * AttnTile::BQ;
  const uint rows = min(uint(AttnTile::BQ), sq - q0);
  threadgroup float* my_s = s_tile + sg * 8 * AttnTile::BK;  // this simdgroup's 8 score rows
  threadgroup float* my_scratch = scratch + sg * 64;         // this simdgroup's 8 x 8 scratch

  // Q tile -> threadgroup memory (rows past Sq and columns past D zero) -> registers.
  for (uint e = tid; e < AttnTile::BQ * dp; e += AttnTile::THREADS) {
    const uint r = e / dp, c = e % dp;
    kv_tile[r * AttnTile::LD + c] = (r < rows && c < d) ? qh[ulong(q0 + r) * d + c] : T(0);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  simdgroup_matrix<T, 8, 8> qm[AttnTile::DC];
  simdgroup_matrix<float, 8, 8> om[AttnTile::DC];
  for (uint c = 0; c < AttnTile::DC; ++c) {
    om[c] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    if (c < dc) simdgroup_load(qm[c], kv_tile + sg * 8 * AttnTile::LD + c * 8, AttnTile::LD);
  }

  // Softmax lanes: lane handles query row r = lane / 4 of this simdgroup, keys 4 (lane % 4) ..
  // + 3 of each tile; the four lanes of a row meet by simd_shuffle_xor 1 and 2.
  const uint r = lane / 4, kq = (lane % 4) * 4;
  const uint pos = sk - sq + q0 + sg * 8 + r;  // this lane's row's position (past Sq: unused)
  float m = -INFINITY, l = 0.0f;

  // Keys some row of the tile may attend: [lo, hi)
  const uint first = sk - sq + q0, last = first + rows - 1;
  const uint hi = args.causal ? last + 1 : sk;
  const uint lo = (args.window > 0 && first + 1 > args.window) ? first + 1 - args.window : 0;
  for (uint kt = lo / AttnTile::BK * AttnTile::BK; kt < hi; kt += AttnTile::BK) {
    // Every simdgroup is done with the previous tile (and the Q staging) before it is overwritten.
    threadgroup_barrier(mem_flags::mem_threadgroup);
    {
      // thread t copies key row t / 8 (8 threads per row, an aligned run of lanes), columns
      // t % 8 + 8 i: adjacent threads read adjacent elements
      const uint kr = tid / 8, part = tid % 8;
      const bool row_ok = kt + kr < sk;
      const ulong tok = row_ok ? kv.token(b, kv_head, kt + kr) : 0;  // no table read past Sk
      const float2 kvs = scale_of(kv, tok, row_ok, lane, lane & ~7u);
      for (uint c = part; c < dp; c += 8) {
        const bool ok = row_ok && c < d;
        kv_tile[kr * AttnTile::LD + c] = ok ? kv.key(tok * d + c, kvs.x) : T(0);
        kv_tile[(AttnTile::BK + kr) * AttnTile::LD + c] = ok ? kv.value(tok * d + c, kvs.y) : T(0);
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // S = Q K^T (8 x 16): B[dim][key] = K[key][dim], so K rows load transposed.
    for (uint jn = 0; jn < AttnTile::BK / 8; ++jn) {
      simdgroup_matrix<float, 8, 8> s = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
      for (uint c = 0; c < dc; ++c) {
        simdgroup_matrix<T, 8, 8> kb;
        simdgroup_load(kb, kv_tile + jn * 8 * AttnTile::LD + c * 8, AttnTile::LD, ulong2(0, 0), true);
        simdgroup_multiply_accumulate(s, qm[c], kb, s);
      }
      simdgroup_store(s, my_s + jn * 8, AttnTile::BK);
    }
    simdgroup_barrier(mem_flags::mem_threadgroup);

    // Online softmax of row r over this tile's keys kt + kq .. kt + kq + 3.
    float sv[4];
    float mx = -INFINITY;
    for (uint t = 0; t < 4; ++t) {
      const uint j = kt + kq + t;
      const bool ok = j < sk && (!args.causal || j <= pos) && (args.window == 0 || pos < j + args.window);
      sv[t] = ok ? my_s[r * AttnTile::BK + kq + t] * args.scale : -INFINITY;
      mx = max(mx, sv[t]);
    }
    mx = max(mx, simd_shuffle_xor(mx, ushort(1)));
    mx = max(mx, simd_shuffle_xor(mx, ushort(2)));
    const float m_new = max(m, mx);
    const float alpha = attn_rescale(m, m_new);
    float psum = 0.0f;
    for (uint t = 0; t < 4; ++t) {
      const float p = attn_weight(sv[t], m_new);
      my_s[r * AttnTile::BK + kq + t] = p;
      psum += p;
    }
    psum += simd_shuffle_xor(psum, ushort(1));
    psum += simd_shuffle_xor(psum, ushort(2));
    l = l * alpha + psum;
    m = m_new;
    simdgroup_barrier(mem_flags::mem_threadgroup);

    // O = diag(alpha) O, row by row through the scratch (a multiply by a diagonal matrix would
    // spread one row's NaN into the other seven: 0 * NaN), skipped when no row's max moved.
    const bool rescale = !simd_all(alpha == 1.0f);
    simdgroup_matrix<float, 8, 8> pm[AttnTile::BK / 8];
    for (uint jn = 0; jn < AttnTile::BK / 8; ++jn) simdgroup_load(pm[jn], my_s + jn * 8, AttnTile::BK);
    for (uint c = 0; c < dc; ++c) {
      if (rescale) {
        simdgroup_store(om[c], my_scratch, 8);
        simdgroup_barrier(mem_flags::mem_threadgroup);
        for (uint e = lane; e < 64; e += 32) my_scratch[e] *= simd_shuffle(alpha, ushort((e / 8) * 4));
        simdgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_load(om[c], my_scratch, 8);
      }
      for (uint jn = 0; jn < AttnTile::BK / 8; ++jn) {
        simdgroup_matrix<T, 8, 8> vb;
        simdgroup_load(vb, kv_tile + (AttnTile::BK + jn * 8) * AttnTile::LD + c * 8, AttnTile::LD);
        simdgroup_multiply_accumulate(om[c], pm[jn], vb, om[c]);
      }
    }
  }

  // O / l -> out, 8 columns at a time through the scratch, rows past Sq and columns past D skipped.
  for (uint c = 0; c < dc; ++c) {
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_store(om[c], my_scratch, 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    for (uint e = lane; e < 64; e += 32) {
      const float row_l = simd_shuffle(l, ushort((e / 8) * 4));
      const uint qr = sg * 8 + e / 8, col = c * 8 + e % 8;
      if (qr < rows && col < d) oh[ulong(q0 + qr) * d + col] = T(my_scratch[e] / row_l);
    }
  }
}

#define ATTN_ROW_TG_MEMORY                          \
  threadgroup float part_m[ATTN_SIMDGROUPS];        \
  threadgroup float part_l[ATTN_SIMDGROUPS];        \
  threadgroup float part_acc[ATTN_SIMDGROUPS * ATTN_MAX_D];
#define ATTN_PREFILL_TG_MEMORY(T)                                \
  threadgroup T kv_tile[2 * AttnTile::BK * AttnTile::LD];        \
  threadgroup float s_tile[AttnTile::BQ * AttnTile::BK];         \
  threadgroup float scratch[AttnTile::SIMDGROUPS * 64];

// Buffers: q 0, k 1, v 2, out 3, args 4, partials 5 and 6 (split rows), K/V scales 7 and 8 (fp8),
// block table 9 (paged).
#define instantiate_attention(type_name, T)                                                           \
  kernel void marlin_attention_##type_name(                                                           \
      device const T* q [[buffer(0)]], device const T* k [[buffer(1)]], device const T* v [[buffer(2)]], \
      device T* out [[buffer(3)]], constant AttentionArgs& args [[buffer(4)]],                        \
      device float* part_ml [[buffer(5)]], device float* part_o [[buffer(6)]],                        \
      uint2 group [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]],      \
      uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {          \
    ATTN_ROW_TG_MEMORY                                                                                \
    const AttnKvPlain<T> kv = {k, v, args.heads_k, args.seq_k};                                                                 \
    attention_impl<T>(q, kv, out, part_ml, part_o, args, part_m, part_l, part_acc, group.x, group.y, tid, sg, \
                      lane);                                                                          \
  }                                                                                                   \
  kernel void marlin_attention_fp8_##type_name(                                                       \
      device const T* q [[buffer(0)]], device const uchar* k [[buffer(1)]],                           \
      device const uchar* v [[buffer(2)]], device T* out [[buffer(3)]],                               \
      constant AttentionArgs& args [[buffer(4)]], device float* part_ml [[buffer(5)]],                \
      device float* part_o [[buffer(6)]], device const float* k_scales [[buffer(7)]],                 \
      device const float* v_scales [[buffer(8)]], uint2 group [[threadgroup_position_in_grid]],       \
      uint tid [[thread_position_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],        \
      uint lane [[thread_index_in_simdgroup]]) {                                                      \
    ATTN_ROW_TG_MEMORY                                                                                \
    const AttnKvFp8<T> kv = {k, v, k_scales, v_scales, args.heads_k, args.seq_k};                                               \
    attention_impl<T>(q, kv, out, part_ml, part_o, args, part_m, part_l, part_acc, group.x, group.y, tid, sg, \
                      lane);                                                                          \
  }                                                                                                   \
  kernel void marlin_attention_reduce_##type_name(                                                    \
      device T* out [[buffer(3)]], constant AttentionArgs& args [[buffer(4)]],                        \
      device const float* part_ml [[buffer(5)]], device const float* part_o [[buffer(6)]],            \
      uint2 gid [[thread_position_in_grid]]) {                                                        \
    attention_reduce_impl<T>(part_ml, part_o, out, args, gid.x, gid.y);                               \
  }                                                                                                   \
  kernel void marlin_attention_prefill_##type_name(                                                   \
      device const T* q [[buffer(0)]], device const T* k [[buffer(1)]], device const T* v [[buffer(2)]], \
      device T* out [[buffer(3)]], constant AttentionArgs& args [[buffer(4)]],                        \
      uint2 group [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]],      \
      uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {          \
    ATTN_PREFILL_TG_MEMORY(T)                                                                         \
    const AttnKvPlain<T> kv = {k, v, args.heads_k, args.seq_k};                                                                 \
    attention_prefill_impl<T>(q, kv, out, args, kv_tile, s_tile, scratch, group.x, group.y, tid, sg, lane); \
  }                                                                                                   \
  kernel void marlin_attention_prefill_fp8_##type_name(                                               \
      device const T* q [[buffer(0)]], device const uchar* k [[buffer(1)]],                           \
      device const uchar* v [[buffer(2)]], device T* out [[buffer(3)]],                               \
      constant AttentionArgs& args [[buffer(4)]], device const float* k_scales [[buffer(7)]],         \
      device const float* v_scales [[buffer(8)]], uint2 group [[threadgroup_position_in_grid]],       \
      uint tid [[thread_position_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],        \
      uint lane [[thread_index_in_simdgroup]]) {                                                      \
    ATTN_PREFILL_TG_MEMORY(T)                                                                         \
    const AttnKvFp8<T> kv = {k, v, k_scales, v_scales, args.heads_k, args.seq_k};                                               \
    attention_prefill_impl<T>(q, kv, out, args, kv_tile, s_tile, scratch, group.x, group.y, tid, sg, lane); \
  } \
  kernel void marlin_attention_paged_##type_name(                                                     \
      device const T* q [[buffer(0)]], device const T* k [[buffer(1)]], device const T* v [[buffer(2)]], \
      device T* out [[buffer(3)]], constant AttentionArgs& args [[buffer(4)]],                        \
      device float* part_ml [[buffer(5)]], device float* part_o [[buffer(6)]],                        \
      device const int* block_table [[buffer(9)]], uint2 group [[threadgroup_position_in_grid]],      \
      uint tid [[thread_position_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],        \
      uint lane [[thread_index_in_simdgroup]]) {                                                      \
    ATTN_ROW_TG_MEMORY                                                                                \
    const AttnKvPaged<T> kv = {k, v, block_table, args.heads_k, args.page_size, args.pages_per_seq};  \
    attention_impl<T>(q, kv, out, part_ml, part_o, args, part_m, part_l, part_acc, group.x, group.y, tid, sg, \
                      lane);                                                                          \
  }                                                                                                   \
  kernel void marlin_attention_prefill_paged_##type_name(                                             \
      device const T* q [[buffer(0)]], device const T* k [[buffer(1)]], device const T* v [[buffer(2)]], \
      device T* out [[buffer(3)]], constant AttentionArgs& args [[buffer(4)]],                        \
      device const int* block_table [[buffer(9)]], uint2 group [[threadgroup_position_in_grid]],      \
      uint tid [[thread_position_in_threadgroup]], uint sg [[simdgroup_index_in_threadgroup]],        \
      uint lane [[thread_index_in_simdgroup]]) {                                                      \
    ATTN_PREFILL_TG_MEMORY(T)                                                                         \
    const AttnKvPaged<T> kv = {k, v, block_table, args.heads_k, args.page_size, args.pages_per_seq};  \
    attention_prefill_impl<T>(q, kv, out, args, kv_tile, s_tile, scratch, group.x, group.y, tid, sg, lane); \
  }
