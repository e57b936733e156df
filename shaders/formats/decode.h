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

// 5 and 6 bits (MLX's layout): 32 codes in `bits` words; a code whose field crosses a word
// boundary (5-bit codes 6, 12, 19, 25; 6-bit codes 5, 10, 21, 26) takes its high bits from the
// next word. The 32nd code ends exactly at the last word's top bit, so w[word + 1] stays inside.
template <typename Fmt, int bits>
struct Decode32Straddle {
  static METAL_FUNC void run(thread const uint* w, thread float* out) {
    for (int i = 0; i < 32; ++i) {
      const int bit = bits * i, word = bit >> 5, shift = bit & 31;
      uint code = w[word] >> shift;
      if (shift > 32 - bits) code |= w[word + 1] << (32 - shift);  // compile-time per unrolled i
      out[i] = Fmt::decode(code & ((1u << bits) - 1u));
    }
  }
};
template <typename Fmt>
struct Decode32<Fmt, 5> : Decode32Straddle<Fmt, 5> {};
template <typename Fmt>
struct Decode32<Fmt, 6> : Decode32Straddle<Fmt, 6> {};

// The *piece*: 8 consecutive codes of a row, starting at a multiple of 8. They occupy exactly
// `bits` bytes (8 codes x bits bits), so a piece never needs a neighbour's bits either; the
// kernels of shaders/gemm.h give each lane one piece, which lets adjacent lanes read adjacent
// bytes of weights *and* activations. The piece's bits sit in w[0] (bits <= 4: the low
// 8 * bits bits) and w[1] (bits = 8: codes 4..7; bits = 5, 6: stream bits 32..39 / 32..47).
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
// 5 and 6 bits: the piece's 40 / 48 bits are w[0] (bits 0..31) and the low bits of w[1]; codes
// whose field crosses bit 32 (5-bit code 6, 6-bit code 5) join the two words.
template <typename Fmt, int bits>
struct Decode8Wide {
  static METAL_FUNC void run(thread const uint* w, thread float* out) {
    const uint mask = (1u << bits) - 1u;
    for (int i = 0; i < 8; ++i) {
      const int bit = bits * i;  // compile-time per unrolled i
      uint code;
      if (bit >= 32) {
        code = w[1] >> (bit - 32);
      } else {
        code = w[0] >> bit;
        if (bit > 32 - bits) code |= w[1] << (32 - bit);
      }
      out[i] = Fmt::decode(code & mask);
    }
  }
};
template <typename Fmt>
struct Decode8<Fmt, 5> : Decode8Wide<Fmt, 5> {};
template <typename Fmt>
struct Decode8<Fmt, 6> : Decode8Wide<Fmt, 6> {};
