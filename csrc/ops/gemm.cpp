// marlin::gemm host code: checks (mirroring the torch op's errors), flatten x to [M, K], choose
// gemv / gemv_rows / gemm (+ split-K) by M, N, K, build the kernel name, bind buffers in the
// [[buffer(n)]] order of shaders/gemm.h and dispatch.
#include <ATen/ops/empty.h>

#include "ops/common.h"
#include "ops/formats.h"
#include "ops/ops.h"
#include "ops/weight_args.h"
#include "shaders/args.h"

namespace marlin {
namespace {

constexpr const char* kOp = "marlin.gemm";

// Must match shaders/gemm.h.
constexpr uint32_t kGemvThreads = 64;       // GemvShape::THREADS
constexpr uint32_t kGemvSimdgroups = 2;     // GemvShape::SIMDGROUPS
constexpr uint32_t kGemvRowsPerSlot = 4;    // GemvShape::ROWS_PER_SLOT
constexpr uint32_t kGemvPiece = 8;          // GemvShape::PIECE (codes per lane and step)
constexpr int64_t kGemvMaxM = 8;            // GemvShape::MAX_M (rows of x per gemv_rows group)
constexpr uint32_t kTileM = 32, kTileN = 32, kTileK = 32;  // GemmTile::BM, BN, BK
constexpr uint32_t kGemmThreads = 128;      // GemmTile::THREADS
constexpr uint32_t kReduceThreads = 256;

// Split-K policy (see choose_splits).
constexpr uint32_t kTargetGroups = 64;      // threadgroups wanted in flight
constexpr int64_t kSplitMinK = 1024;        // below this K a split's work is too small
constexpr uint32_t kSplitMinSlice = 512;    // K per split at least (16 steps of BK)

// Buffer slots of every gemm-family kernel (shaders/gemm.h).
enum Slot { kWeight = 0, kScales, kBiases, kGlobalScale, kX, kBias, kOut, kPartials, kArgs };

enum class Variant { Gemv, GemvRows, Gemm };

const char* variant_name(Variant v) {
  switch (v) {
    case Variant::Gemv: return "gemv";
    case Variant::GemvRows: return "gemv_rows";
    default: return "gemm";
  }
}

// Must match instantiate_gemv / instantiate_gemm in shaders/gemm.h.
std::string kernel_name(Variant v, const FormatInfo& f, at::ScalarType dtype, int group_size) {
  return std::string("marlin_") + variant_name(v) + "_" + f.name + "_" + kernel_dtype_name(dtype) +
         "_gs" + group_name(group_size);
}

std::string reduce_kernel_name(at::ScalarType dtype) {
  return std::string("marlin_gemm_reduce_") + kernel_dtype_name(dtype);
}

// Variant by M (rows of x after flattening):
//  - M = 1: gemv. Decode is memory bound (one multiply-add per weight); gemv reads every packed
//    word once and keeps x in registers, so its time is the weight bytes / bandwidth.
//  - M = 2..8: gemv_rows. Each weight chunk is decoded once and used for up to 8 rows of x, so
//    the weights still stream once. At M = 8 it does 8 fp32 FMAs per weight (16 per byte for
//    4-bit codes): about what Apple GPUs' FP32 rate sustains against their bandwidth, so beyond
//    8 rows the scalar loop would become compute bound.
//  - M > 8: gemm. simdgroup_matrix MMA from threadgroup tiles reuses each dequantized weight
//    for 32 rows and each activation for 32 columns.
// These follow DESIGN.md §5 and the balance argument above; they have not been timed on Apple
// hardware (no Apple GPU here): benchmarks/bench_gemm.py is where a Mac user tunes them.
Variant choose_variant(int64_t M) {
  if (M == 1) return Variant::Gemv;
  if (M <= kGemvMaxM) return Variant::GemvRows;
  return Variant::Gemm;
}

// Split-K for gemm: with few output tiles (small M and N) most GPU cores would sit idle
// (Apple GPUs have 8-76 cores, each wants several threadgroups), while a long K gives each
// tile a lot of serial work. Then K is split into slices of at least 512 (so a split still
// amortizes its fp32 partial store, M*N*4 bytes, over >= 16 weight steps) until about
// kTargetGroups threadgroups exist; gemm_reduce sums the partials. Returns K per split
// (a multiple of BK) and the number of splits.
std::pair<uint32_t, uint32_t> choose_splits(int64_t M, int64_t N, int64_t K) {
  const uint32_t k_all = ceil_div(K, kTileK) * kTileK;
  const uint64_t tiles = uint64_t(ceil_div(M, kTileM)) * ceil_div(N, kTileN);
  if (K < kSplitMinK || tiles >= kTargetGroups) return {k_all, 1};
  const uint32_t want = ceil_div(kTargetGroups, tiles);
  const uint32_t most = uint32_t(K / kSplitMinSlice);
  const uint32_t splits = std::max<uint32_t>(1, std::min(want, most));
  if (splits == 1) return {k_all, 1};
  const uint32_t per = ceil_div(ceil_div(K, splits), kTileK) * kTileK;
  return {per, ceil_div(K, per)};
}

// gemv / gemv_rows: lanes that share one weight row (GemvShape in shaders/gemm.h). A row has
// ceil(K/8) pieces of 8 codes; rounded up to a power of two (so slots tile the 32 lanes and
// group leaders are aligned runs) and capped at the simdgroup. K >= 256 gives 32: one row per
// simdgroup instruction; shorter rows share the simdgroup (K = 100: two rows of 16 lanes)
// instead of leaving lanes idle.
uint32_t gemv_lanes(int64_t K) {
  const int64_t pieces = ceil_div(K, kGemvPiece);
  uint32_t lanes = 1;
  while (lanes < 32 && lanes < pieces) lanes *= 2;
  return lanes;
}

}  // namespace

at::Tensor gemm(Launcher& launcher, const at::Tensor& x, const at::Tensor& weight,
                const at::Tensor& scales, const std::optional<at::Tensor>& biases,
                const std::optional<at::Tensor>& global_scale, const std::optional<at::Tensor>& bias,
                const std::string& format, int64_t group_size) {
  // 1. Checks.
  const FormatInfo& f = check_format(kOp, format);
  check_activation_dtype(kOp, "x", x.scalar_type());
  const auto [K, G] = check_x_and_group(kOp, f, x, format, group_size);
  const WeightArgs w = check_weight_args(kOp, f, weight, scales, biases, global_scale, K, G);
  const int64_t N = w.n;
  at::Tensor lb;
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == N, kOp, ": bias must have shape (", N,
                      ",), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->is_floating_point(), kOp, ": bias must be floating point, got ",
                      bias->scalar_type());
    // The torch op adds bias.float() to the fp32 accumulator; so does the kernel (exact copy).
    lb = bias->to(at::kFloat).contiguous();
  }
  check_on_weight_device(kOp, weight, {&x, &scales, &w.biases, &w.global_scale, &lb});
  GemmArgs args{};
  args.scale_kind = w.scale_kind;
  args.bias_kind = w.bias_kind;

  // 2. Flatten the leading dims; non-contiguous x (a transposed view, a slice) is copied once.
  const at::Tensor x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end() - 1);
  out_shape.push_back(N);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out.reshape(out_shape);
  check_u32(kOp, "M * N", M * N);
  check_u32(kOp, "M * K", M * K);
  check_u32(kOp, "N * K / G (scales)", N * (K / G));

  args.m = uint32_t(M);
  args.n = uint32_t(N);
  args.k = uint32_t(K);
  args.words_per_row = uint32_t(w.words);
  args.groups_per_row = uint32_t(K / G);
  args.has_bias = lb.defined() ? 1u : 0u;
  const at::Tensor wc = weight.contiguous();
  // An 8-bit piece (8 bytes) is one uint2 load when every row and the binding start 8-byte
  // aligned; otherwise two words (PieceLoad in shaders/gemm.h). Smaller pieces are one load of
  // their own size (ushort, uint) or bytes (3-bit), aligned in any uint32 row.
  args.wide_loads = f.bits == 8 && w.words % 2 == 0 && wc.storage_offset() % 2 == 0 ? 1u : 0u;

  // x's rows (and every 8-element piece in them) are 8-element aligned when K is a multiple of
  // 8 and the binding starts aligned: then a piece of x is one 16-byte load (two for fp32).
  args.x_wide_loads = K % 8 == 0 && x2.storage_offset() % 8 == 0 ? 1u : 0u;

  // 3. Variant and grid.
  const Variant v = choose_variant(M);
  const auto [k_per_split, splits] = v == Variant::Gemm ? choose_splits(M, N, K)
                                                        : std::pair<uint32_t, uint32_t>{args.k, 1};
  args.k_per_split = k_per_split;
  args.splits = splits;
  args.gemv_lanes = gemv_lanes(K);

  // 4./5. Kernel name and buffers in [[buffer(n)]] order.
  launcher.set_kernel(kernel_name(v, f, x.scalar_type(), int(group_size)));
  launcher.bind_tensor(kWeight, wc, Access::Read, "weight");
  launcher.bind_tensor(kScales, scales.contiguous(), Access::Read, "scales");
  if (w.biases.defined()) launcher.bind_tensor(kBiases, w.biases, Access::Read, "biases");
  if (w.global_scale.defined()) launcher.bind_tensor(kGlobalScale, w.global_scale, Access::Read, "global_scale");
  launcher.bind_tensor(kX, x2, Access::Read, "x");
  if (lb.defined()) launcher.bind_tensor(kBias, lb, Access::Read, "bias");
  at::Tensor partials;
  if (splits > 1) {
    check_u32(kOp, "splits * M * N", int64_t(splits) * M * N);
    partials = at::empty({int64_t(splits), M, N}, x.options().dtype(at::kFloat));
    launcher.bind_tensor(kPartials, partials, Access::Write, "partials");
  } else {
    launcher.bind_tensor(kOut, out, Access::Write, "out");
  }
  launcher.bind_value(kArgs, args, "args");

  // 6. Dispatch.
  // gemv: each threadgroup covers SIMDGROUPS * ROWS_PER_SLOT * (32 / lanes) weight rows.
  const uint32_t n_groups = ceil_div(N, kGemvSimdgroups * kGemvRowsPerSlot * (32 / args.gemv_lanes));
  switch (v) {
    case Variant::Gemv:
      launcher.dispatch_threadgroups({n_groups, uint32_t(M), 1}, {kGemvThreads, 1, 1});
      break;
    case Variant::GemvRows:
      launcher.dispatch_threadgroups({n_groups, ceil_div(M, kGemvMaxM), 1}, {kGemvThreads, 1, 1});
      break;
    case Variant::Gemm:
      launcher.dispatch_threadgroups({ceil_div(N, kTileN), ceil_div(M, kTileM), splits},
                                     {kGemmThreads, 1, 1});
      if (splits > 1) {
        launcher.set_kernel(reduce_kernel_name(x.scalar_type()));
        launcher.bind_tensor(kPartials, partials, Access::Read, "partials");
        if (lb.defined()) launcher.bind_tensor(kBias, lb, Access::Read, "bias");
        launcher.bind_tensor(kOut, out, Access::Write, "out");
        launcher.bind_value(kArgs, args, "args");
        launcher.dispatch_threads({uint32_t(M * N), 1, 1}, {kReduceThreads, 1, 1});
      }
      break;
  }
  return out.reshape(out_shape);
}

std::vector<int64_t> gemm_plan(int64_t M, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(M > 0 && N > 0 && K > 0, kOp, ": plan needs positive M, N, K, got ", M, ", ", N, ", ", K);
  const Variant v = choose_variant(M);
  if (v != Variant::Gemm) return {int64_t(v), K, 1, int64_t(gemv_lanes(K))};
  const auto [per, splits] = choose_splits(M, N, K);
  return {int64_t(v), int64_t(per), int64_t(splits), 0};
}

std::vector<std::string> gemm_kernel_names() {
  std::vector<std::string> names;
  for (const auto& f : all_formats())
    for (int g : f.group_sizes)
      for (at::ScalarType t : kActivationTypes)
        for (Variant v : {Variant::Gemv, Variant::GemvRows, Variant::Gemm})
          names.push_back(kernel_name(v, f, t, g));
  for (at::ScalarType t : kActivationTypes) names.push_back(reduce_kernel_name(t));
  return names;
}

}  // namespace marlin
