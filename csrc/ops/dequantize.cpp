// marlin::dequantize host code: checks (mirroring the torch op's errors), output [N, K] in
// dtype, one thread per 32 codes of a row (shaders/dequantize.h).
#include <ATen/ops/empty.h>

#include "ops/common.h"
#include "ops/formats.h"
#include "ops/ops.h"
#include "shaders/args.h"

namespace marlin {
namespace {

constexpr const char* kOp = "marlin.dequantize";

std::string group_name(int group_size) {
  return group_size == kPerChannel ? "K" : std::to_string(group_size);
}

// Must match instantiate_dequantize in shaders/dequantize.h.
std::string kernel_name(const FormatInfo& f, at::ScalarType dtype, int group_size) {
  return std::string("marlin_dequantize_") + f.name + "_" + kernel_dtype_name(dtype) + "_gs" +
         group_name(group_size);
}

uint32_t scale_kind(const FormatInfo& f, const at::Tensor& s, const char* arg) {
  const std::string req = f.scale_req;
  if (req == "e8m0") {
    TORCH_CHECK_VALUE(s.scalar_type() == at::kByte, kOp, ": ", arg, " of format '", f.name,
                "' must be uint8 (E8M0 exponents), got ", s.scalar_type());
    return MARLIN_SCALE_E8M0;
  }
  switch (s.scalar_type()) {
    case at::kHalf: return MARLIN_SCALE_F16;
    case at::kBFloat16: return MARLIN_SCALE_BF16;
    case at::kFloat: return MARLIN_SCALE_F32;
    case at::kFloat8_e4m3fn: return MARLIN_SCALE_E4M3;
    default:
      TORCH_CHECK_VALUE(false, kOp, ": ", arg, " must be float16, bfloat16, float32 or float8_e4m3fn, got ",
                  s.scalar_type());
  }
}

}  // namespace

at::Tensor dequantize(Launcher& launcher, const at::Tensor& weight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& biases,
                      const std::optional<at::Tensor>& global_scale, const std::string& format,
                      int64_t group_size, int64_t in_features, at::ScalarType dtype) {
  const FormatInfo* f = find_format(format);
  TORCH_CHECK_VALUE(f != nullptr, kOp, ": unknown format '", format, "'");
  bool group_ok = false;
  for (int g : f->group_sizes) group_ok |= g == group_size;
  TORCH_CHECK_VALUE(group_ok, kOp, ": format '", format, "' takes group_size in ", c10::IntArrayRef(
      std::vector<int64_t>(f->group_sizes.begin(), f->group_sizes.end())), ", got ", group_size);
  TORCH_CHECK_VALUE(in_features > 0, kOp, ": in_features must be positive, got ", in_features);
  const int64_t K = in_features;
  const int64_t G = group_size == kPerChannel ? K : group_size;
  TORCH_CHECK_VALUE(K % G == 0, kOp, ": in_features K=", K, " is not divisible by group_size=", G);
  check_activation_dtype(kOp, "dtype", dtype);

  const int64_t words = (K * f->bits + 31) / 32;
  TORCH_CHECK_VALUE(weight.dim() == 2 && (weight.scalar_type() == at::kUInt32 || weight.scalar_type() == at::kInt),
              kOp, ": weight must be uint32 [N, ", words, "], got ", weight.scalar_type(), " ",
              weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == words, kOp, ": weight: format '", format, "' with K=", K, " needs ",
              words, " words per row, got shape ", weight.sizes());
  const int64_t N = weight.size(0);
  check_u32(kOp, "N * K", N * K);
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == N && scales.size(1) == K / G, kOp,
              ": scales must have shape [", N, ", ", K / G, "], got ", scales.sizes());
  DequantizeArgs args{};
  args.n = uint32_t(N);
  args.k = uint32_t(K);
  args.words_per_row = uint32_t(words);
  args.groups_per_row = uint32_t(K / G);
  args.scale_kind = scale_kind(*f, scales, "scales");
  at::Tensor b;
  if (f->affine) {
    TORCH_CHECK_VALUE(biases.has_value() && biases->sizes() == scales.sizes(), kOp,
                ": biases must have shape ", scales.sizes(), " for format '", format, "', got ",
                biases.has_value() ? biases->sizes() : c10::IntArrayRef{});
    args.bias_kind = scale_kind(*f, *biases, "biases");
    b = biases->contiguous();
  }
  at::Tensor gs;
  if (f->global_scale) {
    TORCH_CHECK_VALUE(global_scale.has_value() && global_scale->numel() == 1 &&
                    global_scale->scalar_type() == at::kFloat,
                kOp, ": global_scale must be a float32 tensor of 1 element for format '", format, "'");
    gs = global_scale->contiguous();
  }
  for (const at::Tensor* t : {&scales, static_cast<const at::Tensor*>(&b), static_cast<const at::Tensor*>(&gs)})
    TORCH_CHECK_VALUE(!t->defined() || t->device() == weight.device(), kOp,
                ": all tensors must be on weight's device ", weight.device(), ", got ", t->device());

  at::Tensor out = at::empty({N, K}, weight.options().dtype(dtype));
  if (N == 0) return out;
  launcher.set_kernel(kernel_name(*f, dtype, int(group_size)));
  launcher.bind_tensor(0, weight.contiguous(), Access::Read, "weight");
  launcher.bind_tensor(1, scales.contiguous(), Access::Read, "scales");
  if (b.defined()) launcher.bind_tensor(2, b, Access::Read, "biases");
  if (gs.defined()) launcher.bind_tensor(3, gs, Access::Read, "global_scale");
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
