// Every weight format, and the chunk decoder the kernels share: 32 consecutive codes of a
// row always occupy exactly `bits` words (docs/FORMAT.md §2), so a thread loads `bits` words
// and decodes 32 values. Adding a format: a header with its struct (enum bits/affine/
// global_scale, decode, and decode_word when bits divides 32), included here.
#pragma once

#include "fp4_e2m1.h"
#include "fp8.h"
#include "int.h"
#include "nf.h"

// bits in {2, 4, 8}: codes never straddle words; decode word by word.
template <typename Fmt, int bits>
struct Decode32 {
  static METAL_FUNC void run(thread const uint* w, thread float* out) {
    for (int j = 0; j < bits; ++j) Fmt::decode_word(w[j], out + j * (32 / bits));
  }
};

// 3 bits: 32 codes in 3 words; codes 10 and 21 straddle a word boundary.
template <typename Fmt>
struct Decode32<Fmt, 3> {
  static METAL_FUNC void run(thread const uint* w, thread float* out) {
    for (int i = 0; i < 32; ++i) {
      const int bit = 3 * i, word = bit >> 5, shift = bit & 31;
      uint code = w[word] >> shift;
      if (shift > 29) code |= w[word + 1] << (32 - shift);  // compile-time per unrolled i
      out[i] = Fmt::decode(code & 7u);
    }
  }
};

// The *piece*: 8 consecutive codes of a row, starting at a multiple of 8. They occupy exactly
// `bits` bytes (8 codes x bits bits), so a piece never needs a neighbour's bits either; the
// kernels of shaders/gemm.h give each lane one piece, which lets adjacent lanes read adjacent
// bytes of weights *and* activations. The piece's bits sit in w[0] (bits <= 4: the low
// 8 * bits bits) and w[1] (bits = 8: codes 4..7).
template <typename Fmt, int bits>
struct Decode8 {  // bits = 2, 3: one code at a time (3-bit codes straddle nothing here)
  static METAL_FUNC void run(thread const uint* w, thread float* out) {
    for (int i = 0; i < 8; ++i) out[i] = Fmt::decode((w[0] >> (bits * i)) & ((1u << bits) - 1u));
  }
};
template <typename Fmt>
struct Decode8<Fmt, 4> {  // one word: the format's word decoder
  static METAL_FUNC void run(thread const uint* w, thread float* out) { Fmt::decode_word(w[0], out); }
};
template <typename Fmt>
struct Decode8<Fmt, 8> {  // two words of 4 codes
  static METAL_FUNC void run(thread const uint* w, thread float* out) {
    Fmt::decode_word(w[0], out);
    Fmt::decode_word(w[1], out + 4);
  }
};
