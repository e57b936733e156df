// rms_norm and layer_norm over the last dim, one threadgroup of NORM_THREADS per row, as the
// torch ops compute them (metal_marlin_torch/ops/layer.py): statistics in float, thread t reads
// elements t, t + 256, ... (coalesced), sums reduced by simd_sum then across the simdgroups
// through threadgroup memory. The fused residual add rounds h = x + residual to T first (what
// the decoder layer's add gives) and writes h out. LayerNorm is two-pass (mean, then the mean of
// squared deviations) so the variance does not cancel.
#pragma once

#include <metal_stdlib>

#include "layer_args.h"

using namespace metal;

constant constexpr uint NORM_THREADS = 256;
constant constexpr uint NORM_SIMDGROUPS = NORM_THREADS / 32;

// Sum of `v` over the threadgroup, returned to every thread. `partial` holds one float per
// simdgroup; the second barrier lets the next call reuse it.
METAL_FUNC float norm_threadgroup_sum(float v, threadgroup float* partial, uint simd_id, uint lane) {
  v = simd_sum(v);
  if (lane == 0) partial[simd_id] = v;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  float s = 0.0f;
  for (uint i = 0; i < NORM_SIMDGROUPS; ++i) s += partial[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  return s;
}

// h = x (+ residual), rounded to T as the torch add rounds it.
template <typename T>
METAL_FUNC float norm_input(device const T* x, device const T* residual, bool has_residual, uint i) {
  return has_residual ? float(T(float(x[i]) + float(residual[i]))) : float(x[i]);
}

template <typename T>  // element type: half, bfloat or float
METAL_FUNC void rms_norm_impl(device const T* x, device const T* residual, device const T* weight,
                              device T* y, device T* h_out, constant NormArgs& args,
                              threadgroup float* partial, uint row, uint tid, uint simd_id, uint lane) {
  const ulong base = ulong(row) * args.d;
  x += base;
  residual += base;
  const bool res = args.has_residual != 0;
  float ss = 0.0f;
  for (uint i = tid; i < args.d; i += NORM_THREADS) {
    const float h = norm_input(x, residual, res, i);
    if (res) h_out[base + i] = T(h);
    ss += h * h;
  }
  ss = norm_threadgroup_sum(ss, partial, simd_id, lane);
  const float r = rsqrt(ss / float(args.d) + args.eps);
  for (uint i = tid; i < args.d; i += NORM_THREADS) {
    // LlamaRMSNorm: weight * (h * r).to(T), the product rounded to T
    const float h = norm_input(x, residual, res, i);
    y[base + i] = T(float(T(h * r)) * float(weight[i]));
  }
}

template <typename T>  // element type: half, bfloat or float
METAL_FUNC void layer_norm_impl(device const T* x, device const T* residual, device const T* weight,
                                device const T* bias, device T* y, device T* h_out, constant NormArgs& args,
                                threadgroup float* partial, uint row, uint tid, uint simd_id, uint lane) {
  const ulong base = ulong(row) * args.d;
  x += base;
  residual += base;
  const bool res = args.has_residual != 0;
  float s = 0.0f;
  for (uint i = tid; i < args.d; i += NORM_THREADS) {
    const float h = norm_input(x, residual, res, i);
    if (res) h_out[base + i] = T(h);
    s += h;
  }
  const float mean = norm_threadgroup_sum(s, partial, simd_id, lane) / float(args.d);
  float ss = 0.0f;
  for (uint i = tid; i < args.d; i += NORM_THREADS) {
    const float c = norm_input(x, residual, res, i) - mean;
    ss += c * c;
  }
  const float r = rsqrt(norm_threadgroup_sum(ss, partial, simd_id, lane) / float(args.d) + args.eps);
  for (uint i = tid; i < args.d; i += NORM_THREADS) {
    float v = (norm_input(x, residual, res, i) - mean) * r;
    if (args.has_weight) v *= float(weight[i]);
    if (args.has_bias) v += float(bias[i]);
    y[base + i] = T(v);
  }
}

// Buffers a call has no tensor for (residual, h_out without a residual; weight, bias when absent)
// are bound to x by the host and never accessed (the args' flags say so).
#define instantiate_norm(type_name, T)                                                                \
  kernel void marlin_rms_norm_##type_name(                                                            \
      device const T* x [[buffer(0)]], device const T* residual [[buffer(1)]],                        \
      device const T* weight [[buffer(2)]], device T* y [[buffer(3)]], device T* h_out [[buffer(4)]], \
      constant NormArgs& args [[buffer(5)]], uint row [[threadgroup_position_in_grid]],               \
      uint tid [[thread_position_in_threadgroup]], uint simd_id [[simdgroup_index_in_threadgroup]],   \
      uint lane [[thread_index_in_simdgroup]]) {                                                      \
    threadgroup float partial[NORM_SIMDGROUPS];                                                       \
    rms_norm_impl<T>(x, residual, weight, y, h_out, args, partial, row, tid, simd_id, lane);          \
  }                                                                                                   \
  kernel void marlin_layer_norm_##type_name(                                                          \
      device const T* x [[buffer(0)]], device const T* residual [[buffer(1)]],                        \
      device const T* weight [[buffer(2)]], device const T* bias [[buffer(3)]],                       \
      device T* y [[buffer(4)]], device T* h_out [[buffer(5)]], constant NormArgs& args [[buffer(6)]], \
      uint row [[threadgroup_position_in_grid]], uint tid [[thread_position_in_threadgroup]],         \
      uint simd_id [[simdgroup_index_in_threadgroup]], uint lane [[thread_index_in_simdgroup]]) {     \
    threadgroup float partial[NORM_SIMDGROUPS];                                                       \
    layer_norm_impl<T>(x, residual, weight, bias, y, h_out, args, partial, row, tid, simd_id, lane);  \
  }
