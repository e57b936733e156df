// NormalFloat codebooks: value = scale * table[q]. The tables are the float32 values of
// metal_marlin_torch/formats/nf.py (docs/FORMAT.md §4); a small constant-memory lookup.
#pragma once

#include "common.h"

constant float NF4_TABLE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};
constant float NF3_TABLE[8] = {
    -1.0f, -0.5350227355957031f, -0.2469313889741897f, 0.0f,
    0.18333752453327179f, 0.38199394941329956f, 0.6229856610298157f, 1.0f,
};

struct nf4_format {
  enum { bits = 4, affine = 0, global_scale = 0 };
  static METAL_FUNC float decode(uint code) { return NF4_TABLE[code & 15u]; }
  static METAL_FUNC void decode_word(uint w, thread float* out) {
    for (int i = 0; i < 8; ++i) out[i] = NF4_TABLE[(w >> (4 * i)) & 15u];
  }
};

struct nf3_format {
  enum { bits = 3, affine = 0, global_scale = 0 };
  static METAL_FUNC float decode(uint code) { return NF3_TABLE[code & 7u]; }
};
