// Shared helpers of the format decoders: reading scales of any storage type and the
// small-float bit tricks (reinterpret a code's bits as a half and rescale, no branches).
#pragma once

#include <metal_stdlib>

#include "../args.h"

using namespace metal;

// FP8 E4M3 (fn: no infinities, 0x7F/0xFF are NaN) -> float. The 7 exponent+mantissa bits
// moved to the half's bit 7 upward form a half with exponent bias 15 instead of 7, so the
// value is off by 2^-8: multiply by 256. Subnormals come out right the same way.
METAL_FUNC float fp8_e4m3_to_float(uint code) {
  const uint bits = ((code & 0x80u) << 8) | ((code & 0x7Fu) << 7);
  const float v = float(as_type<half>(ushort(bits))) * 256.0f;
  return select(v, NAN, (code & 0x7Fu) == 0x7Fu);
}

// FP8 E5M2 is the upper byte of an IEEE half, infinities and NaN included.
METAL_FUNC float fp8_e5m2_to_float(uint code) {
  return float(as_type<half>(ushort(code << 8)));
}

// E8M0 exponent byte -> 2^(e - 127). e = 0 is the subnormal 2^-127 (bit 22).
METAL_FUNC float e8m0_to_float(uint e) {
  return select(as_type<float>(e << 23), as_type<float>(0x00400000u), e == 0u);
}

// One scale (or bias) of any storage kind. `kind` is uniform across the dispatch, so the
// branch never diverges.
METAL_FUNC float load_scale(device const uchar* p, uint i, uint kind) {
  switch (kind) {
    case MARLIN_SCALE_F16: return float(((device const half*)p)[i]);
    // bf16 is the upper half of a float: exact, and needs no `bfloat` type (MSL 3.0 has none).
    case MARLIN_SCALE_BF16: return as_type<float>(uint(((device const ushort*)p)[i]) << 16);
    case MARLIN_SCALE_F32: return ((device const float*)p)[i];
    case MARLIN_SCALE_E4M3: return fp8_e4m3_to_float(p[i]);
    default: return e8m0_to_float(p[i]);
  }
}
