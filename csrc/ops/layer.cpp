// Host code of the decoder-layer ops (metal_marlin_torch/ops/layer.py is the semantics):
// rms_norm and layer_norm (shaders/norm.h: one 256-thread threadgroup per row), silu_mul and
// gelu_mul (shaders/act.h: one thread per output element), rope (shaders/rope.h: one thread per
// rotated pair, q and k rows in one grid), attention (shaders/attention.h: a row kernel with an
// optional split along the keys and its reduce, a flash-attention prefill kernel; attention_plan
// chooses).
#include <ATen/ops/empty.h>

#include <tuple>

#include "ops/common.h"
#include "ops/ops.h"
#include "shaders/layer_args.h"

namespace marlin {
namespace {

constexpr uint32_t kNormThreads = 256;  // NORM_THREADS (shaders/norm.h)
constexpr uint32_t kActThreads = 256;   // any multiple of 32: elementwise, edge groups partial
constexpr uint32_t kRopeThreads = 64;   // pairs of one row per threadgroup row (D/2 <= 64 for D <= 128)

std::string kernel_name(const char* op, at::ScalarType t) {
  return std::string("marlin_") + op + "_" + kernel_dtype_name(t);
}

// x's dtype, device and shape for an optional tensor of the same role (weight, bias, residual).
void check_like(const char* op, const char* arg, const std::optional<at::Tensor>& t, const at::Tensor& x,
                at::IntArrayRef shape) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->scalar_type() == x.scalar_type(), op, ": ", arg, " must have x's dtype ", x.scalar_type(),
                    ", got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == x.device(), op, ": ", arg, " must be on x's device ", x.device(), ", got ",
                    t->device());
  TORCH_CHECK_VALUE(t->sizes() == shape, op, ": ", arg, " must have shape ", shape, ", got ", t->sizes());
}

std::vector<at::Tensor> norm(Launcher& launcher, const char* op, bool rms, const at::Tensor& x,
                             const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                             const std::optional<at::Tensor>& residual, double eps) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) >= 1, op, ": x must have a non-empty last dim, got shape ",
                    x.sizes());
  check_activation_dtype(op, "x", x.scalar_type());
  const int64_t d = x.size(-1);
  check_like(op, "weight", weight, x, {d});
  check_like(op, "bias", bias, x, {d});
  check_like(op, "residual", residual, x, x.sizes());
  TORCH_CHECK_VALUE(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  check_u32(op, "x.numel()", x.numel());
  const at::Tensor xc = x.contiguous();
  const at::Tensor rc = residual ? residual->contiguous() : xc;
  const at::Tensor wc = weight ? weight->contiguous() : xc;
  const at::Tensor bc = bias ? bias->contiguous() : xc;
  at::Tensor y = at::empty(x.sizes(), xc.options());
  at::Tensor h = residual ? at::empty(x.sizes(), xc.options()) : at::Tensor();
  std::vector<at::Tensor> out{y};
  if (residual) out.push_back(h);
  const int64_t rows = x.numel() / d;
  if (rows == 0) return out;
  NormArgs args{uint32_t(rows), uint32_t(d), residual.has_value(), weight.has_value(), bias.has_value(), float(eps)};
  launcher.set_kernel(kernel_name(rms ? "rms_norm" : "layer_norm", x.scalar_type()));
  // Slots without a tensor get x, bound read-only: the kernel reads the flags and never touches them.
  int slot = 0;
  launcher.bind_tensor(slot++, xc, Access::Read, "x");
  launcher.bind_tensor(slot++, rc, Access::Read, residual ? "residual" : "x (no residual)");
  launcher.bind_tensor(slot++, wc, Access::Read, weight ? "weight" : "x (no weight)");
  if (!rms) launcher.bind_tensor(slot++, bc, Access::Read, bias ? "bias" : "x (no bias)");
  launcher.bind_tensor(slot++, y, Access::Write, "y");
  if (residual)
    launcher.bind_tensor(slot++, h, Access::Write, "h");
  else
    launcher.bind_tensor(slot++, xc, Access::Read, "x (no h)");
  launcher.bind_value(slot, args, "args");
  launcher.dispatch_threadgroups({uint32_t(rows), 1, 1}, {kNormThreads, 1, 1});
  return out;
}

at::Tensor gated_act(Launcher& launcher, const char* op, const char* kernel, const at::Tensor& gate,
                     const std::optional<at::Tensor>& up) {
  TORCH_CHECK_VALUE(gate.dim() >= 1, op, ": gate must have at least one dim, got a scalar");
  check_activation_dtype(op, "gate", gate.scalar_type());
  const int64_t last = gate.size(-1);
  TORCH_CHECK_VALUE(up.has_value() || last % 2 == 0, op,
                    ": with up=None, gate's last dim must be even ([..., 2I]), got shape ", gate.sizes());
  if (up) {
    TORCH_CHECK_VALUE(up->scalar_type() == gate.scalar_type(), op, ": up must have gate's dtype ",
                      gate.scalar_type(), ", got ", up->scalar_type());
    TORCH_CHECK_VALUE(up->device() == gate.device(), op, ": up must be on gate's device ", gate.device(), ", got ",
                      up->device());
    TORCH_CHECK_VALUE(up->sizes() == gate.sizes(), op, ": up must have gate's shape ", gate.sizes(), ", got ",
                      up->sizes());
  }
  check_u32(op, "gate.numel()", gate.numel());
  const int64_t inter = up ? last : last / 2;
  const at::Tensor gc = gate.contiguous();
  const at::Tensor uc = up ? up->contiguous() : gc;
  std::vector<int64_t> shape(gate.sizes().begin(), gate.sizes().end());
  shape.back() = inter;
  at::Tensor y = at::empty(shape, gc.options());
  const int64_t rows = inter == 0 ? 0 : gate.numel() / last;
  if (rows == 0) return y;
  ActArgs args{uint32_t(rows), uint32_t(inter), uint32_t(last), uint32_t(last), uint32_t(up ? 0 : inter)};
  launcher.set_kernel(kernel_name(kernel, gate.scalar_type()));
  launcher.bind_tensor(0, gc, Access::Read, "gate");
  launcher.bind_tensor(1, uc, Access::Read, up ? "up" : "gate (up half)");
  launcher.bind_tensor(2, y, Access::Write, "y");
  launcher.bind_value(3, args, "args");
  launcher.dispatch_threads({uint32_t(inter), uint32_t(rows), 1}, {std::min<uint32_t>(kActThreads, inter), 1, 1});
  return y;
}

}  // namespace

std::vector<at::Tensor> rms_norm(Launcher& launcher, const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& residual, double eps) {
  return norm(launcher, "marlin.rms_norm", true, x, weight, std::nullopt, residual, eps);
}

std::vector<at::Tensor> layer_norm(Launcher& launcher, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                   double eps) {
  return norm(launcher, "marlin.layer_norm", false, x, weight, bias, residual, eps);
}

at::Tensor silu_mul(Launcher& launcher, const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  return gated_act(launcher, "marlin.silu_mul", "silu_mul", gate, up);
}

at::Tensor gelu_mul(Launcher& launcher, const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  return gated_act(launcher, "marlin.gelu_mul", "gelu_mul", gate, up);
}

std::tuple<at::Tensor, at::Tensor> rope(Launcher& launcher, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& positions, const at::Tensor& inv_freq, double scaling,
                                        bool interleaved) {
  constexpr const char* kOp = "marlin.rope";
  check_activation_dtype(kOp, "q", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4, kOp, ": q and k must be [batch, heads, seq, head_dim], got ",
                    q.sizes(), " and ", k.sizes());
  const int64_t b = q.size(0), s = q.size(2), d = q.size(3);
  TORCH_CHECK_VALUE(k.size(0) == b && k.size(2) == s && k.size(3) == d, kOp, ": k ", k.sizes(),
                    " must match q ", q.sizes(), " in batch, seq and head_dim");
  TORCH_CHECK_VALUE(k.scalar_type() == q.scalar_type(), kOp, ": k must have q's dtype ", q.scalar_type(), ", got ",
                    k.scalar_type());
  TORCH_CHECK_VALUE(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong, kOp,
                    ": positions must be int32 or int64, got ", positions.scalar_type());
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(1) == s && (positions.size(0) == 1 || positions.size(0) == b),
                    kOp, ": positions must be [batch or 1, seq] = [", b, " or 1, ", s, "], got ", positions.sizes());
  TORCH_CHECK_VALUE(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1, kOp,
                    ": inv_freq must be a 1-D float32 tensor, got ", inv_freq.scalar_type(), " of shape ",
                    inv_freq.sizes());
  const int64_t half_rot = inv_freq.size(0);
  TORCH_CHECK_VALUE(d % 2 == 0 && half_rot >= 1 && half_rot <= d / 2, kOp,
                    ": head_dim must be even and inv_freq's length in 1..head_dim/2 = ", d / 2, ", got head_dim ", d,
                    " and ", half_rot, " frequencies");
  for (const at::Tensor* t : {&k, &positions, &inv_freq})
    TORCH_CHECK_VALUE(t->device() == q.device(), kOp, ": all tensors must be on q's device ", q.device(), ", got ",
                      t->device());
  check_u32(kOp, "q.numel() + k.numel()", q.numel() + k.numel());
  const at::Tensor qc = q.contiguous(), kc = k.contiguous();
  // The kernel reads 64-bit positions (HF's position_ids); int32 ones are widened here.
  const at::Tensor pc = positions.to(at::kLong).contiguous();
  const at::Tensor fc = inv_freq.contiguous();
  at::Tensor q_out = at::empty(q.sizes(), qc.options()), k_out = at::empty(k.sizes(), kc.options());
  const int64_t rows_q = q.numel() / std::max<int64_t>(d, 1), rows_k = k.numel() / std::max<int64_t>(d, 1);
  if (rows_q + rows_k == 0) return {q_out, k_out};
  RopeArgs args{uint32_t(rows_q), uint32_t(rows_k), uint32_t(q.size(1)), uint32_t(k.size(1)), uint32_t(s),
                uint32_t(d), uint32_t(half_rot), interleaved, positions.size(0) != 1 || b == 1, float(scaling)};
  launcher.set_kernel(kernel_name("rope", q.scalar_type()));
  launcher.bind_tensor(0, qc, Access::Read, "q");
  launcher.bind_tensor(1, kc, Access::Read, "k");
  launcher.bind_tensor(2, pc, Access::Read, "positions");
  launcher.bind_tensor(3, fc, Access::Read, "inv_freq");
  launcher.bind_tensor(4, q_out, Access::Write, "q_out");
  launcher.bind_tensor(5, k_out, Access::Write, "k_out");
  launcher.bind_value(6, args, "args");
  const uint32_t pairs = uint32_t(d / 2);
  const uint32_t tx = std::min(pairs, kRopeThreads);
  launcher.dispatch_threads({pairs, uint32_t(rows_q + rows_k), 1}, {tx, std::max<uint32_t>(1, 256 / tx), 1});
  return {q_out, k_out};
}

namespace {

constexpr uint32_t kAttnThreads = 256;          // ATTN_THREADS (shaders/attention.h)
constexpr uint32_t kAttnPrefillThreads = 128;   // AttnTile::THREADS
constexpr uint32_t kAttnPrefillRows = 32;       // AttnTile::BQ
constexpr int64_t kAttnPrefillMaxD = 128;       // ATTN_PREFILL_MAX_D
constexpr int64_t kAttnGroup = 4;               // ATTN_GROUP
// Decode split (flash-decoding). A slice of fewer than 256 keys gives each of the 8 simdgroups
// fewer than 32 keys, and the merge (threadgroup exchange + a second launch) starts to cost more
// than the keys; past ~256 threadgroups in flight even the largest Apple GPUs (up to 40 cores,
// several threadgroups of 256 threads each) are full, so more slices only add partials to reduce.
// Both are reasoned from the kernel's shape, not measured (no Apple GPU here).
constexpr int64_t kAttnMinKeysPerSplit = 256;
constexpr int64_t kAttnTargetGroups = 256;
constexpr int64_t kAttnMaxSplits = 64;
// Query rows per head from which the prefill kernel (32-row tiles) replaces the row kernel: a
// decode step (Sq = 1) and short verify/append steps would leave most of a 32-row tile empty.
constexpr int64_t kAttnPrefillMinSq = 9;

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

enum class AttnVariant : int64_t { Rows = 0, Prefill = 1 };

struct AttnPlan {
  AttnVariant variant;
  int64_t splits;          // row kernel: key slices per row (1: no reduce launch)
  int64_t keys_per_split;  // row kernel: keys per slice
};

// The widest key range [lo, hi) of any row (the split covers it; shorter rows leave slices empty).
int64_t attention_span(int64_t sk, bool causal, int64_t window) {
  return causal && window > 0 ? std::min(sk, window) : sk;
}

AttnPlan plan_attention(int64_t rows, int64_t sq, int64_t sk, int64_t d, bool causal, int64_t window) {
  if (sq >= kAttnPrefillMinSq && d <= kAttnPrefillMaxD) return {AttnVariant::Prefill, 1, 0};
  const int64_t span = std::max<int64_t>(1, attention_span(sk, causal, window));
  int64_t splits = std::min({div_up(span, kAttnMinKeysPerSplit), div_up(kAttnTargetGroups, rows),
                             kAttnMaxSplits});
  splits = std::max<int64_t>(1, splits);
  const int64_t per = div_up(span, splits);
  return {AttnVariant::Rows, div_up(span, per), per};  // no slice wholly past the span
}

}  // namespace

std::vector<int64_t> attention_plan(int64_t rows, int64_t sq, int64_t sk, int64_t d, bool causal,
                                    int64_t window) {
  TORCH_CHECK_VALUE(rows > 0 && sq > 0 && sk >= sq && d > 0 && window >= 0, "marlin.attention",
                    ": plan needs rows > 0, 0 < sq <= sk, d > 0 and window >= 0, got ", rows, ", ", sq, ", ",
                    sk, ", ", d, ", ", window);
  const AttnPlan p = plan_attention(rows, sq, sk, d, causal, window);
  return {int64_t(p.variant), p.splits, p.keys_per_split};
}

namespace {

// k, v: the T tensors [B, Hk, Sk, D], or (fp8) the E4M3 codes as uint8 with float32 scales
// [B, Hk, Sk], or (paged) T pages [num_pages, Hk, P, D] with an int32 block table [B, pages] and
// the sequence length paged_sk.
at::Tensor run_attention(Launcher& launcher, const char* kOp, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor* k_scales, const at::Tensor* v_scales,
                         const at::Tensor* block_table, int64_t paged_sk, double scale, bool causal, int64_t window) {
  constexpr int64_t kMaxD = 256;  // ATTN_MAX_D (shaders/attention.h)
  const bool fp8 = k_scales != nullptr, paged = block_table != nullptr;
  check_activation_dtype(kOp, "q", q.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.sizes() == k.sizes(), kOp, ": q must be [B, Hq, Sq, D] and k, v ",
                    paged ? "[num_pages, Hk, P, D]" : "[B, Hk, Sk, D]", " of one shape, got ", q.sizes(), ", ",
                    k.sizes(), ", ", v.sizes());
  const int64_t b = q.size(0), hq = q.size(1), sq = q.size(2), d = q.size(3), hk = k.size(1);
  const int64_t sk = paged ? paged_sk : k.size(2);
  int64_t page_size = 0, pages_per_seq = 0;
  if (paged) {
    page_size = k.size(2);
    TORCH_CHECK_VALUE(block_table->scalar_type() == at::kInt && block_table->dim() == 2 &&
                          block_table->size(0) == b && block_table->device() == q.device(),
                      kOp, ": block_table must be int32 [B, pages] with B = ", b, " on q's device, got ",
                      block_table->scalar_type(), " ", block_table->sizes(), " on ", block_table->device());
    pages_per_seq = block_table->size(1);
    TORCH_CHECK_VALUE(page_size >= 1 && sk >= 0 && sk <= pages_per_seq * page_size, kOp, ": seq_k must be in [0, ",
                      pages_per_seq * page_size, "] (block_table's ", pages_per_seq, " pages of ", page_size,
                      " tokens), got ", sk);
    check_u32(kOp, "block_table.numel()", block_table->numel());
  }
  TORCH_CHECK_VALUE((paged || k.size(0) == b) && k.size(3) == d && hk >= 1 && hq % hk == 0, kOp, ": k ", k.sizes(),
                    " must match q ", q.sizes(), paged ? " in head_dim" : " in batch and head_dim",
                    ", with q's heads a multiple of k's");
  TORCH_CHECK_VALUE(sq <= sk, kOp, ": q has more rows (", sq, ") than there are keys (", sk, ")");
  const at::ScalarType kv_type = fp8 ? at::kByte : q.scalar_type();
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK_VALUE(t->scalar_type() == kv_type && t->device() == q.device(), kOp, ": k and v must be ",
                      kv_type, " on q's device ", q.device(), ", got ", t->scalar_type(), ", ", t->device());
  if (fp8)
    for (const at::Tensor* t : {k_scales, v_scales})
      TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat && t->device() == q.device() &&
                            t->sizes() == at::IntArrayRef({b, hk, sk}),
                        kOp, ": k_scales and v_scales must be float32 [B, Hk, Sk] = [", b, ", ", hk, ", ", sk,
                        "] on q's device, got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  TORCH_CHECK_VALUE(window >= 0, kOp, ": window must be >= 0 (0 = none), got ", window);
  TORCH_CHECK_VALUE(d <= kMaxD, kOp, ": head_dim must be <= ", kMaxD, " for the Metal kernel, got ", d);
  check_u32(kOp, "k.numel()", k.numel());
  check_u32(kOp, "q.numel()", q.numel());
  check_u32(kOp, "window", window);
  const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  at::Tensor out = at::empty(q.sizes(), qc.options());
  const int64_t rows = b * hq * sq;
  if (rows == 0 || d == 0) return out;
  // The row kernel serves up to 4 query heads of a GQA group per threadgroup (ATTN_GROUP), reading
  // each K/V element once for all of them: the largest divisor of the group size that is <= 4.
  int64_t per_tg = 1;
  for (int64_t g = std::min<int64_t>(kAttnGroup, hq / hk); g >= 1; --g)
    if ((hq / hk) % g == 0) {
      per_tg = g;
      break;
    }
  const AttnPlan plan = plan_attention(b * hq / per_tg * sq, sq, sk, d, causal, window);
  AttentionArgs args{uint32_t(hq), uint32_t(hk), uint32_t(sq), uint32_t(sk), uint32_t(d), causal, uint32_t(window),
                     float(scale), uint32_t(plan.splits), uint32_t(plan.keys_per_split), uint32_t(page_size),
                     uint32_t(pages_per_seq), uint32_t(per_tg)};
  const std::string suffix = fp8 ? "_fp8" : paged ? "_paged" : "";
  auto bind_inputs = [&] {
    launcher.bind_tensor(0, qc, Access::Read, "q");
    launcher.bind_tensor(1, kc, Access::Read, "k");
    launcher.bind_tensor(2, vc, Access::Read, "v");
    if (fp8) {
      launcher.bind_tensor(7, k_scales->contiguous(), Access::Read, "k_scales");
      launcher.bind_tensor(8, v_scales->contiguous(), Access::Read, "v_scales");
    }
    if (paged) launcher.bind_tensor(9, block_table->contiguous(), Access::Read, "block_table");
  };
  if (plan.variant == AttnVariant::Prefill) {
    launcher.set_kernel(kernel_name(("attention_prefill" + suffix).c_str(), q.scalar_type()));
    bind_inputs();
    launcher.bind_tensor(3, out, Access::Write, "out");
    launcher.bind_value(4, args, "args");
    launcher.dispatch_threadgroups({uint32_t(div_up(sq, kAttnPrefillRows)), uint32_t(b * hq), 1},
                                   {kAttnPrefillThreads, 1, 1});
    return out;
  }
  at::Tensor part_ml, part_o;
  launcher.set_kernel(kernel_name(("attention" + suffix).c_str(), q.scalar_type()));
  bind_inputs();
  if (plan.splits == 1) {
    launcher.bind_tensor(3, out, Access::Write, "out");
  } else {
    check_u32(kOp, "rows * splits * d", rows * plan.splits * d);
    // fp32 partials per (row, slice): (max, sum) and the unnormalized output
    part_ml = at::empty({rows, plan.splits, 2}, qc.options().dtype(at::kFloat));
    part_o = at::empty({rows, plan.splits, d}, qc.options().dtype(at::kFloat));
    launcher.bind_tensor(5, part_ml, Access::Write, "part_ml");
    launcher.bind_tensor(6, part_o, Access::Write, "part_o");
  }
  launcher.bind_value(4, args, "args");
  launcher.dispatch_threadgroups({uint32_t(rows / per_tg), uint32_t(plan.splits), 1}, {kAttnThreads, 1, 1});
  if (plan.splits > 1) {
    launcher.set_kernel(kernel_name("attention_reduce", q.scalar_type()));
    launcher.bind_tensor(3, out, Access::Write, "out");
    launcher.bind_value(4, args, "args");
    launcher.bind_tensor(5, part_ml, Access::Read, "part_ml");
    launcher.bind_tensor(6, part_o, Access::Read, "part_o");
    launcher.dispatch_threads({uint32_t(d), uint32_t(rows), 1},
                              {uint32_t(std::min<int64_t>(d, 256)), 1, 1});
  }
  return out;
}

}  // namespace

at::Tensor attention(Launcher& launcher, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                     bool causal, int64_t window) {
  return run_attention(launcher, "marlin.attention", q, k, v, nullptr, nullptr, nullptr, 0, scale, causal, window);
}

at::Tensor attention_fp8(Launcher& launcher, const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scales,
                         const at::Tensor& v, const at::Tensor& v_scales, double scale, bool causal, int64_t window) {
  return run_attention(launcher, "marlin.attention_fp8", q, k, v, &k_scales, &v_scales, nullptr, 0, scale, causal,
                       window);
}

at::Tensor attention_paged(Launcher& launcher, const at::Tensor& q, const at::Tensor& k_pages,
                           const at::Tensor& v_pages, const at::Tensor& block_table, int64_t seq_k, double scale,
                           bool causal, int64_t window) {
  return run_attention(launcher, "marlin.attention_paged", q, k_pages, v_pages, nullptr, nullptr, &block_table, seq_k,
                       scale, causal, window);
}

std::vector<std::string> layer_kernel_names() {
  std::vector<std::string> names;
  for (at::ScalarType t : kActivationTypes)
    for (const char* op : {"rms_norm", "layer_norm", "silu_mul", "gelu_mul", "rope", "attention", "attention_reduce",
                           "attention_prefill", "attention_fp8", "attention_prefill_fp8", "attention_paged",
                           "attention_prefill_paged"})
      names.push_back(kernel_name(op, t));
  return names;
}

}  // namespace marlin
