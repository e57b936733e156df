// marlin_emu::kv_*: the quantized-KV-cache host code (csrc/ops/kv.cpp) driven by the emulator's
// Launcher, for CPU tensors. Same schemas as marlin:: (metal_marlin_torch/ops/library.py).
#include <torch/library.h>

#include "emu/emu_launcher.h"
#include "ops/ops.h"

namespace {

void kv_quantize(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& packed,
                 const at::Tensor& norms, const at::Tensor& codebook, int64_t bits) {
  marlin::EmuLauncher l;
  marlin::kv_quantize(l, x, positions, packed, norms, codebook, bits);
}

at::Tensor kv_dequantize(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                         int64_t pos, int64_t bits) {
  marlin::EmuLauncher l;
  return marlin::kv_dequantize(l, packed, norms, codebook, pos, bits);
}

void kv_dequantize_out(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook, int64_t pos,
                       int64_t bits, const at::Tensor& out) {
  marlin::EmuLauncher l;
  marlin::kv_dequantize_out(l, packed, norms, codebook, pos, bits, out);
}

at::Tensor kv_dequantize_seq(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                             int64_t start, int64_t n, int64_t bits) {
  marlin::EmuLauncher l;
  return marlin::kv_dequantize_seq(l, packed, norms, codebook, start, n, bits);
}

void kv_dequantize_seq_out(const at::Tensor& packed, const at::Tensor& norms, const at::Tensor& codebook,
                           int64_t start, int64_t n, int64_t bits, const at::Tensor& out) {
  marlin::EmuLauncher l;
  marlin::kv_dequantize_seq_out(l, packed, norms, codebook, start, n, bits, out);
}

at::Tensor kv_attention(const at::Tensor& q, const at::Tensor& k_packed, const at::Tensor& k_norms,
                        const at::Tensor& v_packed, const at::Tensor& v_norms, const at::Tensor& codebook,
                        int64_t length, int64_t bits, double scale) {
  marlin::EmuLauncher l;
  return marlin::kv_attention(l, q, k_packed, k_norms, v_packed, v_norms, codebook, length, bits, scale);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(marlin_emu, m) {
  m.def("kv_quantize(Tensor x, Tensor positions, Tensor(a!) packed, Tensor(b!) norms, Tensor codebook, "
        "int bits) -> ()");
  m.def("kv_dequantize(Tensor packed, Tensor norms, Tensor codebook, SymInt pos, int bits) -> Tensor");
  m.def("kv_dequantize_out(Tensor packed, Tensor norms, Tensor codebook, SymInt pos, int bits, "
        "Tensor(a!) out) -> ()");
  m.def("kv_dequantize_seq(Tensor packed, Tensor norms, Tensor codebook, SymInt start, SymInt n, int bits) "
        "-> Tensor");
  m.def("kv_dequantize_seq_out(Tensor packed, Tensor norms, Tensor codebook, SymInt start, SymInt n, int bits, "
        "Tensor(a!) out) -> ()");
  m.def("kv_attention(Tensor q, Tensor k_packed, Tensor k_norms, Tensor v_packed, Tensor v_norms, "
        "Tensor codebook, SymInt length, int bits, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(marlin_emu, CPU, m) {
  m.impl("kv_quantize", &kv_quantize);
  m.impl("kv_dequantize", &kv_dequantize);
  m.impl("kv_dequantize_out", &kv_dequantize_out);
  m.impl("kv_dequantize_seq", &kv_dequantize_seq);
  m.impl("kv_dequantize_seq_out", &kv_dequantize_seq_out);
  m.impl("kv_attention", &kv_attention);
}
