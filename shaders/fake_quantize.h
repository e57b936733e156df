// fake_quantize (seeds/001): clip to [-1, 1], scale by s = 2^(bits-1) - 1, round half to even,
// divide by s, in float; bits = 1 is sign quantization (x >= 0 -> +1, x < 0 -> -1). NaN
// propagates: MSL's clamp returns the lower bound for NaN, so NaN is selected back explicitly.
// Two variants: `vec` (4 elements per thread, one vector load and store) for small inputs and
// `block` (1024 elements per 256-thread threadgroup staged in threadgroup memory, the seed's
// block kernel) for large ones; csrc/ops/fake_quantize.cpp picks by size.
#pragma once

#include <metal_stdlib>

#include "args.h"

using namespace metal;

METAL_FUNC float fake_quantize_one(float x, float steps) {
  // Division (not multiplication by 1/steps) to round exactly like the torch op.
  const float q = rint(clamp(x, -1.0f, 1.0f) * steps) / steps;
  const float sign = select(1.0f, -1.0f, x < 0.0f);
  return select(select(q, sign, steps == 0.0f), x, isnan(x));
}

METAL_FUNC float4 fake_quantize_four(float4 x, float steps) {
  return float4(fake_quantize_one(x.x, steps), fake_quantize_one(x.y, steps),
                fake_quantize_one(x.z, steps), fake_quantize_one(x.w, steps));
}

template <typename T>  // element type: half, bfloat or float
METAL_FUNC void fake_quantize_vec_impl(device const T* x, device T* y,
                                       constant FakeQuantizeArgs& args, uint i) {
  typedef vec<T, 4> T4;
  const uint base = 4 * i;
  if (base + 4 <= args.n) {
    ((device T4*)y)[i] = T4(fake_quantize_four(float4(((device const T4*)x)[i]), args.steps));
  } else {
    for (uint k = base; k < args.n; ++k) y[k] = T(fake_quantize_one(float(x[k]), args.steps));
  }
}

constant constexpr uint FQ_BLOCK = 1024;    // elements per threadgroup (4 KiB of floats)
constant constexpr uint FQ_THREADS = 256;   // threads per threadgroup: 4 elements each

template <typename T>
METAL_FUNC void fake_quantize_block_impl(device const T* x, device T* y,
                                         constant FakeQuantizeArgs& args,
                                         threadgroup float* tile, uint group, uint tid) {
  const uint start = group * FQ_BLOCK;
  const uint count = min(FQ_BLOCK, args.n - start);
  // Cooperative, coalesced load: consecutive threads read consecutive elements.
  for (uint i = tid; i < count; i += FQ_THREADS) tile[i] = float(x[start + i]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  // Each thread transforms 4 consecutive staged elements (one float4).
  const uint v = 4 * tid;
  if (v + 4 <= count) {
    threadgroup float4* t4 = (threadgroup float4*)tile;
    t4[tid] = fake_quantize_four(t4[tid], args.steps);
  } else {
    for (uint k = v; k < count; ++k) tile[k] = fake_quantize_one(tile[k], args.steps);
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (uint i = tid; i < count; i += FQ_THREADS) y[start + i] = T(tile[i]);
}

#define instantiate_fake_quantize(type_name, T)                                              \
  kernel void marlin_fake_quantize_vec_##type_name(                                          \
      device const T* x [[buffer(0)]], device T* y [[buffer(1)]],                            \
      constant FakeQuantizeArgs& args [[buffer(2)]], uint i [[thread_position_in_grid]]) {   \
    fake_quantize_vec_impl<T>(x, y, args, i);                                                \
  }                                                                                          \
  kernel void marlin_fake_quantize_block_##type_name(                                        \
      device const T* x [[buffer(0)]], device T* y [[buffer(1)]],                            \
      constant FakeQuantizeArgs& args [[buffer(2)]],                                         \
      uint group [[threadgroup_position_in_grid]],                                           \
      uint tid [[thread_position_in_threadgroup]]) {                                         \
    threadgroup float tile[FQ_BLOCK];                                                        \
    fake_quantize_block_impl<T>(x, y, args, tile, group, tid);                               \
  }
