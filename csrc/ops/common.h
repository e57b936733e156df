// Small helpers shared by the op host code.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <string>

namespace marlin {

// Name of an activation dtype inside kernel names (MLX style: float16, bfloat16, float32).
inline const char* kernel_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kFloat: return "float32";
    default: return nullptr;
  }
}

inline void check_activation_dtype(const char* op, const char* arg, at::ScalarType t) {
  TORCH_CHECK_VALUE(kernel_dtype_name(t) != nullptr, op, ": ", arg,
              " must be float16, bfloat16 or float32 (the Metal kernels' types), got ", t);
}

// Every defined tensor in `ts` must be on weight's device (no silent copies between devices).
inline void check_on_weight_device(const char* op, const at::Tensor& weight,
                                   std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    TORCH_CHECK_VALUE(!t->defined() || t->device() == weight.device(), op,
                      ": all tensors must be on weight's device ", weight.device(), ", got ", t->device());
}

inline const at::ScalarType kActivationTypes[] = {at::kHalf, at::kBFloat16, at::kFloat};

inline uint32_t ceil_div(uint64_t a, uint64_t b) { return uint32_t((a + b - 1) / b); }

inline void check_u32(const char* op, const char* what, int64_t v) {
  TORCH_CHECK_VALUE(v >= 0 && v <= int64_t(UINT32_MAX), op, ": ", what, " = ", v,
              " does not fit the kernels' 32-bit indexing");
}

}  // namespace marlin
