// The weight formats as the host code sees them (docs/FORMAT.md §3). Kept in step with
// metal_marlin_torch/formats (tests/metal/test_kernel_names.py compares the two) and with the
// instantiation rows of shaders/dequantize.metal (same test, through the kernel names).
#pragma once

#include <string>
#include <vector>

namespace marlin {

constexpr int kPerChannel = -1;

struct FormatInfo {
  const char* name;
  int bits;
  bool affine;            // scales and biases: w = scale * q + bias
  bool global_scale;      // nvfp4: one float32 tensor scale
  const char* scale_req;  // "float" (fp16/bf16/fp32), "e8m0" (uint8), "e4m3" (float8_e4m3fn or float)
  std::vector<int> group_sizes;
};

// The affine integer formats also take groups of 16 (metal_marlin_torch/formats/integer.py
// AFFINE_GROUPS): one rule on `affine`, so every intN row of the table below gets it.
inline std::vector<FormatInfo> with_affine_g16(std::vector<FormatInfo> table) {
  for (auto& f : table)
    if (f.affine) f.group_sizes.insert(f.group_sizes.begin(), 16);
  return table;
}

inline const std::vector<FormatInfo>& all_formats() {
  static const std::vector<int> std_groups{32, 64, 128, 256, kPerChannel};
  static const std::vector<FormatInfo> table = with_affine_g16({
      {"fp4", 4, false, false, "float", std_groups},
      {"mxfp4", 4, false, false, "e8m0", {32}},
      {"nvfp4", 4, false, true, "e4m3", {16}},
      {"int8", 8, true, false, "float", std_groups},
      {"int4", 4, true, false, "float", std_groups},
      {"int3", 3, true, false, "float", std_groups},
      {"int2", 2, true, false, "float", std_groups},
      {"nf4", 4, false, false, "float", std_groups},
      {"nf3", 3, false, false, "float", std_groups},
      {"fp8_e4m3", 8, false, false, "float", std_groups},
      {"fp8_e5m2", 8, false, false, "float", std_groups},
      {"int6", 6, true, false, "float", std_groups},
      {"int5", 5, true, false, "float", std_groups},
  });
  return table;
}

inline const FormatInfo* find_format(const std::string& name) {
  for (const auto& f : all_formats())
    if (name == f.name) return &f;
  return nullptr;
}

}  // namespace marlin
