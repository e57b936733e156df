// Attention over fp16/bf16/fp32 K/V, as the torch op computes it (metal_marlin_torch/ops/
// attention.py): one threadgroup of ATTN_SIMDGROUPS simdgroups per query row. The row's keys are
// split along the sequence: simdgroup g takes keys lo + g, lo + g + 8, ...; its 32 lanes split the
// head dim (lane holds dims lane, lane + 32, ...), a score is one simd_sum. Each simdgroup keeps an
// online softmax in float (running max m, sum l, weighted sum acc, rescaled by exp(m_old - m_new)),
// and the simdgroups' partial results are merged through threadgroup memory at the end. Serves a
// decode step (Sq = 1) and, one row per threadgroup, a prefill; no simdgroup_matrix tiles yet.
#pragma once

#include <metal_stdlib>

#include "layer_args.h"

using namespace metal;

constant constexpr uint ATTN_SIMDGROUPS = 8;
constant constexpr uint ATTN_THREADS = ATTN_SIMDGROUPS * 32;
constant constexpr uint ATTN_MAX_D = 256;
constant constexpr uint ATTN_DIMS_PER_LANE = ATTN_MAX_D / 32;

template <typename T>  // element type of q, k, v and the output: half, bfloat or float
METAL_FUNC void attention_impl(device const T* q, device const T* k, device const T* v, device T* out,
                               constant AttentionArgs& args, threadgroup float* part_m, threadgroup float* part_l,
                               threadgroup float* part_acc, uint row, uint tid, uint sg, uint lane) {
  const uint d = args.d;
  const uint i = row % args.seq_q;
  const uint bh = row / args.seq_q;  // b * Hq + h
  const uint h = bh % args.heads_q, b = bh / args.heads_q;
  const uint kv_head = h / (args.heads_q / args.heads_k);
  device const T* qrow = q + ulong(row) * d;
  const ulong kv_base = (ulong(b) * args.heads_k + kv_head) * args.seq_k * d;
  const uint pos = args.seq_k - args.seq_q + i;
  const uint hi = args.causal ? pos + 1 : args.seq_k;                     // keys [lo, hi)
  const uint lo = (args.window > 0 && pos + 1 > args.window) ? pos + 1 - args.window : 0;

  float qv[ATTN_DIMS_PER_LANE], acc[ATTN_DIMS_PER_LANE];
  for (uint t = 0; t < ATTN_DIMS_PER_LANE; ++t) {
    const uint c = lane + 32 * t;
    qv[t] = c < d ? float(qrow[c]) : 0.0f;
    acc[t] = 0.0f;
  }
  float m = -INFINITY, l = 0.0f;
  for (uint j = lo + sg; j < hi; j += ATTN_SIMDGROUPS) {
    device const T* krow = k + kv_base + ulong(j) * d;
    device const T* vrow = v + kv_base + ulong(j) * d;
    float s = 0.0f;
    for (uint t = 0; t < ATTN_DIMS_PER_LANE; ++t) {
      const uint c = lane + 32 * t;
      if (c < d) s += qv[t] * float(krow[c]);
    }
    s = simd_sum(s) * args.scale;
    const float m_new = max(m, s);
    const float keep = exp(m - m_new);  // 0 on the first key (m = -inf)
    const float p = exp(s - m_new);
    l = l * keep + p;
    for (uint t = 0; t < ATTN_DIMS_PER_LANE; ++t) {
      const uint c = lane + 32 * t;
      if (c < d) acc[t] = acc[t] * keep + p * float(vrow[c]);
    }
    m = m_new;
  }
  // merge the simdgroups' partial softmaxes
  if (lane == 0) {
    part_m[sg] = m;
    part_l[sg] = l;
  }
  for (uint t = 0; t < ATTN_DIMS_PER_LANE; ++t) {
    const uint c = lane + 32 * t;
    if (c < d) part_acc[sg * ATTN_MAX_D + c] = acc[t];
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  if (tid < d) {
    float big = -INFINITY;
    for (uint g = 0; g < ATTN_SIMDGROUPS; ++g) big = max(big, part_m[g]);
    float num = 0.0f, den = 0.0f;
    for (uint g = 0; g < ATTN_SIMDGROUPS; ++g) {
      const float w = exp(part_m[g] - big);  // 0 for a simdgroup that saw no key
      num += part_acc[g * ATTN_MAX_D + tid] * w;
      den += part_l[g] * w;
    }
    out[ulong(row) * d + tid] = T(num / den);
  }
}

#define instantiate_attention(type_name, T)                                                           \
  kernel void marlin_attention_##type_name(                                                           \
      device const T* q [[buffer(0)]], device const T* k [[buffer(1)]], device const T* v [[buffer(2)]], \
      device T* out [[buffer(3)]], constant AttentionArgs& args [[buffer(4)]],                        \
      uint row [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]],         \
      uint sg [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {          \
    threadgroup float part_m[ATTN_SIMDGROUPS];                                                        \
    threadgroup float part_l[ATTN_SIMDGROUPS];                                                        \
    threadgroup float part_acc[ATTN_SIMDGROUPS * ATTN_MAX_D];                                         \
    attention_impl<T>(q, k, v, out, args, part_m, part_l, part_acc, row, tid, sg, lane);              \
  }
