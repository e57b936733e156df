// hadamard: normalized fast Walsh-Hadamard transform (Sylvester order) of each block of B
// consecutive elements of the last dimension, in float, as the torch op computes it: stages
// of span h = 1, 2, 4, ... B/2 map the pair (a, b) at (i, i + h) to (a + b, a - b), then
// everything is multiplied by 1/sqrt(B). Same operations in the same order, so results are
// bitwise those of the torch op.
//
// A 256-thread threadgroup holds 256 / TR blocks, TR = min(B, 256) threads per block, each
// thread R = B / TR elements: element r * TR + t of its block. Then the stage of span h
//   h < 32:       partner is lane t ^ h of the same simdgroup -> simd_shuffle_xor
//   32 <= h < TR: partner thread is in another simdgroup -> exchange through threadgroup memory
//   h >= TR:      partner element is in the same thread (r ^ h/TR) -> registers
#pragma once

#include <metal_stdlib>

#include "args.h"

using namespace metal;

constant constexpr uint HADAMARD_THREADS = 256;

template <int B>
struct HadamardShape {
  enum {
    TR = B < 256 ? B : 256,  // threads per block
    BLOCKS = 256 / TR,       // blocks per threadgroup
    R = B / TR,              // elements per thread
    SMEM = BLOCKS * B,       // floats of threadgroup memory (4096 for B = 4096: 16 KiB)
  };
};

template <typename T,  // element type: half, bfloat or float
          int B>       // block length, a power of two in 1..4096
METAL_FUNC void hadamard_impl(device const T* x, device T* y, constant HadamardArgs& args,
                              threadgroup float* tile, uint group, uint tid) {
  typedef HadamardShape<B> S;
  const uint local = tid / S::TR;  // block within the threadgroup
  const uint t = tid % S::TR;      // thread within the block
  const uint block = group * S::BLOCKS + local;
  // Threads of a missing last block still run every stage: they meet the same barriers.
  const bool valid = block < args.rows;
  device const T* src = x + ulong(block) * B;
  float v[S::R];
  for (int r = 0; r < S::R; ++r) v[r] = valid ? float(src[r * S::TR + t]) : 0.0f;

  for (uint h = 1; h < min(uint(S::TR), 32u); h <<= 1) {
    for (int r = 0; r < S::R; ++r) {
      const float p = simd_shuffle_xor(v[r], ushort(h));
      v[r] = (t & h) ? p - v[r] : v[r] + p;
    }
  }
  threadgroup float* mine = tile + local * B;
  for (uint h = 32; h < uint(S::TR); h <<= 1) {
    for (int r = 0; r < S::R; ++r) mine[r * S::TR + t] = v[r];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int r = 0; r < S::R; ++r) {
      const float p = mine[r * S::TR + (t ^ h)];
      v[r] = (t & h) ? p - v[r] : v[r] + p;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int m = 1; m < S::R; m <<= 1) {
    for (int r = 0; r < S::R; ++r) {
      if (r & m) continue;
      const float a = v[r], b = v[r | m];
      v[r] = a + b;
      v[r | m] = a - b;
    }
  }
  if (valid) {
    device T* dst = y + ulong(block) * B;
    for (int r = 0; r < S::R; ++r) dst[r * S::TR + t] = T(v[r] * args.norm);
  }
}

#define instantiate_hadamard(type_name, T, B)                                               \
  kernel void marlin_hadamard_##type_name##_b##B(                                           \
      device const T* x [[buffer(0)]], device T* y [[buffer(1)]],                           \
      constant HadamardArgs& args [[buffer(2)]], uint group [[threadgroup_position_in_grid]], \
      uint tid [[thread_position_in_threadgroup]]) {                                        \
    threadgroup float tile[HadamardShape<B>::SMEM];                                         \
    hadamard_impl<T, B>(x, y, args, tile, group, tid);                                      \
  }

#define instantiate_hadamard_blocks(type_name, T) \
  instantiate_hadamard(type_name, T, 1)           \
  instantiate_hadamard(type_name, T, 2)           \
  instantiate_hadamard(type_name, T, 4)           \
  instantiate_hadamard(type_name, T, 8)           \
  instantiate_hadamard(type_name, T, 16)          \
  instantiate_hadamard(type_name, T, 32)          \
  instantiate_hadamard(type_name, T, 64)          \
  instantiate_hadamard(type_name, T, 128)         \
  instantiate_hadamard(type_name, T, 256)         \
  instantiate_hadamard(type_name, T, 512)         \
  instantiate_hadamard(type_name, T, 1024)        \
  instantiate_hadamard(type_name, T, 2048)        \
  instantiate_hadamard(type_name, T, 4096)
