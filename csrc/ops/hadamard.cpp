// marlin::hadamard host code: 256-thread threadgroups, each holding 256 / min(block, 256)
// blocks (shaders/hadamard.h).
#include <ATen/ops/empty.h>

#include <cmath>

#include "ops/common.h"
#include "ops/ops.h"
#include "shaders/args.h"

namespace marlin {
namespace {

constexpr const char* kOp = "marlin.hadamard";
// instantiate_hadamard_blocks; 4096 floats fill half of the 32 KiB of threadgroup memory.
constexpr int64_t kMinBlock = 1, kMaxBlock = 4096;
constexpr uint32_t kThreads = 256;                     // HADAMARD_THREADS

std::string kernel_name(at::ScalarType t, int64_t block) {
  return std::string("marlin_hadamard_") + kernel_dtype_name(t) + "_b" + std::to_string(block);
}

}  // namespace

at::Tensor hadamard(Launcher& launcher, const at::Tensor& x, int64_t block) {
  TORCH_CHECK_VALUE(block >= kMinBlock && block <= kMaxBlock && (block & (block - 1)) == 0, kOp,
              ": block must be a power of two in ", kMinBlock, "..", kMaxBlock,
              " for the Metal kernel, got ", block);
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) % block == 0, kOp, ": last dim of x (shape ", x.sizes(),
              ") must be divisible by block=", block);
  check_activation_dtype(kOp, "x", x.scalar_type());
  check_u32(kOp, "x.numel()", x.numel());
  at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty(x.sizes(), xc.options());
  const int64_t rows = x.numel() / block;
  if (rows == 0) return out;
  // float(1/sqrt(block)) computed in double and rounded once, as the torch op's scalar is.
  HadamardArgs args{uint32_t(rows), float(1.0 / std::sqrt(double(block)))};
  const int64_t per_group = kThreads / std::min<int64_t>(block, kThreads);
  launcher.set_kernel(kernel_name(x.scalar_type(), block));
  launcher.bind_tensor(0, xc, Access::Read, "x");
  launcher.bind_tensor(1, out, Access::Write, "out");
  launcher.bind_value(2, args, "args");
  launcher.dispatch_threadgroups({ceil_div(rows, per_group), 1, 1}, {kThreads, 1, 1});
  return out;
}

std::vector<std::string> hadamard_kernel_names() {
  std::vector<std::string> names;
  for (at::ScalarType t : kActivationTypes)
    for (int64_t b = kMinBlock; b <= kMaxBlock; b *= 2) names.push_back(kernel_name(t, b));
  return names;
}

std::vector<std::string> host_kernel_names() {
  std::vector<std::string> all;
  for (auto* f : {&dequantize_kernel_names, &fake_quantize_kernel_names, &hadamard_kernel_names,
                  &kv_kernel_names, &gemm_kernel_names,
                  &moe_kernel_names, &moe_route_kernel_names, &layer_kernel_names,
                  &sample_kernel_names})
    for (auto& n : (*f)()) all.push_back(n);
  return all;
}

}  // namespace marlin
