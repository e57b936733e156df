// Rotary position embedding of q and k in one launch, as the torch op computes it
// (metal_marlin_torch/ops/layer.py, which is transformers' apply_rotary_pos_emb with
// LlamaRotaryEmbedding's cos/sin): angle = float(pos) * inv_freq[j] in float, cos and sin
// (precise: angles reach thousands of radians) times the attention scaling rounded to T, then
// o0 = T(T(x0 c) - T(x1 s)), o1 = T(T(x1 c) + T(x0 s)). Thread (j, row) owns pair j of one row
// (rows of q, then rows of k); threads j >= R/2 copy the pass-through dims of a partial rotary.
#pragma once

#include <metal_stdlib>

#include "layer_args.h"

using namespace metal;

template <typename T>  // element type: half, bfloat or float
METAL_FUNC void rope_impl(device const T* q, device const T* k, device const long* positions,
                          device const float* inv_freq, device T* q_out, device T* k_out,
                          constant RopeArgs& args, uint2 tpos) {
  const uint j = tpos.x;
  uint row = tpos.y;
  if (j >= args.d / 2 || row >= args.rows_q + args.rows_k) return;
  const bool is_q = row < args.rows_q;
  if (!is_q) row -= args.rows_q;
  const uint heads = is_q ? args.heads_q : args.heads_k;
  device const T* src = (is_q ? q : k) + ulong(row) * args.d;
  device T* dst = (is_q ? q_out : k_out) + ulong(row) * args.d;
  const uint s = row % args.seq;
  const uint b = row / (heads * args.seq);
  if (j >= args.half_rot) {  // pass-through dims R + 2(j - R/2), and the next one
    const uint i = 2 * j;
    dst[i] = src[i];
    dst[i + 1] = src[i + 1];
    return;
  }
  const float angle = float(positions[ulong(args.pos_batch ? b : 0) * args.seq + s]) * inv_freq[j];
  const T c = T(precise::cos(angle) * args.scaling);
  const T sn = T(precise::sin(angle) * args.scaling);
  const uint i0 = args.interleaved ? 2 * j : j;
  const uint i1 = args.interleaved ? 2 * j + 1 : j + args.half_rot;
  const float x0 = float(src[i0]), x1 = float(src[i1]);
  dst[i0] = T(float(T(x0 * float(c))) - float(T(x1 * float(sn))));
  dst[i1] = T(float(T(x1 * float(c))) + float(T(x0 * float(sn))));
}

#define instantiate_rope(type_name, T)                                                                \
  kernel void marlin_rope_##type_name(                                                                \
      device const T* q [[buffer(0)]], device const T* k [[buffer(1)]],                               \
      device const long* positions [[buffer(2)]], device const float* inv_freq [[buffer(3)]],         \
      device T* q_out [[buffer(4)]], device T* k_out [[buffer(5)]], constant RopeArgs& args [[buffer(6)]], \
      uint2 tpos [[thread_position_in_grid]]) {                                                       \
    rope_impl<T>(q, k, positions, inv_freq, q_out, k_out, args, tpos);                                \
  }
