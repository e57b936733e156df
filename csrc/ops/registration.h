// The op registrations every backend shares: one boxed-callable wrapper per op that runs its host
// code (ops.h) with a fresh Launcher of type L, and the list of m.impl() calls. csrc/metal
// registers them for MPS tensors under marlin:: (schemas from metal_marlin_torch/ops/library.py),
// csrc/emu for CPU tensors under marlin_emu:: (same schemas, defined there). So adding an op means
// one wrapper and one line here, not one per backend.
//
// Fallback: when the host code picks a kernel that the backend cannot run (its family's library
// was rejected by the compiler, or a bf16 kernel on an OS without bfloat: families.h), the
// Launcher throws KernelUnavailable from set_kernel, before anything is encoded, and the wrapper
// runs the op's pure-torch kernel instead: marlin_torch::<op>, the same schema, registered for
// CPU and MPS by metal_marlin_torch/ops/registry.py (which also logs the family's first fallback
// and reports it in backend_info()). The emulator runs exactly this code, so its tests cover it.
#pragma once

#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ops/families.h"
#include "ops/ops.h"

namespace marlin {

// Namespace of the pure-torch kernels the wrappers fall back to.
inline constexpr const char kTorchFallbackNamespace[] = "marlin_torch";

// Calls marlin_torch::<op>(args...) through the dispatcher (boxed: one helper for every schema,
// SymInt arguments included); returns the stack of results.
template <class... A>
std::vector<c10::IValue> call_torch_kernel(const char* op, const A&... args) {
  const std::string name = std::string(kTorchFallbackNamespace) + "::" + op;
  const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name.c_str(), "");
  std::vector<c10::IValue> stack;
  stack.reserve(sizeof...(A));
  (stack.emplace_back(args), ...);
  handle.callBoxed(stack);
  return stack;
}

// Static wrappers with the ops' schema signatures (what torch::Library::impl unboxes into).
template <class L>
struct OpsOn {
  static at::Tensor dequantize(const at::Tensor& weight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& biases,
                               const std::optional<at::Tensor>& global_scale, std::string format,
                               int64_t group_size, int64_t in_features, at::ScalarType dtype) {
    try {
      L l;
      return marlin::dequantize(l, weight, scales, biases, global_scale, format, group_size, in_features, dtype);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("dequantize", weight, scales, biases, global_scale, format, group_size, in_features,
                               dtype)[0]
          .toTensor();
    }
  }

  static at::Tensor fake_quantize(const at::Tensor& x, int64_t bits) {
    try {
      L l;
      return marlin::fake_quantize(l, x, bits);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("fake_quantize", x, bits)[0].toTensor();
    }
  }

  // Not a marlin:: op: each backend registers it in its own namespace (benchmarks and tests pick
  // the vec or block kernel with it).
  static at::Tensor fake_quantize_variant(const at::Tensor& x, int64_t bits, std::string variant) {
    try {
      L l;
      return marlin::fake_quantize(l, x, bits, parse_fake_quantize_variant(variant));
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("fake_quantize", x, bits)[0].toTensor();
    }
  }

  static at::Tensor hadamard(const at::Tensor& x, int64_t block) {
    try {
      L l;
      return marlin::hadamard(l, x, block);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("hadamard", x, block)[0].toTensor();
    }
  }

  static at::Tensor gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                         const std::optional<at::Tensor>& biases, const std::optional<at::Tensor>& global_scale,
                         const std::optional<at::Tensor>& bias, std::string format, int64_t group_size) {
    try {
      L l;
      return marlin::gemm(l, x, weight, scales, biases, global_scale, bias, format, group_size);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("gemm", x, weight, scales, biases, global_scale, bias, format, group_size)[0].toTensor();
    }
  }

  static at::Tensor moe_gemm(const at::Tensor& x, const at::Tensor& expert_ids, const at::Tensor& weight,
                             const at::Tensor& scales, const std::optional<at::Tensor>& biases,
                             const std::optional<at::Tensor>& global_scale, const std::optional<at::Tensor>& bias,
                             std::string format, int64_t group_size) {
    try {
      L l;
      return marlin::moe_gemm(l, x, expert_ids, weight, scales, biases, global_scale, bias, format, group_size);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("moe_gemm", x, expert_ids, weight, scales, biases, global_scale, bias, format,
                               group_size)[0]
          .toTensor();
    }
  }

  static std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& logits, const std::optional<at::Tensor>& bias,
                                                       int64_t top_k, std::string mode, bool renormalize,
                                                       int64_t n_group, int64_t topk_group, double scaling) {
    try {
      L l;
      return marlin::moe_route(l, logits, bias, top_k, mode, renormalize, n_group, topk_group, scaling);
    } catch (const KernelUnavailable&) {
      auto r = call_torch_kernel("moe_route", logits, bias, top_k, mode, renormalize, n_group, topk_group, scaling);
      return {r[0].toTensor(), r[1].toTensor()};
    }
  }

  static void kv_quantize(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& packed,
                          const at::Tensor& norms, const at::Tensor& codebook, int64_t bits) {
    try {
      L l;
      marlin::kv_quantize(l, x, positions, packed, norms, codebook, bits);
    } catch (const KernelUnavailable&) {
      call_torch_kernel("kv_quantize", x, positions, packed, norms, codebook, bits);
    }
  }

  static at::Tensor kv_dequantize(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                                  int64_t pos, int64_t bits) {
    try {
      L l;
      return marlin::kv_dequantize(l, packed, norms, codebook, pos, bits);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("kv_dequantize", packed, norms, codebook, pos, bits)[0].toTensor();
    }
  }

  static void kv_dequantize_out(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                                int64_t pos, int64_t bits, const at::Tensor& out) {
    try {
      L l;
      marlin::kv_dequantize_out(l, packed, norms, codebook, pos, bits, out);
    } catch (const KernelUnavailable&) {
      call_torch_kernel("kv_dequantize_out", packed, norms, codebook, pos, bits, out);
    }
  }

  static at::Tensor kv_dequantize_seq(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                                      int64_t start, int64_t n, int64_t bits) {
    try {
      L l;
      return marlin::kv_dequantize_seq(l, packed, norms, codebook, start, n, bits);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("kv_dequantize_seq", packed, norms, codebook, start, n, bits)[0].toTensor();
    }
  }

  static void kv_dequantize_seq_out(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                                    int64_t start, int64_t n, int64_t bits, const at::Tensor& out) {
    try {
      L l;
      marlin::kv_dequantize_seq_out(l, packed, norms, codebook, start, n, bits, out);
    } catch (const KernelUnavailable&) {
      call_torch_kernel("kv_dequantize_seq_out", packed, norms, codebook, start, n, bits, out);
    }
  }

  static at::Tensor kv_attention(const at::Tensor& q, const at::Tensor& k_packed, const at::Tensor& k_norms,
                                 const at::Tensor& v_packed, const at::Tensor& v_norms, const at::Tensor& codebook,
                                 int64_t length, int64_t bits, double scale) {
    try {
      L l;
      return marlin::kv_attention(l, q, k_packed, k_norms, v_packed, v_norms, codebook, length, bits, scale);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("kv_attention", q, k_packed, k_norms, v_packed, v_norms, codebook, length, bits,
                               scale)[0]
          .toTensor();
    }
  }

  // Token sampling (csrc/ops/sample.cpp).
  static at::Tensor sample(const at::Tensor& logits, const at::Tensor& uniforms,
                           const std::optional<at::Tensor>& prev_tokens, double repetition_penalty,
                           double temperature, int64_t top_k, double top_p, double min_p) {
    try {
      L l;
      return marlin::sample(l, logits, uniforms, prev_tokens, repetition_penalty, temperature, top_k, top_p, min_p);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("sample", logits, uniforms, prev_tokens, repetition_penalty, temperature, top_k, top_p,
                               min_p)[0]
          .toTensor();
    }
  }

  // Decoder-layer ops (csrc/ops/layer.cpp).
  static std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& residual, double eps) {
    try {
      L l;
      return marlin::rms_norm(l, x, weight, residual, eps);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("rms_norm", x, weight, residual, eps)[0].toTensorVector();
    }
  }

  static std::vector<at::Tensor> layer_norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                            const std::optional<at::Tensor>& bias,
                                            const std::optional<at::Tensor>& residual, double eps) {
    try {
      L l;
      return marlin::layer_norm(l, x, weight, bias, residual, eps);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("layer_norm", x, weight, bias, residual, eps)[0].toTensorVector();
    }
  }

  static at::Tensor silu_mul(const at::Tensor& gate, const std::optional<at::Tensor>& up) {
    try {
      L l;
      return marlin::silu_mul(l, gate, up);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("silu_mul", gate, up)[0].toTensor();
    }
  }

  static at::Tensor gelu_mul(const at::Tensor& gate, const std::optional<at::Tensor>& up) {
    try {
      L l;
      return marlin::gelu_mul(l, gate, up);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("gelu_mul", gate, up)[0].toTensor();
    }
  }

  static std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                                 const at::Tensor& inv_freq, double scaling, bool interleaved) {
    try {
      L l;
      return marlin::rope(l, q, k, positions, inv_freq, scaling, interleaved);
    } catch (const KernelUnavailable&) {
      auto out = call_torch_kernel("rope", q, k, positions, inv_freq, scaling, interleaved);
      return {out[0].toTensor(), out[1].toTensor()};
    }
  }

  static at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                              bool causal, int64_t window) {
    try {
      L l;
      return marlin::attention(l, q, k, v, scale, causal, window);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("attention", q, k, v, scale, causal, window)[0].toTensor();
    }
  }

  static at::Tensor attention_fp8(const at::Tensor& q, const at::Tensor& k, const at::Tensor& k_scales,
                                  const at::Tensor& v, const at::Tensor& v_scales, double scale, bool causal,
                                  int64_t window) {
    try {
      L l;
      return marlin::attention_fp8(l, q, k, k_scales, v, v_scales, scale, causal, window);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("attention_fp8", q, k, k_scales, v, v_scales, scale, causal, window)[0].toTensor();
    }
  }

  static at::Tensor attention_paged(const at::Tensor& q, const at::Tensor& k_pages, const at::Tensor& v_pages,
                                    const at::Tensor& block_table, int64_t seq_k, double scale, bool causal,
                                    int64_t window) {
    try {
      L l;
      return marlin::attention_paged(l, q, k_pages, v_pages, block_table, seq_k, scale, causal, window);
    } catch (const KernelUnavailable&) {
      return call_torch_kernel("attention_paged", q, k_pages, v_pages, block_table, seq_k, scale, causal, window)[0]
          .toTensor();
    }
  }
};

// m.impl() for every op that has a schema in metal_marlin_torch/ops/library.py (all but
// fake_quantize_variant), each run by a Launcher of type L.
template <class L>
void impl_ops(torch::Library& m) {
  m.impl("dequantize", &OpsOn<L>::dequantize);
  m.impl("fake_quantize", &OpsOn<L>::fake_quantize);
  m.impl("hadamard", &OpsOn<L>::hadamard);
  m.impl("gemm", &OpsOn<L>::gemm);
  m.impl("moe_gemm", &OpsOn<L>::moe_gemm);
  m.impl("moe_route", &OpsOn<L>::moe_route);
  m.impl("kv_quantize", &OpsOn<L>::kv_quantize);
  m.impl("kv_dequantize", &OpsOn<L>::kv_dequantize);
  m.impl("kv_dequantize_out", &OpsOn<L>::kv_dequantize_out);
  m.impl("kv_dequantize_seq", &OpsOn<L>::kv_dequantize_seq);
  m.impl("kv_dequantize_seq_out", &OpsOn<L>::kv_dequantize_seq_out);
  m.impl("kv_attention", &OpsOn<L>::kv_attention);
  m.impl("sample", &OpsOn<L>::sample);
  m.impl("rms_norm", &OpsOn<L>::rms_norm);
  m.impl("layer_norm", &OpsOn<L>::layer_norm);
  m.impl("silu_mul", &OpsOn<L>::silu_mul);
  m.impl("gelu_mul", &OpsOn<L>::gelu_mul);
  m.impl("rope", &OpsOn<L>::rope);
  m.impl("attention", &OpsOn<L>::attention);
  m.impl("attention_fp8", &OpsOn<L>::attention_fp8);
  m.impl("attention_paged", &OpsOn<L>::attention_paged);
}

}  // namespace marlin
