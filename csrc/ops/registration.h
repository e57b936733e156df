// The op registrations every backend shares: one boxed-callable wrapper per op that runs its host
// code (ops.h) with a fresh Launcher of type L, and the list of m.impl() calls. csrc/metal
// registers them for MPS tensors under marlin:: (schemas from metal_marlin_torch/ops/library.py),
// csrc/emu for CPU tensors under marlin_emu:: (same schemas, defined there). So adding an op means
// one wrapper and one line here, not one per backend.
#pragma once

#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string>

#include "ops/ops.h"

namespace marlin {

// Static wrappers with the ops' schema signatures (what torch::Library::impl unboxes into).
template <class L>
struct OpsOn {
  static at::Tensor dequantize(const at::Tensor& weight, const at::Tensor& scales,
                               const std::optional<at::Tensor>& biases,
                               const std::optional<at::Tensor>& global_scale, std::string format,
                               int64_t group_size, int64_t in_features, at::ScalarType dtype) {
    L l;
    return marlin::dequantize(l, weight, scales, biases, global_scale, format, group_size, in_features, dtype);
  }

  static at::Tensor fake_quantize(const at::Tensor& x, int64_t bits) {
    L l;
    return marlin::fake_quantize(l, x, bits);
  }

  // Not a marlin:: op: each backend registers it in its own namespace (benchmarks and tests pick
  // the vec or block kernel with it).
  static at::Tensor fake_quantize_variant(const at::Tensor& x, int64_t bits, std::string variant) {
    L l;
    return marlin::fake_quantize(l, x, bits, parse_fake_quantize_variant(variant));
  }

  static at::Tensor hadamard(const at::Tensor& x, int64_t block) {
    L l;
    return marlin::hadamard(l, x, block);
  }

  static at::Tensor gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales,
                         const std::optional<at::Tensor>& biases, const std::optional<at::Tensor>& global_scale,
                         const std::optional<at::Tensor>& bias, std::string format, int64_t group_size) {
    L l;
    return marlin::gemm(l, x, weight, scales, biases, global_scale, bias, format, group_size);
  }

  static void kv_quantize(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& packed,
                          const at::Tensor& norms, const at::Tensor& codebook, int64_t bits) {
    L l;
    marlin::kv_quantize(l, x, positions, packed, norms, codebook, bits);
  }

  static at::Tensor kv_dequantize(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                                  int64_t pos, int64_t bits) {
    L l;
    return marlin::kv_dequantize(l, packed, norms, codebook, pos, bits);
  }

  static void kv_dequantize_out(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                                int64_t pos, int64_t bits, const at::Tensor& out) {
    L l;
    marlin::kv_dequantize_out(l, packed, norms, codebook, pos, bits, out);
  }

  static at::Tensor kv_dequantize_seq(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                                      int64_t start, int64_t n, int64_t bits) {
    L l;
    return marlin::kv_dequantize_seq(l, packed, norms, codebook, start, n, bits);
  }

  static void kv_dequantize_seq_out(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                                    int64_t start, int64_t n, int64_t bits, const at::Tensor& out) {
    L l;
    marlin::kv_dequantize_seq_out(l, packed, norms, codebook, start, n, bits, out);
  }

  static at::Tensor kv_attention(const at::Tensor& q, const at::Tensor& k_packed, const at::Tensor& k_norms,
                                 const at::Tensor& v_packed, const at::Tensor& v_norms, const at::Tensor& codebook,
                                 int64_t length, int64_t bits, double scale) {
    L l;
    return marlin::kv_attention(l, q, k_packed, k_norms, v_packed, v_norms, codebook, length, bits, scale);
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
  m.impl("kv_quantize", &OpsOn<L>::kv_quantize);
  m.impl("kv_dequantize", &OpsOn<L>::kv_dequantize);
  m.impl("kv_dequantize_out", &OpsOn<L>::kv_dequantize_out);
  m.impl("kv_dequantize_seq", &OpsOn<L>::kv_dequantize_seq);
  m.impl("kv_dequantize_seq_out", &OpsOn<L>::kv_dequantize_seq_out);
  m.impl("kv_attention", &OpsOn<L>::kv_attention);
}

}  // namespace marlin
