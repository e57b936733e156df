// marlin::sample host code: checks (mirroring ops/sampling.py's errors), the fixed-point
// parameters (top_p and min_p as the torch kernel computes them), a float32 scratch row per
// logits row (the penalized, temperature-scaled scores the passes re-read), the int64 tokens,
// and one launch of one SAMPLE_THREADS threadgroup per row (shaders/sample.h).
#include <ATen/ops/empty.h>

#include <cmath>

#include "ops/common.h"
#include "ops/ops.h"
#include "shaders/sample_args.h"

namespace marlin {
namespace {

constexpr const char* kOp = "marlin.sample";
constexpr uint32_t kThreads = 256;            // SAMPLE_THREADS (shaders/sample.h)
constexpr int64_t kMaxVocab = int64_t(1) << 24;  // ops/sampling.py MAX_VOCAB

enum Slot { kLogits = 0, kUniforms, kPrev, kScratch, kOut, kArgs };

std::string kernel_name(at::ScalarType t) { return std::string("marlin_sample_") + kernel_dtype_name(t); }

}  // namespace

at::Tensor sample(Launcher& launcher, const at::Tensor& logits, const at::Tensor& uniforms,
                  const std::optional<at::Tensor>& prev_tokens, double repetition_penalty, double temperature,
                  int64_t top_k, double top_p, double min_p) {
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(1) >= 1, kOp,
                    ": logits must be a floating [batch, vocab] tensor, got shape ", logits.sizes());
  check_activation_dtype(kOp, "logits", logits.scalar_type());
  const int64_t b = logits.size(0), v = logits.size(1);
  TORCH_CHECK_VALUE(uniforms.scalar_type() == at::kFloat && uniforms.dim() == 1 && uniforms.size(0) == b, kOp,
                    ": uniforms must be float32 [", b, "] (one draw per row in [0, 1)), got ", uniforms.scalar_type(),
                    " of shape ", uniforms.sizes());
  if (prev_tokens)
    TORCH_CHECK_VALUE(prev_tokens->scalar_type() == at::kLong && prev_tokens->dim() == 2 && prev_tokens->size(0) == b,
                      kOp, ": prev_tokens must be int64 [", b, ", T], got ", prev_tokens->scalar_type(), " of shape ",
                      prev_tokens->sizes());
  TORCH_CHECK_VALUE(repetition_penalty > 0, kOp, ": repetition_penalty must be > 0, got ", repetition_penalty);
  TORCH_CHECK_VALUE(temperature >= 0, kOp, ": temperature must be >= 0 (0 = greedy), got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0, kOp, ": top_k must be >= 0 (0 = off), got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, kOp, ": top_p must be in (0, 1] (1 = off), got ", top_p);
  TORCH_CHECK_VALUE(min_p >= 0 && min_p <= 1, kOp, ": min_p must be in [0, 1] (0 = off), got ", min_p);
  TORCH_CHECK_VALUE(v <= kMaxVocab, kOp, ": vocab must be <= 2^24 = ", kMaxVocab, ", got ", v);
  for (const at::Tensor* t : {&uniforms, prev_tokens ? &*prev_tokens : &uniforms})
    TORCH_CHECK_VALUE(t->device() == logits.device(), kOp, ": all tensors must be on logits' device ",
                      logits.device(), ", got ", t->device());
  at::Tensor out = at::empty({b}, logits.options().dtype(at::kLong));
  if (b == 0) return out;
  const bool penalty = prev_tokens && prev_tokens->size(1) > 0 && repetition_penalty != 1.0;
  if (penalty) check_u32(kOp, "prev_tokens.size(1)", prev_tokens->size(1));
  check_u32(kOp, "logits.numel()", logits.numel());
  const at::Tensor lc = logits.contiguous(), uc = uniforms.contiguous();
  const at::Tensor pc = penalty ? prev_tokens->contiguous() : at::Tensor();
  at::Tensor scratch = at::empty({b, v}, logits.options().dtype(at::kFloat));
  SampleArgs args{};
  args.rows = uint32_t(b);
  args.vocab = uint32_t(v);
  args.prev_len = penalty ? uint32_t(pc.size(1)) : 0;
  args.greedy = temperature == 0;
  args.top_k = top_k > 0 && top_k < v ? uint32_t(top_k) : 0;
  // the torch kernel's fixed24(top_p) and floor(min_p * 2^31), in double as Python computes them
  args.top_p = top_p < 1 ? uint32_t(std::floor(top_p * 16777216.0)) : (1u << 24);
  args.min_weight = uint32_t(std::floor(min_p * 2147483648.0));
  args.penalty = float(repetition_penalty);
  args.temperature = float(temperature);
  launcher.set_kernel(kernel_name(logits.scalar_type()));
  launcher.bind_tensor(kLogits, lc, Access::Read, "logits");
  launcher.bind_tensor(kUniforms, uc, Access::Read, "uniforms");
  // without a penalty the kernel never reads prev: the slot gets uniforms, read-only
  launcher.bind_tensor(kPrev, penalty ? pc : uc, Access::Read, penalty ? "prev_tokens" : "uniforms (no prev_tokens)");
  launcher.bind_tensor(kScratch, scratch, Access::ReadWrite, "scratch");
  launcher.bind_tensor(kOut, out, Access::Write, "out");
  launcher.bind_value(kArgs, args, "args");
  launcher.dispatch_threadgroups({uint32_t(b), 1, 1}, {kThreads, 1, 1});
  return out;
}

std::vector<std::string> sample_kernel_names() {
  std::vector<std::string> names;
  for (at::ScalarType t : kActivationTypes) names.push_back(kernel_name(t));
  return names;
}

}  // namespace marlin
