// FP4 E2M1 codes (fp4, mxfp4, nvfp4): bit 3 sign, bits 0-2 magnitude index into
// {0, 0.5, 1, 1.5, 2, 3, 4, 6}. Decoded without a table: placed at the half's bits 9-11
// (exponent bits 10-11, mantissa bit 9) with the sign at bit 15, a code is a half whose
// exponent bias is 15 instead of 1, so the value is off by 2^-14; subnormal code 1 (0.5)
// comes out as 2^-15 and is rescaled the same way. Two codes per 32-bit op (half2).
#pragma once

#include "common.h"

struct fp4_e2m1 {
  // One code -> its grid value.
  static METAL_FUNC float decode(uint code) {
    const uint bits = ((code & 8u) << 12) | ((code & 7u) << 9);
    return float(as_type<half>(ushort(bits))) * 16384.0f;
  }
  // The 8 codes of one packed word (code i at bits 4i..4i+3) -> out[0..7].
  static METAL_FUNC void decode_word(uint w, thread float* out) {
    for (int s = 0; s < 4; ++s) {
      const uint x = w >> (4 * s);  // codes s and s + 4 at bits 0-3 and 16-19
      const uint bits = ((x & 0x00080008u) << 12) | ((x & 0x00070007u) << 9);
      const float2 v = float2(as_type<half2>(bits)) * 16384.0f;
      out[s] = v.x;
      out[s + 4] = v.y;
    }
  }
};

// value = scale * e2m1(q), scale stored as fp16/bf16/fp32.
struct fp4_format : fp4_e2m1 {
  enum { bits = 4, affine = 0, global_scale = 0 };
};
// value = 2^(e - 127) * e2m1(q), e an E8M0 byte per 32 values (OCP MX).
struct mxfp4_format : fp4_e2m1 {
  enum { bits = 4, affine = 0, global_scale = 0 };
};
// value = (global_scale * e4m3(s)) * e2m1(q), one E4M3 scale per 16 values.
struct nvfp4_format : fp4_e2m1 {
  enum { bits = 4, affine = 0, global_scale = 1 };
};
