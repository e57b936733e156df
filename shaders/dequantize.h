// dequantize: packed weight [N, words] + scales (+ biases, + global scale) -> W_hat [N, K].
// One thread per 32 consecutive codes of a row: it loads the chunk's `bits` words (one
// 16-byte load for 4-bit formats), decodes all 32 in registers and writes them. Arithmetic is
// float and matches the torch op's order (value * (scale * global) for codebook formats,
// q * scale + bias for affine ones), converted to T once at the end.
#pragma once

#include <metal_stdlib>

#include "args.h"
#include "formats/decode.h"

using namespace metal;

template <typename T,    // output element type: half, bfloat or float
          typename Fmt,  // format decoder (formats/*.h)
          int group_size>  // G; -1 = one group per row (per-channel)
METAL_FUNC void dequantize_impl(device const uint* weight, device const uchar* scales,
                                device const uchar* biases, device const float* global_scale,
                                device T* out, constant DequantizeArgs& args, uint2 pos) {
  const uint chunk = pos.x, row = pos.y;
  if (row >= args.n || chunk * 32 >= args.k) return;  // the grid is exact; defensive only
  const uint first = chunk * Fmt::bits;
  device const uint* src = weight + ulong(row) * args.words_per_row;
  uint w[Fmt::bits];
  // A per-channel row whose K * bits is not a multiple of 32 ends early: never read past it.
  for (int j = 0; j < Fmt::bits; ++j)
    w[j] = first + j < args.words_per_row ? src[first + j] : 0u;
  float q[32];
  Decode32<Fmt, Fmt::bits>::run(w, q);

  const float gscale = Fmt::global_scale ? global_scale[0] : 1.0f;
  const uint k0 = chunk * 32;
  const uint count = min(32u, args.k - k0);
  device T* dst = out + ulong(row) * args.k + k0;
  const uint group_base = row * args.groups_per_row;
  for (uint i = 0; i < count; ++i) {
    const uint g = group_base + (group_size > 0 ? (k0 + i) / uint(group_size) : 0u);
    const float s = load_scale(scales, g, args.scale_kind);
    float v;
    if (Fmt::affine) {
      v = q[i] * s + load_scale(biases, g, args.bias_kind);
    } else {
      v = q[i] * (s * gscale);
    }
    dst[i] = T(v);
  }
}

// Thin named kernels: marlin_dequantize_<format>_<dtype>_gs<G|K>; csrc/ops/dequantize.cpp
// builds the same names.
#define instantiate_dequantize(fmt_name, Fmt, type_name, T, gs_name, gs)                       \
  kernel void marlin_dequantize_##fmt_name##_##type_name##_gs##gs_name(                        \
      device const uint* weight [[buffer(0)]], device const uchar* scales [[buffer(1)]],       \
      device const uchar* biases [[buffer(2)]], device const float* global_scale [[buffer(3)]], \
      device T* out [[buffer(4)]], constant DequantizeArgs& args [[buffer(5)]],                \
      uint2 pos [[thread_position_in_grid]]) {                                                  \
    dequantize_impl<T, Fmt, gs>(weight, scales, biases, global_scale, out, args, pos);         \
  }

#define instantiate_dequantize_types(fmt_name, Fmt, gs_name, gs)          \
  instantiate_dequantize(fmt_name, Fmt, float16, half, gs_name, gs)       \
  MARLIN_IF_BFLOAT(instantiate_dequantize(fmt_name, Fmt, bfloat16, bfloat, gs_name, gs)) \
  instantiate_dequantize(fmt_name, Fmt, float32, float, gs_name, gs)

// The standard group sizes of docs/FORMAT.md §3 (32, 64, 128, 256, per-channel).
#define instantiate_dequantize_groups(fmt_name, Fmt)        \
  instantiate_dequantize_types(fmt_name, Fmt, 32, 32)       \
  instantiate_dequantize_types(fmt_name, Fmt, 64, 64)       \
  instantiate_dequantize_types(fmt_name, Fmt, 128, 128)     \
  instantiate_dequantize_types(fmt_name, Fmt, 256, 256)     \
  instantiate_dequantize_types(fmt_name, Fmt, K, -1)

// The affine integer formats: the standard groups and 16 (GGUF's K-quant sub-blocks).
#define instantiate_dequantize_affine_groups(fmt_name, Fmt) \
  instantiate_dequantize_types(fmt_name, Fmt, 16, 16)       \
  instantiate_dequantize_groups(fmt_name, Fmt)
