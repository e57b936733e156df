// TORCH_LIBRARY_IMPL(marlin, MPS): the Metal kernels for the ops whose schemas Python defines
// (metal_marlin_torch/ops/library.py), each through its host code in csrc/ops. Plus
// marlin_metal::fake_quantize_variant to pick the vec or block kernel (benchmarks).
#include <torch/library.h>

#include "metal/metal_launcher.h"
#include "ops/ops.h"

namespace {

at::Tensor dequantize_mps(const at::Tensor& weight, const at::Tensor& scales,
                          const std::optional<at::Tensor>& biases,
                          const std::optional<at::Tensor>& global_scale, std::string format,
                          int64_t group_size, int64_t in_features, at::ScalarType dtype) {
  marlin::MetalLauncher l;
  return marlin::dequantize(l, weight, scales, biases, global_scale, format, group_size,
                            in_features, dtype);
}

at::Tensor fake_quantize_mps(const at::Tensor& x, int64_t bits) {
  marlin::MetalLauncher l;
  return marlin::fake_quantize(l, x, bits);
}

at::Tensor fake_quantize_variant_mps(const at::Tensor& x, int64_t bits, std::string variant) {
  marlin::MetalLauncher l;
  return marlin::fake_quantize(l, x, bits, marlin::parse_fake_quantize_variant(variant));
}

at::Tensor hadamard_mps(const at::Tensor& x, int64_t block) {
  marlin::MetalLauncher l;
  return marlin::hadamard(l, x, block);
}

at::Tensor gemm_mps(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& biases,
                    const std::optional<at::Tensor>& global_scale,
                    const std::optional<at::Tensor>& bias, std::string format, int64_t group_size) {
  marlin::MetalLauncher l;
  return marlin::gemm(l, x, weight, scales, biases, global_scale, bias, format, group_size);
}

}  // namespace

TORCH_LIBRARY_IMPL(marlin, MPS, m) {
  m.impl("dequantize", &dequantize_mps);
  m.impl("fake_quantize", &fake_quantize_mps);
  m.impl("hadamard", &hadamard_mps);
  m.impl("gemm", &gemm_mps);
}

TORCH_LIBRARY_FRAGMENT(marlin_metal, m) {
  m.def("fake_quantize_variant(Tensor x, int bits, str variant) -> Tensor");
}

TORCH_LIBRARY_IMPL(marlin_metal, MPS, m) { m.impl("fake_quantize_variant", &fake_quantize_variant_mps); }
