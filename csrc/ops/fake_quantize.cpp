// marlin::fake_quantize host code (seeds/001): vec variant for small inputs, block variant
// (1024 elements per 256-thread threadgroup) for large ones.
#include <ATen/ops/empty.h>

#include <cmath>

#include "ops/common.h"
#include "ops/ops.h"
#include "shaders/args.h"

namespace marlin {
namespace {

constexpr const char* kOp = "marlin.fake_quantize";
// The predecessor measured the vec kernel best below ~10K elements and the block kernel best
// above ~100K (seeds/001, Apple Silicon); not re-measured here (no Apple GPU), so the switch
// sits between the two.
constexpr int64_t kBlockThreshold = 1 << 15;
constexpr uint32_t kBlockElems = 1024;  // FQ_BLOCK in shaders/fake_quantize.h
constexpr uint32_t kBlockThreads = 256; // FQ_THREADS in shaders/fake_quantize.h

std::string kernel_name(const char* variant, at::ScalarType t) {
  return std::string("marlin_fake_quantize_") + variant + "_" + kernel_dtype_name(t);
}

}  // namespace

FakeQuantizeVariant parse_fake_quantize_variant(const std::string& s) {
  if (s == "auto") return FakeQuantizeVariant::Auto;
  if (s == "vec") return FakeQuantizeVariant::Vector;
  if (s == "block") return FakeQuantizeVariant::Block;
  TORCH_CHECK_VALUE(false, kOp, ": variant must be 'auto', 'vec' or 'block', got '", s, "'");
}

at::Tensor fake_quantize(Launcher& launcher, const at::Tensor& x, int64_t bits,
                         FakeQuantizeVariant variant) {
  TORCH_CHECK_VALUE(bits >= 1 && bits <= 16, kOp, ": bits must be an int in 1..16, got ", bits);
  check_activation_dtype(kOp, "x", x.scalar_type());
  const int64_t n = x.numel();
  check_u32(kOp, "x.numel()", n);
  at::Tensor xc = x.contiguous();
  // The vec kernel loads 4 elements at once: the first must be 4-element aligned in its buffer.
  if (xc.storage_offset() % 4 != 0) xc = xc.clone();
  at::Tensor out = at::empty(x.sizes(), xc.options());
  if (n == 0) return out;
  FakeQuantizeArgs args{uint32_t(n), bits == 1 ? 0.0f : float(std::ldexp(1.0, int(bits) - 1) - 1.0)};
  const bool block = variant == FakeQuantizeVariant::Block ||
                     (variant == FakeQuantizeVariant::Auto && n >= kBlockThreshold);
  launcher.set_kernel(kernel_name(block ? "block" : "vec", x.scalar_type()));
  launcher.bind_tensor(0, xc, Access::Read, "x");
  launcher.bind_tensor(1, out, Access::Write, "out");
  launcher.bind_value(2, args, "args");
  if (block) {
    launcher.dispatch_threadgroups({ceil_div(n, kBlockElems), 1, 1}, {kBlockThreads, 1, 1});
  } else {
    const uint32_t threads = ceil_div(n, 4);
    launcher.dispatch_threads({threads, 1, 1}, {std::min<uint32_t>(threads, 256), 1, 1});
  }
  return out;
}

std::vector<std::string> fake_quantize_kernel_names() {
  std::vector<std::string> names;
  for (at::ScalarType t : kActivationTypes)
    for (const char* v : {"vec", "block"}) names.push_back(kernel_name(v, t));
  return names;
}

}  // namespace marlin
