// TORCH_LIBRARY_IMPL(marlin, MPS) for the quantized-KV-cache ops (schemas in
// metal_marlin_torch/ops/library.py), each through its host code in csrc/ops/kv.cpp.
#include <torch/library.h>

#include "metal/metal_launcher.h"
#include "ops/ops.h"

namespace {

void kv_quantize_mps(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& packed,
                     const at::Tensor& norms, const at::Tensor& codebook, int64_t bits) {
  marlin::MetalLauncher l;
  marlin::kv_quantize(l, x, positions, packed, norms, codebook, bits);
}

at::Tensor kv_dequantize_mps(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                             int64_t pos, int64_t bits) {
  marlin::MetalLauncher l;
  return marlin::kv_dequantize(l, packed, norms, codebook, pos, bits);
}

void kv_dequantize_out_mps(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                           int64_t pos, int64_t bits, const at::Tensor& out) {
  marlin::MetalLauncher l;
  marlin::kv_dequantize_out(l, packed, norms, codebook, pos, bits, out);
}

at::Tensor kv_dequantize_seq_mps(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                                 int64_t start, int64_t n, int64_t bits) {
  marlin::MetalLauncher l;
  return marlin::kv_dequantize_seq(l, packed, norms, codebook, start, n, bits);
}

void kv_dequantize_seq_out_mps(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                               int64_t start, int64_t n, int64_t bits, const at::Tensor& out) {
  marlin::MetalLauncher l;
  marlin::kv_dequantize_seq_out(l, packed, norms, codebook, start, n, bits, out);
}

at::Tensor kv_attention_mps(const at::Tensor& q, const at::Tensor& k_packed, const at::Tensor& k_norms,
                            const at::Tensor& v_packed, const at::Tensor& v_norms, const at::Tensor& codebook,
                            int64_t length, int64_t bits, double scale) {
  marlin::MetalLauncher l;
  return marlin::kv_attention(l, q, k_packed, k_norms, v_packed, v_norms, codebook, length, bits, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(marlin, MPS, m) {
  m.impl("kv_quantize", &kv_quantize_mps);
  m.impl("kv_dequantize", &kv_dequantize_mps);
  m.impl("kv_dequantize_out", &kv_dequantize_out_mps);
  m.impl("kv_dequantize_seq", &kv_dequantize_seq_mps);
  m.impl("kv_dequantize_seq_out", &kv_dequantize_seq_out_mps);
  m.impl("kv_attention", &kv_attention_mps);
}
