// FP8 weight codes (fp8_e4m3, fp8_e5m2): the code is the float8 byte; value = scale * fp8(q).
// Two bytes per 32-bit op: bytes 0 and 2 (then 1 and 3) sit in the two halves of a half2.
#pragma once

#include "common.h"

struct fp8_e4m3_format {
  enum { bits = 8, affine = 0, global_scale = 0 };
  static METAL_FUNC float decode(uint code) { return fp8_e4m3_to_float(code); }
  static METAL_FUNC void decode_word(uint w, thread float* out) {
    for (int s = 0; s < 2; ++s) {
      const uint x = (w >> (8 * s)) & 0x00FF00FFu;
      const uint bits = ((x & 0x00800080u) << 8) | ((x & 0x007F007Fu) << 7);
      const float2 v = float2(as_type<half2>(bits)) * 256.0f;
      out[s] = select(v.x, NAN, (x & 0x7Fu) == 0x7Fu);
      out[s + 2] = select(v.y, NAN, (x & 0x007F0000u) == 0x007F0000u);
    }
  }
};

struct fp8_e5m2_format {
  enum { bits = 8, affine = 0, global_scale = 0 };
  static METAL_FUNC float decode(uint code) { return fp8_e5m2_to_float(code); }
  static METAL_FUNC void decode_word(uint w, thread float* out) {
    for (int s = 0; s < 2; ++s) {
      const uint x = (w >> (8 * s)) & 0x00FF00FFu;
      const float2 v = float2(as_type<half2>(x << 8));
      out[s] = v.x;
      out[s + 2] = v.y;
    }
  }
};
