// marlin_emu::*: the marlin ops' host code (csrc/ops) driven by the emulator's Launcher, for
// CPU tensors. Same schemas as marlin:: (metal_marlin_torch/ops/library.py), plus
// fake_quantize_variant (pick the vec or block kernel) and _host_kernel_names.
#include <torch/library.h>

#include "emu/emu_launcher.h"
#include "ops/ops.h"

namespace {

at::Tensor dequantize(const at::Tensor& weight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& biases,
                      const std::optional<at::Tensor>& global_scale, std::string format,
                      int64_t group_size, int64_t in_features, at::ScalarType dtype) {
  marlin::EmuLauncher l;
  return marlin::dequantize(l, weight, scales, biases, global_scale, format, group_size,
                            in_features, dtype);
}

at::Tensor fake_quantize(const at::Tensor& x, int64_t bits) {
  marlin::EmuLauncher l;
  return marlin::fake_quantize(l, x, bits);
}

at::Tensor fake_quantize_variant(const at::Tensor& x, int64_t bits, std::string variant) {
  marlin::EmuLauncher l;
  return marlin::fake_quantize(l, x, bits, marlin::parse_fake_quantize_variant(variant));
}

at::Tensor hadamard(const at::Tensor& x, int64_t block) {
  marlin::EmuLauncher l;
  return marlin::hadamard(l, x, block);
}

at::Tensor gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                const std::optional<at::Tensor>& biases, const std::optional<at::Tensor>& global_scale,
                const std::optional<at::Tensor>& bias, std::string format, int64_t group_size) {
  marlin::EmuLauncher l;
  return marlin::gemm(l, x, weight, scales, biases, global_scale, bias, format, group_size);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(marlin_emu, m) {
  m.def("dequantize(Tensor weight, Tensor scales, Tensor? biases, Tensor? global_scale, "
        "str format, int group_size, int in_features, ScalarType dtype) -> Tensor");
  m.def("fake_quantize(Tensor x, int bits) -> Tensor");
  m.def("fake_quantize_variant(Tensor x, int bits, str variant) -> Tensor");
  m.def("hadamard(Tensor x, int block) -> Tensor");
  m.def("gemm(Tensor x, Tensor weight, Tensor scales, Tensor? biases, Tensor? global_scale, "
        "Tensor? bias, str format, int group_size) -> Tensor");
  m.def("_gemm_plan(int M, int N, int K) -> int[]", &marlin::gemm_plan);
  m.def("_host_kernel_names() -> str[]", &marlin::host_kernel_names);
}

TORCH_LIBRARY_IMPL(marlin_emu, CPU, m) {
  m.impl("dequantize", &dequantize);
  m.impl("fake_quantize", &fake_quantize);
  m.impl("fake_quantize_variant", &fake_quantize_variant);
  m.impl("hadamard", &hadamard);
  m.impl("gemm", &gemm);
}
