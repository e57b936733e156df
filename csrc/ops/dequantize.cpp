// marlin::dequantize host code: checks (mirroring the torch op's errors), output [N, K] in
// dtype, one thread per 32 codes of a row (shaders/dequantize.h).
#include <ATen/ops/empty.h>

#include "ops/common.h"
#include "ops/formats.h"
#include "ops/ops.h"
#include "ops/weight_args.h"
#include "shaders/args.h"

namespace marlin {
namespace {

constexpr const char* kOp = "marlin.dequantize";

// Must match instantiate_dequantize in shaders/dequantize.h.
std::string kernel_name(const FormatInfo& f, at::ScalarType dtype, int group_size) {
  return std::string("marlin_dequantize_") + f.name + "_" + kernel_dtype_name(dtype) + "_gs" +
         group_name(group_size);
}

}  // namespace

at::Tensor dequantize(Launcher& launcher, const at::Tensor& weight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& biases,
                      const std::optional<at::Tensor>& global_scale, const std::string& format,
                      int64_t group_size, int64_t in_features, at::ScalarType dtype) {
  const FormatInfo& f = check_format(kOp, format);
  check_group_size(kOp, f, group_size);
  TORCH_CHECK_VALUE(in_features > 0, kOp, ": in_features must be positive, got ", in_features);
  const int64_t K = in_features;
  const int64_t G = group_size == kPerChannel ? K : group_size;
  TORCH_CHECK_VALUE(K % G == 0, kOp, ": in_features K=", K, " is not divisible by group_size=", G);
  check_activation_dtype(kOp, "dtype", dtype);
  const WeightArgs w = check_weight_args(kOp, f, weight, scales, biases, global_scale, K, G);
  const int64_t N = w.n;
  check_u32(kOp, "N * K", N * K);
  check_on_weight_device(kOp, weight, {&scales, &w.biases, &w.global_scale});
  DequantizeArgs args{};
  args.n = uint32_t(N);
  args.k = uint32_t(K);
  args.words_per_row = uint32_t(w.words);
  args.groups_per_row = uint32_t(K / G);
  args.scale_kind = w.scale_kind;
  args.bias_kind = w.bias_kind;

  at::Tensor out = at::empty({N, K}, weight.options().dtype(dtype));
  if (N == 0) return out;
  launcher.set_kernel(kernel_name(f, dtype, int(group_size)));
  launcher.bind_tensor(0, weight.contiguous(), Access::Read, "weight");
  launcher.bind_tensor(1, scales.contiguous(), Access::Read, "scales");
  if (w.biases.defined()) launcher.bind_tensor(2, w.biases, Access::Read, "biases");
  if (w.global_scale.defined()) launcher.bind_tensor(3, w.global_scale, Access::Read, "global_scale");
  launcher.bind_tensor(4, out, Access::Write, "out");
  launcher.bind_value(5, args, "args");
  // Threads along K (chunks of 32 codes) fastest; 128 threads per threadgroup.
  const uint32_t chunks = ceil_div(K, 32);
  const uint32_t tx = std::min<uint32_t>(chunks, 32);
  const uint32_t ty = std::max<uint32_t>(1, std::min<uint32_t>(uint32_t(N), 128 / tx));
  launcher.dispatch_threads({chunks, uint32_t(N), 1}, {tx, ty, 1});
  return out;
}

std::vector<std::string> dequantize_kernel_names() {
  std::vector<std::string> names;
  for (const auto& f : all_formats())
    for (int g : f.group_sizes)
      for (at::ScalarType t : kActivationTypes) names.push_back(kernel_name(f, t, g));
  return names;
}

}  // namespace marlin
