// marlin::sample: one token per row of logits [B, V] from one uniform draw per row, exactly the
// token of the pure-torch kernel (metal_marlin_torch/ops/sampling.py, which defines every step).
//
// Exactness by construction: the float steps are IEEE operations that Metal's precise math
// rounds correctly, as a CPU does (the penalty's * and /, the temperature's /, t - max, the
// multiply by LOG2E, floor, compares); from there each token has an integer weight (a fixed-point
// exp from two 64-entry tables), and every sum, cumulative sum and threshold is integer
// arithmetic, so the order in which threads add does not matter.
//
// One threadgroup of SAMPLE_THREADS per row, all in one launch; the row is re-read per pass
// (a decode step samples a handful of rows; V = 152k floats stay in the GPU's cache):
//   1. scores[i] = float(logits[i]) into the float scratch row; the repetition penalty
//      overwrites the seen tokens (each by the thread owning it, duplicates in prev_tokens too);
//   2. greedy: (max, first index, NaN flag) reduced -> the token; otherwise t = scores / T in
//      place, its max and NaN flag;
//   3. top-k: a radix select (4-bit digits, 8 passes over the float's order key) counts down
//      to the k-th largest key;
//   4. top-p: the sum W of the kept weights, then a radix select (16 passes over the 64-bit key
//      (order key of t, ~index): t descending, ties by index ascending) of the token where the
//      weight ahead reaches max(mul24(W, P), 1); tokens at or above it stay;
//   5. draw: each thread sums its contiguous chunk of surviving weights (min-p applied), thread
//      0 scans the chunk sums, the thread whose chunk holds mul24(total, U) walks it to the token.
// Histograms: each thread counts into 16 private buckets; simd_sum adds a bucket over a
// simdgroup as two uint halves (low 24 bits and the rest: no overflow for V <= 2^24), lane 0
// stores it, and every thread then scans the same 8 x 16 partials (no broadcast needed).
#pragma once

#include <metal_stdlib>

#include "sample_args.h"

using namespace metal;

constant constexpr uint SAMPLE_THREADS = 256;
constant constexpr uint SAMPLE_SIMDGROUPS = SAMPLE_THREADS / 32;
constant constexpr uint SAMPLE_RADIX = 16;  // 4-bit digits

// 2^31 * 2^(-j/64) and 2^31 * 2^(-j/4096), rounded (ops/sampling.py EXP2_HI / EXP2_LO).
constant uint SAMPLE_EXP2_HI[64] = {
    2147483648u, 2124350982u, 2101467502u, 2078830522u, 2056437387u, 2034285470u, 2012372174u, 1990694927u,
    1969251188u, 1948038440u, 1927054196u, 1906295993u, 1885761398u, 1865448001u, 1845353420u, 1825475297u,
    1805811301u, 1786359126u, 1767116489u, 1748081133u, 1729250827u, 1710623359u, 1692196547u, 1673968228u,
    1655936265u, 1638098541u, 1620452965u, 1602997467u, 1585730000u, 1568648537u, 1551751076u, 1535035634u,
    1518500250u, 1502142985u, 1485961921u, 1469955159u, 1454120821u, 1438457051u, 1422962010u, 1407633882u,
    1392470869u, 1377471191u, 1362633090u, 1347954824u, 1333434672u, 1319070932u, 1304861917u, 1290805962u,
    1276901417u, 1263146652u, 1249540052u, 1236080024u, 1222764986u, 1209593378u, 1196563654u, 1183674286u,
    1170923762u, 1158310587u, 1145833280u, 1133490379u, 1121280436u, 1109202018u, 1097253708u, 1085434106u,
};
constant uint SAMPLE_EXP2_LO[64] = {
    2147483648u, 2147120270u, 2146756953u, 2146393698u, 2146030505u, 2145667373u, 2145304302u, 2144941293u,
    2144578345u, 2144215459u, 2143852634u, 2143489870u, 2143127168u, 2142764527u, 2142401948u, 2142039429u,
    2141676973u, 2141314577u, 2140952243u, 2140589970u, 2140227759u, 2139865609u, 2139503520u, 2139141492u,
    2138779525u, 2138417620u, 2138055776u, 2137693994u, 2137332272u, 2136970612u, 2136609013u, 2136247475u,
    2135885998u, 2135524583u, 2135163228u, 2134801935u, 2134440703u, 2134079532u, 2133718422u, 2133357373u,
    2132996386u, 2132635459u, 2132274593u, 2131913789u, 2131553046u, 2131192363u, 2130831742u, 2130471182u,
    2130110682u, 2129750244u, 2129389867u, 2129029550u, 2128669295u, 2128309101u, 2127948967u, 2127588895u,
    2127228883u, 2126868932u, 2126509043u, 2126149214u, 2125789446u, 2125429739u, 2125070092u, 2124710507u,
};

// Order key of a float: unsigned compare of keys = float compare (NaN excluded); -0 counts as +0.
METAL_FUNC uint sample_order_key(float t) {
  const uint bits = as_type<uint>(t == 0.0f ? 0.0f : t);
  return (bits & 0x80000000u) != 0 ? ~bits : (bits | 0x80000000u);
}

// 64-bit key: t descending = key descending; among equal t the lower index has the larger key.
METAL_FUNC ulong sample_full_key(float t, uint i) { return (ulong(sample_order_key(t)) << 32) | ulong(~i); }

// W(t - m): 2^31 * 2^((t - m) * log2 e) in fixed point (ops/sampling.py `weights`).
METAL_FUNC ulong sample_weight(float t, float m) {
  const float y = (t - m) * as_type<float>(0x3FB8AA3Bu);  // LOG2E as float32
  if (!(y > -32.0f)) return 0;
  const uint e = uint(floor(-y * 4096.0f));
  const uint f = e & 4095u;
  return ((ulong(SAMPLE_EXP2_HI[f >> 6]) * ulong(SAMPLE_EXP2_LO[f & 63u])) >> 31) >> (e >> 12);
}

// floor(w * p / 2^24) for w < 2^55, p < 2^24.
METAL_FUNC ulong sample_mul24(ulong w, uint p) { return (w >> 24) * ulong(p) + (((w & 0xFFFFFFul) * ulong(p)) >> 24); }

// Sum of a per-thread ulong (< 2^47) over the simdgroup, exact: two uint halves.
METAL_FUNC ulong sample_simd_sum(ulong c) {
  const uint2 s = simd_sum(uint2(uint(c & 0xFFFFFFul), uint(c >> 24)));  // low 24 bits, the rest
  return (ulong(s.y) << 24) + ulong(s.x);
}

// Sum over the threadgroup of a per-thread ulong, returned to every thread.
METAL_FUNC ulong sample_group_sum(ulong c, threadgroup ulong* partial, uint simd_id, uint lane) {
  c = sample_simd_sum(c);
  if (lane == 0) partial[simd_id] = c;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  ulong s = 0;
  for (uint g = 0; g < SAMPLE_SIMDGROUPS; ++g) s += partial[g];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return s;
}

// Radix select over the 64-bit keys of row t, digits from bit 60 down to `last_shift`: the key
// K (bits below last_shift zero) at which the mass of the keys above K stays below `target` and
// the mass including K's reaches it. Mass: 1 per token (WEIGHTED false: top-k counting) or the
// token's top-k weight. Every thread returns the same K.
// The index half of the key is ~i: for i < vocab its bits from index_bits (vocab - 1's bit
// length, rounded up to a digit) to 31 are all ones, so those digits are 0xF without a pass.
template <bool WEIGHTED>
METAL_FUNC ulong sample_radix_select(device const float* t, uint vocab, float m, uint topk_key, ulong target,
                                     uint last_shift, threadgroup ulong* hist, uint tid, uint simd_id, uint lane) {
  uint index_bits = 4;
  while (index_bits < 32 && ((vocab - 1) >> index_bits) != 0) index_bits += 4;
  ulong prefix = 0;
  for (int shift = 60; shift >= int(last_shift); shift -= 4) {
    if (shift < 32 && shift >= int(index_bits)) {  // uniform: every thread skips the same passes
      prefix |= ulong(SAMPLE_RADIX - 1) << shift;
      continue;
    }
    ulong cnt[SAMPLE_RADIX];
    for (uint b = 0; b < SAMPLE_RADIX; ++b) cnt[b] = 0;
    const int above = shift + 4;
    for (uint i = tid; i < vocab; i += SAMPLE_THREADS) {
      const float v = t[i];
      const ulong key = sample_full_key(v, i);
      if (above < 64 && (key >> above) != (prefix >> above)) continue;
      ulong w = 1;
      if (WEIGHTED) w = sample_order_key(v) >= topk_key ? sample_weight(v, m) : 0;
      cnt[uint(key >> shift) & (SAMPLE_RADIX - 1)] += w;
    }
    for (uint b = 0; b < SAMPLE_RADIX; ++b) {
      const ulong c = sample_simd_sum(cnt[b]);
      if (lane == 0) hist[simd_id * SAMPLE_RADIX + b] = c;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    // every thread scans the same partials: buckets from the top, to the one reaching target
    ulong acc = 0;
    uint digit = 0;
    for (int b = int(SAMPLE_RADIX) - 1; b >= 0; --b) {
      ulong h = 0;
      for (uint g = 0; g < SAMPLE_SIMDGROUPS; ++g) h += hist[g * SAMPLE_RADIX + uint(b)];
      if (acc + h >= target) {
        digit = uint(b);
        break;
      }
      acc += h;
    }
    target -= acc;
    prefix |= ulong(digit) << shift;
    threadgroup_barrier(mem_flags::mem_threadgroup);  // hist is rewritten by the next pass
  }
  return prefix;
}

template <typename T>  // logits type: half, bfloat or float
METAL_FUNC void sample_impl(device const T* logits, device const float* uniforms, device const long* prev,
                            device float* scratch, device long* out, constant SampleArgs& a,
                            threadgroup float* red_f, threadgroup uint* red_u, threadgroup ulong* red_l,
                            threadgroup ulong* hist, uint row, uint tid, uint simd_id, uint lane) {
  const uint vocab = a.vocab;
  device const T* l = logits + ulong(row) * vocab;
  device float* t = scratch + ulong(row) * vocab;
  // 1. scores, then the repetition penalty on the seen tokens. Thread tid owns tokens
  // i = tid (mod SAMPLE_THREADS) up to the draw: it reads every prev entry and penalizes the ones
  // it owns, so duplicates in prev_tokens are written by one thread (no write/write conflict)
  // and no barrier is needed until the draw reads other threads' tokens.
  for (uint i = tid; i < vocab; i += SAMPLE_THREADS) t[i] = float(l[i]);
  device const long* p = prev + ulong(row) * a.prev_len;
  for (uint j = 0; j < a.prev_len; ++j) {
    const long tok = p[j];
    if (tok < 0 || tok >= long(vocab) || uint(tok) % SAMPLE_THREADS != tid) continue;  // padding or not ours
    const float s = float(l[tok]);
    t[tok] = s < 0.0f ? s * a.penalty : s / a.penalty;
  }
  // 2. greedy: max and its first index; sampling: t = s / temperature and its max. Both: NaN.
  float best = -INFINITY;
  uint best_i = 0xFFFFFFFFu;
  uint nan_seen = 0;
  for (uint i = tid; i < vocab; i += SAMPLE_THREADS) {
    float v = t[i];
    if (!a.greedy) {
      v = v / a.temperature;
      t[i] = v;
    }
    if (isnan(v)) {
      nan_seen = 1;
    } else if (v > best || (v == best && i < best_i)) {
      best = v;
      best_i = i;
    }
  }
  red_f[tid] = best;
  red_u[tid] = best_i;
  red_u[SAMPLE_THREADS + tid] = nan_seen;
  threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);
  if (tid == 0) {
    for (uint s = 1; s < SAMPLE_THREADS; ++s) {
      const float v = red_f[s];
      const uint i = red_u[s];
      if (v > best || (v == best && i < best_i)) {
        best = v;
        best_i = i;
      }
      nan_seen |= red_u[SAMPLE_THREADS + s];
    }
    red_f[0] = best;
    red_u[0] = best_i;
    red_u[SAMPLE_THREADS] = nan_seen;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float m = red_f[0];
  const bool invalid = red_u[SAMPLE_THREADS] != 0 || (!a.greedy && isinf(m));
  if (a.greedy || invalid) {
    if (tid == 0) out[row] = invalid ? -1 : long(red_u[0]);
    return;  // uniform: every thread read the same flags
  }
  // 3. top-k: the k-th largest order key (counted with multiplicity)
  uint topk_key = 0;
  if (a.top_k > 0)
    topk_key = uint(sample_radix_select<false>(t, vocab, m, 0, ulong(a.top_k), 32, hist, tid, simd_id, lane) >> 32);
  // 4. top-p: the weight ahead of a kept token stays below max(mul24(W, P), 1)
  ulong cut_key = 0;
  if (a.top_p < (1u << 24)) {
    ulong w_sum = 0;
    for (uint i = tid; i < vocab; i += SAMPLE_THREADS) {
      const float v = t[i];
      if (sample_order_key(v) >= topk_key) w_sum += sample_weight(v, m);
    }
    const ulong total = sample_group_sum(w_sum, red_l, simd_id, lane);
    const ulong cut = sample_mul24(total, a.top_p);
    const ulong target = cut > 0 ? cut : ulong(1);  // the best token always stays
    cut_key = sample_radix_select<true>(t, vocab, m, topk_key, target, 0, hist, tid, simd_id, lane);
  }
  // 5. draw over the survivors (min-p last), inverse CDF in vocab order
  const uint chunk = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
  const uint begin = min(tid * chunk, vocab), end = min(begin + chunk, vocab);
  ulong sum = 0;
  for (uint i = begin; i < end; ++i) {
    const float v = t[i];
    if (sample_order_key(v) < topk_key || sample_full_key(v, i) < cut_key) continue;
    const ulong w = sample_weight(v, m);
    if (w >= a.min_weight) sum += w;
  }
  red_l[tid] = sum;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid == 0) {  // exclusive scan of the chunk sums; the total after them
    ulong acc = 0;
    for (uint s = 0; s < SAMPLE_THREADS; ++s) {
      const ulong c = red_l[s];
      red_l[s] = acc;
      acc += c;
    }
    red_l[SAMPLE_THREADS] = acc;
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const ulong total = red_l[SAMPLE_THREADS];
  const float u = uniforms[row];
  const uint u24 = u >= 0.0f ? uint(min(floor(u * 16777216.0f), 16777215.0f)) : 0u;
  const ulong target = sample_mul24(total, u24);
  ulong c = red_l[tid];
  if (c <= target && target < c + sum) {  // this chunk holds the token: the first C > target
    for (uint i = begin; i < end; ++i) {
      const float v = t[i];
      if (sample_order_key(v) < topk_key || sample_full_key(v, i) < cut_key) continue;
      const ulong w = sample_weight(v, m);
      if (w < a.min_weight) continue;
      c += w;
      if (c > target) {
        out[row] = long(i);
        break;
      }
    }
  }
}

#define instantiate_sample(type_name, T)                                                                 \
  kernel void marlin_sample_##type_name(                                                                 \
      device const T* logits [[buffer(0)]], device const float* uniforms [[buffer(1)]],                  \
      device const long* prev [[buffer(2)]], device float* scratch [[buffer(3)]],                        \
      device long* out [[buffer(4)]], constant SampleArgs& args [[buffer(5)]],                           \
      uint row [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]],            \
      uint simd_id [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {        \
    threadgroup float red_f[SAMPLE_THREADS];                                                             \
    threadgroup uint red_u[2 * SAMPLE_THREADS];                                                          \
    threadgroup ulong red_l[SAMPLE_THREADS + 1];                                                         \
    threadgroup ulong hist[SAMPLE_SIMDGROUPS * SAMPLE_RADIX];                                            \
    sample_impl<T>(logits, uniforms, prev, scratch, out, args, red_f, red_u, red_l, hist, row, tid, simd_id, \
                   lane);                                                                                \
  }
