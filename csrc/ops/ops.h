// Op host code: argument checks, output allocation, kernel choice and grid, written once
// against Launcher (launcher.h) and used by the Metal glue (csrc/metal) and the emulator
// (csrc/emu). Each function's schema is the marlin op's (metal_marlin_torch/ops/library.py).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <tuple>
#include <vector>

#include "ops/launcher.h"

namespace marlin {

at::Tensor dequantize(Launcher& launcher, const at::Tensor& weight, const at::Tensor& scales,
                      const std::optional<at::Tensor>& biases,
                      const std::optional<at::Tensor>& global_scale, const std::string& format,
                      int64_t group_size, int64_t in_features, at::ScalarType dtype);
// Every kernel name dequantize() can dispatch.
std::vector<std::string> dequantize_kernel_names();

enum class FakeQuantizeVariant { Auto, Vector, Block };
FakeQuantizeVariant parse_fake_quantize_variant(const std::string& s);
at::Tensor fake_quantize(Launcher& launcher, const at::Tensor& x, int64_t bits,
                         FakeQuantizeVariant variant = FakeQuantizeVariant::Auto);
std::vector<std::string> fake_quantize_kernel_names();

at::Tensor hadamard(Launcher& launcher, const at::Tensor& x, int64_t block);
std::vector<std::string> hadamard_kernel_names();

// Quantized KV cache (csrc/ops/kv.cpp, shaders/kv.h).
void kv_quantize(Launcher& launcher, const at::Tensor& x, const at::Tensor& positions, const at::Tensor& packed,
                 const at::Tensor& norms, const at::Tensor& codebook, int64_t bits);
at::Tensor kv_dequantize(Launcher& launcher, const at::Tensor& packed, const at::Tensor& norms,
                         const at::Tensor& codebook, int64_t pos, int64_t bits);
void kv_dequantize_out(Launcher& launcher, const at::Tensor& packed, const at::Tensor& norms,
                       const at::Tensor& codebook, int64_t pos, int64_t bits, const at::Tensor& out);
at::Tensor kv_dequantize_seq(Launcher& launcher, const at::Tensor& packed, const at::Tensor& norms,
                             const at::Tensor& codebook, int64_t start, int64_t n, int64_t bits);
void kv_dequantize_seq_out(Launcher& launcher, const at::Tensor& packed, const at::Tensor& norms,
                           const at::Tensor& codebook, int64_t start, int64_t n, int64_t bits,
                           const at::Tensor& out);
at::Tensor kv_attention(Launcher& launcher, const at::Tensor& q, const at::Tensor& k_packed,
                        const at::Tensor& k_norms, const at::Tensor& v_packed, const at::Tensor& v_norms,
                        const at::Tensor& codebook, int64_t length, int64_t bits, double scale);
std::vector<std::string> kv_kernel_names();

// y[..., N] = x[..., K] @ dequantize(weight)^T + bias (shaders/gemm.h, csrc/ops/gemm.cpp).
at::Tensor gemm(Launcher& launcher, const at::Tensor& x, const at::Tensor& weight,
                const at::Tensor& scales, const std::optional<at::Tensor>& biases,
                const std::optional<at::Tensor>& global_scale, const std::optional<at::Tensor>& bias,
                const std::string& format, int64_t group_size);
std::vector<std::string> gemm_kernel_names();
// The dispatch decision for [M, K] x [N, K]^T: {variant (0 gemv, 1 gemv_rows, 2 gemm),
// K per split, splits, gemv lanes per weight row (0 for gemm)}. Exposed so tests can check
// which kernels and work splits their shapes exercise.
std::vector<int64_t> gemm_plan(int64_t M, int64_t N, int64_t K);

// Mixture of experts (csrc/ops/moe.cpp, shaders/moe.h): y[..., N] = x[..., K] @ W_hat[e]^T +
// bias[e] with e = expert_ids[...], weight [E, N, words].
at::Tensor moe_gemm(Launcher& launcher, const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weight,
                    const at::Tensor& scales, const std::optional<at::Tensor>& biases,
                    const std::optional<at::Tensor>& global_scale, const std::optional<at::Tensor>& bias,
                    const std::string& format, int64_t group_size);
std::vector<std::string> moe_kernel_names();
// The dispatch decision for M rows over E experts: {variant (0 moe_gemv, 1 moe_sort + moe_gemm)}.
std::vector<int64_t> moe_gemm_plan(int64_t M, int64_t E);
// Router logits [..., E] -> (weights float32 [..., top_k], ids int64 [..., top_k])
// (csrc/ops/moe_route.cpp, shaders/moe_route.h; modes as metal_marlin_torch/ops/moe_route.py).
std::tuple<at::Tensor, at::Tensor> moe_route(Launcher& launcher, const at::Tensor& logits,
                                             const std::optional<at::Tensor>& bias, int64_t top_k,
                                             const std::string& mode, bool renormalize, int64_t n_group,
                                             int64_t topk_group, double scaling);
std::vector<std::string> moe_route_kernel_names();
// Token sampling (csrc/ops/sample.cpp, shaders/sample.h; semantics metal_marlin_torch/ops/sampling.py).
at::Tensor sample(Launcher& launcher, const at::Tensor& logits, const at::Tensor& uniforms,
                  const std::optional<at::Tensor>& prev_tokens, double repetition_penalty, double temperature,
                  int64_t top_k, double top_p, double min_p);
std::vector<std::string> sample_kernel_names();
// Decoder-layer ops (csrc/ops/layer.cpp; shaders/norm.h, act.h, rope.h).
std::vector<at::Tensor> rms_norm(Launcher& launcher, const at::Tensor& x, const at::Tensor& weight,
                                 const std::optional<at::Tensor>& residual, double eps);
std::vector<at::Tensor> layer_norm(Launcher& launcher, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& residual,
                                   double eps);
at::Tensor silu_mul(Launcher& launcher, const at::Tensor& gate, const std::optional<at::Tensor>& up);
at::Tensor gelu_mul(Launcher& launcher, const at::Tensor& gate, const std::optional<at::Tensor>& up);
std::tuple<at::Tensor, at::Tensor> rope(Launcher& launcher, const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& positions, const at::Tensor& inv_freq, double scaling,
                                        bool interleaved);
at::Tensor attention(Launcher& launcher, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                     bool causal, int64_t window);
// attention over K/V held as FP8 E4M3 codes (uint8 [B, Hk, Sk, D]) with float32 scales [B, Hk, Sk].
at::Tensor attention_fp8(Launcher& launcher, const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scales,
                         const at::Tensor& v, const at::Tensor& v_scales, double scale, bool causal, int64_t window);
// attention over paged K/V: pages [num_pages, Hk, P, D], sequence b's token j on page
// block_table[b][j / P] (int32 [B, pages]) at slot j % P; every sequence holds seq_k tokens.
at::Tensor attention_paged(Launcher& launcher, const at::Tensor& q, const at::Tensor& k_pages,
                           const at::Tensor& v_pages, const at::Tensor& block_table, int64_t seq_k, double scale,
                           bool causal, int64_t window);
// [variant (0: row kernel, 1: prefill), key slices, keys per slice] that attention launches for
// `rows` row-kernel threadgroups per key slice (B * Hq / query heads per threadgroup * sq) for
// queries of sq rows over sk keys (csrc/ops/layer.cpp: plan_attention).
std::vector<int64_t> attention_plan(int64_t rows, int64_t sq, int64_t sk, int64_t d, bool causal, int64_t window);
std::vector<std::string> layer_kernel_names();

// Union of the above: what a test compares with the instantiated kernels.
std::vector<std::string> host_kernel_names();

}  // namespace marlin
