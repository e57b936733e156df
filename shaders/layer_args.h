// Argument blocks of the decoder-layer kernels (shaders/norm.h, act.h, rope.h), shared with the
// host code (csrc/ops/layer.cpp). Scalars only (see args.h).
#pragma once

#include "args.h"

// marlin::rms_norm, marlin::layer_norm: one threadgroup per row of d elements.
struct NormArgs {
  marlin_u32 rows;          // rows (leading dims flattened)
  marlin_u32 d;             // elements per row (normalized dim)
  marlin_u32 has_residual;  // 1: h = x + residual (rounded to T) is normalized and written out
  marlin_u32 has_weight;    // layer_norm: 1 multiplies by weight (rms_norm always does)
  marlin_u32 has_bias;      // layer_norm: 1 adds bias
  float eps;                // added to the mean square / variance
};

// marlin::silu_mul, marlin::gelu_mul: y[r, i] = T(T(act(gate[r, i])) * up[r, i]).
struct ActArgs {
  marlin_u32 rows;         // rows (leading dims flattened)
  marlin_u32 inter;        // I: output elements per row
  marlin_u32 gate_stride;  // elements between rows of gate (I, or 2I when up lives in gate)
  marlin_u32 up_stride;    // elements between rows of up
  marlin_u32 up_offset;    // first up element of row 0 (I when up is gate's second half)
};

// marlin::rope: q [B, Hq, S, D] and k [B, Hk, S, D] in one launch, thread (j, row) rotates pair j.
struct RopeArgs {
  marlin_u32 rows_q;      // B * Hq * S: rows of q (rows of k follow in the grid)
  marlin_u32 rows_k;      // B * Hk * S
  marlin_u32 heads_q;     // Hq
  marlin_u32 heads_k;     // Hk
  marlin_u32 seq;         // S
  marlin_u32 d;           // D: head dim (even)
  marlin_u32 half_rot;    // R / 2: rotated pairs (= inv_freq's length); dims >= R pass through
  marlin_u32 interleaved; // 1: pairs (2j, 2j + 1); 0: pairs (j, j + R/2)
  marlin_u32 pos_batch;   // 1: positions [B, S]; 0: one row [1, S] for every batch
  float scaling;          // attention scaling applied to cos and sin (1 unless YaRN/longrope)
};

// marlin::attention (shaders/attention.h). The row kernel: one threadgroup per query row (b, h, i)
// of q [B, Hq, Sq, D] and key split (grid y); the prefill kernel: one threadgroup per 32-row query
// tile (grid x) of head b * Hq + h (grid y); the reduce kernel: thread (c, row).
struct AttentionArgs {
  marlin_u32 heads_q;         // Hq
  marlin_u32 heads_k;         // Hk (Hq % Hk == 0: GQA group Hq / Hk)
  marlin_u32 seq_q;           // Sq: query row i sits at position Sk - Sq + i
  marlin_u32 seq_k;           // Sk
  marlin_u32 d;               // head dim, <= ATTN_MAX_D (prefill: <= ATTN_PREFILL_MAX_D)
  marlin_u32 causal;          // 1: keys j <= position only
  marlin_u32 window;          // > 0: keys with position - j < window only
  float scale;                // softmax scale (1/sqrt(D) by default)
  marlin_u32 splits;          // row kernel: key slices per row (1: the row kernel writes out itself)
  marlin_u32 keys_per_split;  // row kernel: keys of a row's range [lo, hi) per slice
  marlin_u32 page_size;       // paged K/V: tokens per page P (0: contiguous K/V)
  marlin_u32 pages_per_seq;   // paged K/V: block table columns
  marlin_u32 heads_per_tg;    // row kernel: query heads (of one GQA group) per threadgroup, <= ATTN_GROUP
};
