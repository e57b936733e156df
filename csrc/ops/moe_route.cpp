// marlin::moe_route host code: checks (mirroring ops/moe_route.py's errors), flatten logits to
// [rows, E], allocate weights (float32) and ids (int64) [rows, top_k], bind in the
// [[buffer(n)]] order of shaders/moe_route.h and dispatch one thread per row.
#include <ATen/ops/empty.h>

#include "ops/common.h"
#include "ops/ops.h"
#include "shaders/args.h"

namespace marlin {
namespace {

constexpr const char* kOp = "marlin.moe_route";
constexpr uint32_t kThreads = 64;     // MoeRouteShape::THREADS
constexpr int64_t kMaxExperts = 1024;  // ops/moe_route.py MAX_EXPERTS
constexpr int64_t kMaxTopK = 32;       // MoeRouteShape::MAX_TOP_K

enum Slot { kLogits = 0, kBias, kWeights, kIds, kArgs };

std::string kernel_name(at::ScalarType t) { return std::string("marlin_moe_route_") + kernel_dtype_name(t); }

uint32_t parse_mode(const std::string& mode) {
  if (mode == "softmax_topk") return MARLIN_ROUTE_SOFTMAX_TOPK;
  if (mode == "topk_softmax") return MARLIN_ROUTE_TOPK_SOFTMAX;
  TORCH_CHECK_VALUE(mode == "sigmoid", kOp, ": mode must be one of ('softmax_topk', 'topk_softmax', 'sigmoid'), got '",
                    mode, "'");
  return MARLIN_ROUTE_SIGMOID;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> moe_route(Launcher& launcher, const at::Tensor& logits,
                                             const std::optional<at::Tensor>& bias, int64_t top_k,
                                             const std::string& mode, bool renormalize, int64_t n_group,
                                             int64_t topk_group, double scaling) {
  TORCH_CHECK_VALUE(kernel_dtype_name(logits.scalar_type()) != nullptr, kOp,
                    ": logits must be float16/bfloat16/float32, got ", logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() >= 1 && logits.size(-1) >= 1 && logits.size(-1) <= kMaxExperts, kOp,
                    ": logits must be [..., E] with 1 <= E <= ", kMaxExperts, ", got shape ", logits.sizes());
  const int64_t E = logits.size(-1);
  const uint32_t m = parse_mode(mode);
  TORCH_CHECK_VALUE(top_k >= 1 && top_k <= std::min(E, kMaxTopK), kOp, ": top_k must be in [1, ",
                    std::min(E, kMaxTopK), "], got ", top_k);
  at::Tensor b;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(m == MARLIN_ROUTE_SIGMOID, kOp, ": bias (score correction) is only used by mode 'sigmoid', got mode '",
                      mode, "'");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == E && bias->is_floating_point(), kOp,
                      ": bias must be a float tensor of shape (", E, ",), got ", bias->scalar_type(), " ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == logits.device(), kOp, ": bias must be on logits' device ", logits.device(),
                      ", got ", bias->device());
    b = bias->to(at::kFloat).contiguous();
  }
  TORCH_CHECK_VALUE(n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group, kOp,
                    ": n_group must divide E=", E, " and 1 <= topk_group <= n_group, got n_group=", n_group,
                    ", topk_group=", topk_group);
  TORCH_CHECK_VALUE(n_group == 1 || (m == MARLIN_ROUTE_SIGMOID && E / n_group >= 2 && n_group <= kMaxTopK &&
                                     top_k <= topk_group * (E / n_group)),
                    kOp, ": group-limited selection (n_group=", n_group, ") needs mode 'sigmoid', >= 2 experts per group, "
                    "n_group <= ", kMaxTopK, " and top_k <= topk_group * E/n_group");

  const at::Tensor l = logits.reshape({-1, E}).contiguous();
  const int64_t rows = l.size(0);
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end() - 1);
  shape.push_back(top_k);
  at::Tensor weights = at::empty({rows, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({rows, top_k}, logits.options().dtype(at::kLong));
  if (rows == 0) return {weights.reshape(shape), ids.reshape(shape)};
  check_u32(kOp, "rows * E", rows * E);

  MoeRouteArgs args{};
  args.rows = uint32_t(rows);
  args.experts = uint32_t(E);
  args.top_k = uint32_t(top_k);
  args.mode = m;
  args.renormalize = renormalize ? 1u : 0u;
  args.n_group = uint32_t(n_group);
  args.topk_group = uint32_t(topk_group);
  args.has_bias = b.defined() ? 1u : 0u;
  args.scaling = float(scaling);

  launcher.set_kernel(kernel_name(logits.scalar_type()));
  launcher.bind_tensor(kLogits, l, Access::Read, "logits");
  if (b.defined()) launcher.bind_tensor(kBias, b, Access::Read, "bias");
  launcher.bind_tensor(kWeights, weights, Access::Write, "weights");
  launcher.bind_tensor(kIds, ids, Access::Write, "ids");
  launcher.bind_value(kArgs, args, "args");
  launcher.dispatch_threads({uint32_t(rows), 1, 1}, {kThreads, 1, 1});
  return {weights.reshape(shape), ids.reshape(shape)};
}

std::vector<std::string> moe_route_kernel_names() {
  std::vector<std::string> names;
  for (at::ScalarType t : kActivationTypes) names.push_back(kernel_name(t));
  return names;
}

}  // namespace marlin
