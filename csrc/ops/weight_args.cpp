// Checks of the quantized-weight arguments shared by dequantize and gemm (weight_args.h).
#include "ops/weight_args.h"

#include <c10/util/Exception.h>

#include <vector>

#include "shaders/args.h"

namespace marlin {
namespace {

// fp16/bf16/fp32 (or E4M3 for nvfp4) scales, E8M0 bytes for mxfp4.
uint32_t scale_kind(const char* op, const FormatInfo& f, const at::Tensor& s, const char* arg) {
  if (std::string(f.scale_req) == "e8m0") {
    TORCH_CHECK_VALUE(s.scalar_type() == at::kByte, op, ": ", arg, " of format '", f.name,
                      "' must be uint8 (E8M0 exponents), got ", s.scalar_type());
    return MARLIN_SCALE_E8M0;
  }
  switch (s.scalar_type()) {
    case at::kHalf: return MARLIN_SCALE_F16;
    case at::kBFloat16: return MARLIN_SCALE_BF16;
    case at::kFloat: return MARLIN_SCALE_F32;
    case at::kFloat8_e4m3fn: return MARLIN_SCALE_E4M3;
    default:
      TORCH_CHECK_VALUE(false, op, ": ", arg, " must be float16, bfloat16, float32 or float8_e4m3fn, got ",
                        s.scalar_type());
  }
}

}  // namespace

const FormatInfo& check_format(const char* op, const std::string& format) {
  const FormatInfo* f = find_format(format);
  TORCH_CHECK_VALUE(f != nullptr, op, ": unknown format '", format, "'");
  return *f;
}

void check_group_size(const char* op, const FormatInfo& f, int64_t group_size) {
  bool ok = false;
  for (int g : f.group_sizes) ok |= g == group_size;
  TORCH_CHECK_VALUE(ok, op, ": format '", f.name, "' takes group_size in ",
                    c10::IntArrayRef(std::vector<int64_t>(f.group_sizes.begin(), f.group_sizes.end())),
                    ", got ", group_size);
}

std::pair<int64_t, int64_t> check_x_and_group(const char* op, const FormatInfo& f, const at::Tensor& x,
                                              const std::string& format, int64_t group_size) {
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": x must have at least one dimension [..., K]");
  check_group_size(op, f, group_size);
  const int64_t K = x.size(-1);
  TORCH_CHECK_VALUE(K > 0, op, ": x's last dimension K must be positive, got shape ", x.sizes());
  const int64_t G = group_size == kPerChannel ? K : group_size;
  TORCH_CHECK_VALUE(K % G == 0, op, ": format '", format, "': in_features K=", K,
                    " is not divisible by group_size=", G);
  return {K, G};
}

std::string group_name(int group_size) {
  return group_size == kPerChannel ? "K" : std::to_string(group_size);
}

WeightArgs check_weight_args(const char* op, const FormatInfo& f, const at::Tensor& weight,
                             const at::Tensor& scales, const std::optional<at::Tensor>& biases,
                             const std::optional<at::Tensor>& global_scale, int64_t K, int64_t G) {
  WeightArgs w;
  w.words = (K * f.bits + 31) / 32;
  TORCH_CHECK_VALUE(weight.dim() == 2 && (weight.scalar_type() == at::kUInt32 || weight.scalar_type() == at::kInt),
                    op, ": weight must be uint32 [N, ", w.words, "], got ", weight.scalar_type(), " ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == w.words, op, ": weight: format '", f.name, "' with K=", K, " needs ",
                    w.words, " words per row, got shape ", weight.sizes());
  w.n = weight.size(0);
  TORCH_CHECK_VALUE(scales.dim() == 2 && scales.size(0) == w.n && scales.size(1) == K / G, op,
                    ": scales must have shape [", w.n, ", ", K / G, "], got ", scales.sizes());
  w.scale_kind = scale_kind(op, f, scales, "scales");
  if (f.affine) {
    TORCH_CHECK_VALUE(biases.has_value() && biases->sizes() == scales.sizes(), op,
                      ": biases must have shape ", scales.sizes(), " for format '", f.name, "', got ",
                      biases.has_value() ? biases->sizes() : c10::IntArrayRef{});
    w.bias_kind = scale_kind(op, f, *biases, "biases");
    w.biases = biases->contiguous();
  }
  if (f.global_scale) {
    TORCH_CHECK_VALUE(global_scale.has_value() && global_scale->numel() == 1 &&
                          global_scale->scalar_type() == at::kFloat,
                      op, ": global_scale must be a float32 tensor of 1 element for format '", f.name, "'");
    w.global_scale = global_scale->contiguous();
  }
  return w;
}

}  // namespace marlin
