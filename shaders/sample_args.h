// Argument block of marlin::sample (shaders/sample.h), shared with the host code
// (csrc/ops/sample.cpp). Scalars only (see args.h).
#pragma once

#include "args.h"

// One threadgroup per row of logits [rows, vocab]; semantics in metal_marlin_torch/ops/sampling.py.
struct SampleArgs {
  marlin_u32 rows;         // B
  marlin_u32 vocab;        // V (<= 2^24: keeps every integer sum below 2^63)
  marlin_u32 prev_len;     // T: columns of prev_tokens (0: no repetition penalty)
  marlin_u32 greedy;       // 1: temperature == 0, the first index of the max
  marlin_u32 top_k;        // 0 < top_k < V: top-k on; 0: off
  marlin_u32 top_p;        // floor(top_p * 2^24); 2^24: off
  marlin_u32 min_weight;   // floor(min_p * 2^31): tokens of smaller weight are dropped (0: off)
  float penalty;           // repetition penalty (1: off)
  float temperature;       // > 0 unless greedy
};
