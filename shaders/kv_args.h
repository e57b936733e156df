// Argument block of the quantized-KV-cache kernels (shaders/kv.h), shared with the host code
// (csrc/ops/kv.cpp). Scalars only (see args.h).
#pragma once

#include "args.h"

struct KVArgs {
  marlin_u32 rows;           // H: batch x KV heads folded together
  marlin_u32 capacity;       // C: positions per row in the cache
  marlin_u32 head_dim;       // D: a power of two
  marlin_u32 block;          // B = min(D, 256): rotated coordinates per norm
  marlin_u32 norms_per_pos;  // P = D / B
  marlin_u32 start;          // dequantize: first position read
  marlin_u32 n;              // dequantize: positions read; quantize: tokens of x
  marlin_u32 length;         // attention: positions [0, length) attended
  marlin_u32 group;          // attention: query heads per cache row (GQA)
  marlin_u32 chunk;          // attention: positions per threadgroup (flash-decoding split)
  marlin_u32 chunks;         // attention: ceil(length / chunk)
  float sqrt_block;          // sqrt(B), rounded once to float (ops/kv.py block_constants)
  float rsqrt_block;         // 1/sqrt(B), rounded once to float
  float rsqrt_dim;           // 1/sqrt(D): the normalization of the Hadamard transform
  float scale;               // attention: softmax scale
};
