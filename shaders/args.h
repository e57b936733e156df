// Argument blocks shared by the kernels (bound with setBytes at the [[buffer(n)]] the
// kernel names) and the host code in csrc/ops. Scalars only: the emulator lays vectors out
// without MSL's vector alignment padding (docs/METAL.md), scalars are laid out identically.
#pragma once

#if defined(__METAL_VERSION__)
typedef uint marlin_u32;
#ifndef METAL_FUNC  // helpers are forced inline (as MLX's METAL_FUNC)
#define METAL_FUNC inline __attribute__((always_inline))
#endif
#else
#include <cstdint>
typedef uint32_t marlin_u32;
#endif

// Element type of a scale or bias buffer; the checkpoint decides it (docs/FORMAT.md §3).
enum MarlinScaleKind : marlin_u32 {
  MARLIN_SCALE_F16 = 0,
  MARLIN_SCALE_BF16 = 1,
  MARLIN_SCALE_F32 = 2,
  MARLIN_SCALE_E4M3 = 3,  // float8_e4m3fn byte (nvfp4 block scales)
  MARLIN_SCALE_E8M0 = 4,  // power-of-two exponent byte, 2^(e - 127) (mxfp4)
};

struct DequantizeArgs {
  marlin_u32 n;               // rows (out features)
  marlin_u32 k;               // columns (in features)
  marlin_u32 words_per_row;   // ceil(k * bits / 32)
  marlin_u32 groups_per_row;  // k / group_size
  marlin_u32 scale_kind;      // MarlinScaleKind of scales
  marlin_u32 bias_kind;       // MarlinScaleKind of biases (affine formats)
};

struct FakeQuantizeArgs {
  marlin_u32 n;  // elements
  float steps;   // 2^(bits-1) - 1; 0 selects sign quantization (bits = 1)
};

struct HadamardArgs {
  marlin_u32 rows;  // number of blocks (numel / block)
  float norm;       // 1/sqrt(block), rounded once on the host like the torch op does
};

// marlin::gemm (shaders/gemm.h, csrc/ops/gemm.cpp). y[M, N] = x[M, K] @ W_hat[N, K]^T + bias.
struct GemmArgs {
  marlin_u32 m;               // rows of x (leading dims flattened)
  marlin_u32 n;               // out features
  marlin_u32 k;               // in features
  marlin_u32 words_per_row;   // ceil(k * bits / 32)
  marlin_u32 groups_per_row;  // k / group_size
  marlin_u32 scale_kind;      // MarlinScaleKind of scales
  marlin_u32 bias_kind;       // MarlinScaleKind of biases (affine formats)
  marlin_u32 has_bias;        // 1: add the layer bias (float32 [n]) bound at its slot
  marlin_u32 wide_loads;      // 1: an 8-bit piece (8 codes, 8 bytes) may be read as one uint2
  marlin_u32 x_wide_loads;    // 1: x rows start 8-element aligned (k % 8 == 0): 16-byte loads
  marlin_u32 k_per_split;     // gemm: K range of one split (multiple of 32); >= k when no split
  marlin_u32 splits;          // gemm: number of K splits (threadgroups along z); 1 = no split
  marlin_u32 gemv_lanes;      // gemv, gemv_rows: lanes per weight row (power of two, 1..32)
};

// marlin::moe_gemm (shaders/moe.h, csrc/ops/moe.cpp), bound beside a GemmArgs that describes one
// expert (n, k, words_per_row, ... of W_e [N, K]; m = rows of x). Row m uses expert
// expert_ids[m]; ids outside [0, num_experts) go to the extra bucket num_experts (NaN rows).
struct MoeArgs {
  marlin_u32 num_experts;   // E
  marlin_u32 expert_words;  // N * words_per_row: one expert's packed weight, in uint32 words
  marlin_u32 scale_bytes;   // one expert's scales [N, K/G], in bytes
  marlin_u32 bias_bytes;    // one expert's biases (affine formats), in bytes; 0 otherwise
};

// marlin::moe_route (shaders/moe_route.h, csrc/ops/moe_route.cpp): router logits [rows, E] ->
// top-k weights (float32) and ids (int64). Modes as metal_marlin_torch/ops/moe_route.py.
enum MarlinRouteMode : marlin_u32 {
  MARLIN_ROUTE_SOFTMAX_TOPK = 0,
  MARLIN_ROUTE_TOPK_SOFTMAX = 1,
  MARLIN_ROUTE_SIGMOID = 2,
};

struct MoeRouteArgs {
  marlin_u32 rows;         // tokens (leading dims flattened)
  marlin_u32 experts;      // E <= 1024
  marlin_u32 top_k;        // <= 32
  marlin_u32 mode;         // MarlinRouteMode
  marlin_u32 renormalize;  // 1: weights divided by their sum (sigmoid: sum + 1e-20)
  marlin_u32 n_group;      // sigmoid: expert groups (1: no group limit), <= 32
  marlin_u32 topk_group;   // sigmoid: groups kept
  marlin_u32 has_bias;     // sigmoid: score-correction bias (float32 [E]) bound
  float scaling;           // every weight times this (routed_scaling_factor)
};
