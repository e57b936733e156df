// Affine integer codes (int8, int6, int5, int4, int3, int2): unsigned q, value = scale * q + bias.
// q -> float by the fp16 magic-bias trick: OR-ing q into the mantissa of 1024.0h (0x6400)
// gives the half 1024 + q exactly (q < 1024), two codes per 32-bit op; subtracting 1024 in
// float (not half: seeds/002's compiler note on half arithmetic in inline functions) leaves q.
#pragma once

#include "common.h"

// Codes of `bits` (2, 4 or 8) bits: 32/bits per word, decoded pairwise (code s with code
// s + 16/bits, which sit at the same offset in the word's two 16-bit halves).
template <int bits_>
struct int_magic_bias {
  enum { bits = bits_, affine = 1, global_scale = 0 };
  static METAL_FUNC float decode(uint code) { return float(code); }
  static METAL_FUNC void decode_word(uint w, thread float* out) {
    const uint mask = ((1u << bits_) - 1u) * 0x00010001u;
    for (int s = 0; s < 16 / bits_; ++s) {
      const uint x = ((w >> (bits_ * s)) & mask) | 0x64006400u;
      const float2 v = float2(as_type<half2>(x)) - 1024.0f;
      out[s] = v.x;
      out[s + 16 / bits_] = v.y;
    }
  }
};
typedef int_magic_bias<8> int8_format;
typedef int_magic_bias<4> int4_format;
typedef int_magic_bias<2> int2_format;

// Codes of 3, 5 or 6 bits straddle words (32 codes fill `bits` words, MLX's layout); decode()
// is used per code by the chunk and piece decoders (formats/decode.h).
template <int bits_>
struct int_straddle {
  enum { bits = bits_, affine = 1, global_scale = 0 };
  static METAL_FUNC float decode(uint code) { return float(code); }
};
typedef int_straddle<3> int3_format;
typedef int_straddle<5> int5_format;
typedef int_straddle<6> int6_format;
