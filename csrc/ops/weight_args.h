// The quantized-weight arguments that dequantize and gemm share (weight, scales, biases,
// global_scale, format, group_size; docs/FORMAT.md §3): one set of checks, so both ops reject
// bad input with the same messages as the torch ops (prefixed by the op's name).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>

#include "ops/formats.h"

namespace marlin {

// The format called `format`; TORCH_CHECK_VALUE when there is none.
const FormatInfo& check_format(const char* op, const std::string& format);
// group_size must be one the format's kernels are instantiated for.
void check_group_size(const char* op, const FormatInfo& f, int64_t group_size);
// Group size inside kernel names: the number, or "K" for per-channel scales.
std::string group_name(int group_size);

// In features K and group size G of an activation x [..., K] for a gemm-like op: x has a
// dimension and its last one is positive, group_size is one of the format's, and G (K for
// per-channel) divides K. Returns {K, G}.
std::pair<int64_t, int64_t> check_x_and_group(const char* op, const FormatInfo& f, const at::Tensor& x,
                                              const std::string& format, int64_t group_size);

// The checked weight-side tensors, ready to bind.
struct WeightArgs {
  int64_t n = 0;               // rows of weight (out features)
  int64_t words = 0;           // uint32 words per packed row
  uint32_t scale_kind = 0;     // MARLIN_SCALE_* (shaders/args.h) of scales
  uint32_t bias_kind = 0;      // MARLIN_SCALE_* of biases (affine formats), else 0
  at::Tensor biases;           // contiguous; undefined unless the format is affine
  at::Tensor global_scale;     // contiguous; undefined unless the format has one (nvfp4)
};

// Checks weight uint32 [N, ceil(K*bits/32)], scales [N, K/G] (dtype by format), biases (affine
// formats: scales' shape) and global_scale (nvfp4: one float32), for in_features K and group
// size G (K % G == 0 checked by the caller). Devices are the caller's to check.
WeightArgs check_weight_args(const char* op, const FormatInfo& f, const at::Tensor& weight,
                             const at::Tensor& scales, const std::optional<at::Tensor>& biases,
                             const std::optional<at::Tensor>& global_scale, int64_t K, int64_t G);

}  // namespace marlin
