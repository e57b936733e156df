// marlin::moe_gemm host code: checks (mirroring the torch op's errors), flatten x to [M, K] and
// expert_ids to [M], choose moe_gemv (few rows) or moe_sort + moe_gemm (grouped, prefill), build
// the kernel names, bind buffers in the [[buffer(n)]] order of shaders/moe.h and dispatch. No
// step reads tensor data on the host (expert ids stay on the GPU: no sync).
#include <ATen/ops/empty.h>

#include "ops/common.h"
#include "ops/formats.h"
#include "ops/ops.h"
#include "ops/weight_args.h"
#include "shaders/args.h"

namespace marlin {
namespace {

constexpr const char* kOp = "marlin.moe_gemm";

// Must match shaders/gemm.h and shaders/moe.h.
constexpr uint32_t kGemvThreads = 64;       // GemvShape::THREADS
constexpr uint32_t kGemvRowsPerGroup = 8;   // GemvShape::SIMDGROUPS * ROWS_PER_SLOT (times 32 / lanes)
constexpr uint32_t kGemvPiece = 8;          // GemvShape::PIECE
constexpr uint32_t kTileM = 32, kTileN = 32;  // GemmTile::BM, BN
constexpr uint32_t kGemmThreads = 128;      // GemmTile::THREADS
constexpr uint32_t kSortThreads = 256;      // MoeSortShape::THREADS
constexpr int64_t kSortMaxExperts = 1024;   // MoeSortShape::MAX_BUCKETS - 1

// Rows up to which moe_gemv runs: decode of one or two tokens at top-8 (8 or 16 rows), where
// rows rarely share an expert, so a per-row gemv reads each selected expert's packed weights
// once and a 32-row MMA tile would be mostly padding. Beyond that, rows that share an expert
// are worth grouping (each expert's weights are read once per 32 rows). Chosen from this
// traffic argument, not timed on Apple hardware (benchmarks/ is where a Mac user tunes it).
constexpr int64_t kMoeGemvMaxRows = 16;

// Buffer slots of the moe kernels (shaders/moe.h).
enum Slot {
  kWeight = 0, kScales, kBiases, kGlobalScale, kX, kBias, kOut, kArgs = 8, kExpertIds, kMoeArgs, kOrder,
  kOffsets
};

enum class Variant { Gemv, Gemm };

// Must match instantiate_moe_gemv / instantiate_moe_gemm in shaders/moe.h.
std::string kernel_name(Variant v, const FormatInfo& f, at::ScalarType dtype, int group_size) {
  return std::string("marlin_moe_") + (v == Variant::Gemv ? "gemv" : "gemm") + "_" + f.name + "_" +
         kernel_dtype_name(dtype) + "_gs" + group_name(group_size);
}

constexpr const char* kSortKernel = "marlin_moe_sort";

Variant choose_variant(int64_t M, int64_t E) {
  return M <= kMoeGemvMaxRows || E > kSortMaxExperts ? Variant::Gemv : Variant::Gemm;
}

// Lanes per weight row of the gemv (gemm.cpp's gemv_lanes: ceil(K/8) pieces rounded up to a
// power of two, at most 32).
uint32_t gemv_lanes(int64_t K) {
  const int64_t pieces = ceil_div(K, kGemvPiece);
  uint32_t lanes = 1;
  while (lanes < 32 && lanes < pieces) lanes *= 2;
  return lanes;
}

uint32_t scale_bytes(uint32_t kind) {
  switch (kind) {
    case MARLIN_SCALE_F16:
    case MARLIN_SCALE_BF16: return 2;
    case MARLIN_SCALE_F32: return 4;
    default: return 1;  // E4M3, E8M0 bytes
  }
}

}  // namespace

at::Tensor moe_gemm(Launcher& launcher, const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weight,
                    const at::Tensor& scales, const std::optional<at::Tensor>& biases,
                    const std::optional<at::Tensor>& global_scale, const std::optional<at::Tensor>& bias,
                    const std::string& format, int64_t group_size) {
  // 1. Checks.
  const FormatInfo& f = check_format(kOp, format);
  check_activation_dtype(kOp, "x", x.scalar_type());
  const auto [K, G] = check_x_and_group(kOp, f, x, format, group_size);
  TORCH_CHECK_VALUE(expert_ids.scalar_type() == at::kInt || expert_ids.scalar_type() == at::kLong, kOp,
                    ": expert_ids must be int32 or int64, got ", expert_ids.scalar_type());
  TORCH_CHECK_VALUE(expert_ids.sizes() == x.sizes().slice(0, x.dim() - 1), kOp,
                    ": expert_ids must have x's leading shape ", x.sizes().slice(0, x.dim() - 1), ", got ",
                    expert_ids.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 3 && weight.size(0) > 0, kOp,
                    ": weight must be 3-D [E, N, words] with E > 0, got shape ", weight.sizes());
  const int64_t E = weight.size(0);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"scales", &scales},
                                {"biases", biases.has_value() ? &*biases : nullptr}})
    TORCH_CHECK_VALUE(t == nullptr || (t->dim() == 3 && t->size(0) == E), kOp, ": ", name,
                      " must be 3-D [", E, ", N, K/G], got shape ", t->sizes());
  if (global_scale.has_value())
    TORCH_CHECK_VALUE(global_scale->dim() == 2 && global_scale->size(0) == E && global_scale->size(1) == 1, kOp,
                      ": global_scale must have shape (", E, ", 1), got ", global_scale->sizes());
  // Every expert slice has the same shape and dtype: checking expert 0 checks them all.
  const std::optional<at::Tensor> b0 = biases.has_value() ? std::optional<at::Tensor>(biases->select(0, 0))
                                                          : std::nullopt;
  const std::optional<at::Tensor> g0 =
      global_scale.has_value() ? std::optional<at::Tensor>(global_scale->select(0, 0)) : std::nullopt;
  const WeightArgs w = check_weight_args(kOp, f, weight.select(0, 0), scales.select(0, 0), b0, g0, K, G);
  const int64_t N = w.n;
  at::Tensor lb;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 2 && bias->size(0) == E && bias->size(1) == N, kOp,
                      ": bias must have shape (", E, ", ", N, "), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->is_floating_point(), kOp, ": bias must be floating point, got ", bias->scalar_type());
    lb = bias->to(at::kFloat).contiguous();  // the torch op adds bias.float() to the fp32 sum
  }
  check_on_weight_device(kOp, weight, {&x, &expert_ids, &scales, &lb});
  if (biases.has_value()) check_on_weight_device(kOp, weight, {&*biases});
  if (global_scale.has_value()) check_on_weight_device(kOp, weight, {&*global_scale});

  // 2. Flatten; ids become int32 on their device (the kernels' type; no data read here).
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.reshape(out_shape);
  const at::Tensor ids = expert_ids.reshape({-1}).to(at::kInt).contiguous();
  check_u32(kOp, "M * N", M * N);
  check_u32(kOp, "M * K", M * K);
  check_u32(kOp, "N * words (one expert)", N * w.words);
  check_u32(kOp, "E * N * K / G (scales)", E * N * (K / G));

  GemmArgs args{};
  args.m = uint32_t(M);
  args.n = uint32_t(N);
  args.k = uint32_t(K);
  args.words_per_row = uint32_t(w.words);
  args.groups_per_row = uint32_t(K / G);
  args.scale_kind = w.scale_kind;
  args.bias_kind = w.bias_kind;
  args.has_bias = lb.defined() ? 1u : 0u;
  const at::Tensor wc = weight.contiguous();
  // As in gemm.cpp: 8-bit pieces as one uint2 when every row (of every expert) and the binding
  // start 8-byte aligned; x pieces as 16-byte loads when K % 8 == 0 and x starts aligned.
  args.wide_loads = f.bits == 8 && w.words % 2 == 0 && wc.storage_offset() % 2 == 0 ? 1u : 0u;
  args.x_wide_loads = K % 8 == 0 && x2.storage_offset() % 8 == 0 ? 1u : 0u;
  args.k_per_split = args.k;
  args.splits = 1;
  args.gemv_lanes = gemv_lanes(K);

  MoeArgs moe{};
  moe.num_experts = uint32_t(E);
  moe.expert_words = uint32_t(N * w.words);
  moe.scale_bytes = uint32_t(N * (K / G) * scale_bytes(w.scale_kind));
  moe.bias_bytes = f.affine ? uint32_t(N * (K / G) * scale_bytes(w.bias_kind)) : 0u;

  const at::Tensor sc = scales.contiguous();
  auto bind_weights = [&]() {
    launcher.bind_tensor(kWeight, wc, Access::Read, "weight");
    launcher.bind_tensor(kScales, sc, Access::Read, "scales");
    if (w.biases.defined()) launcher.bind_tensor(kBiases, biases->contiguous(), Access::Read, "biases");
    if (w.global_scale.defined()) launcher.bind_tensor(kGlobalScale, global_scale->contiguous(), Access::Read, "global_scale");
    launcher.bind_tensor(kX, x2, Access::Read, "x");
    if (lb.defined()) launcher.bind_tensor(kBias, lb, Access::Read, "bias");
    launcher.bind_tensor(kOut, out, Access::Write, "out");
    launcher.bind_value(kArgs, args, "args");
    launcher.bind_value(kMoeArgs, moe, "moe_args");
  };

  // 3.-6. Variant, names, buffers, dispatch.
  const Variant v = choose_variant(M, E);
  if (v == Variant::Gemv) {
    launcher.set_kernel(kernel_name(v, f, x.scalar_type(), int(group_size)));
    bind_weights();
    launcher.bind_tensor(kExpertIds, ids, Access::Read, "expert_ids");
    const uint32_t n_groups = ceil_div(N, kGemvRowsPerGroup * (32 / args.gemv_lanes));
    launcher.dispatch_threadgroups({n_groups, uint32_t(M), 1}, {kGemvThreads, 1, 1});
    return out.reshape(out_shape);
  }
  // Sort: rows bucketed by expert (bucket E: ids out of range), row and tile prefix sums.
  const int64_t buckets = E + 1;
  at::Tensor order = at::empty({M}, ids.options());
  at::Tensor offsets = at::empty({2 * (buckets + 1)}, ids.options());
  launcher.set_kernel(kSortKernel);
  launcher.bind_value(kArgs, args, "args");
  launcher.bind_tensor(kExpertIds, ids, Access::Read, "expert_ids");
  launcher.bind_value(kMoeArgs, moe, "moe_args");
  launcher.bind_tensor(kOrder, order, Access::Write, "order");
  launcher.bind_tensor(kOffsets, offsets, Access::Write, "offsets");
  launcher.dispatch_threadgroups({1, 1, 1}, {kSortThreads, 1, 1});
  // Grouped GEMM over an upper bound of the tiles: each non-empty bucket adds at most one partial
  // tile to ceil(M / 32), and at most min(E + 1, M) buckets are non-empty.
  const int64_t max_tiles = ceil_div(M, kTileM) + std::min<int64_t>(buckets, M);
  check_u32(kOp, "tiles", max_tiles);
  launcher.set_kernel(kernel_name(v, f, x.scalar_type(), int(group_size)));
  bind_weights();
  launcher.bind_tensor(kOrder, order, Access::Read, "order");
  launcher.bind_tensor(kOffsets, offsets, Access::Read, "offsets");
  launcher.dispatch_threadgroups({ceil_div(N, kTileN), uint32_t(max_tiles), 1}, {kGemmThreads, 1, 1});
  return out.reshape(out_shape);
}

std::vector<int64_t> moe_gemm_plan(int64_t M, int64_t E) {
  TORCH_CHECK_VALUE(M > 0 && E > 0, kOp, ": plan needs positive M, E, got ", M, ", ", E);
  return {int64_t(choose_variant(M, E))};
}

std::vector<std::string> moe_kernel_names() {
  std::vector<std::string> names{kSortKernel};
  for (const auto& f : all_formats())
    for (int g : f.group_sizes)
      for (at::ScalarType t : kActivationTypes)
        for (Variant v : {Variant::Gemv, Variant::Gemm}) names.push_back(kernel_name(v, f, t, g));
  return names;
}

}  // namespace marlin
