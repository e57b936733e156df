// marlin_emu::*: the marlin ops' host code (csrc/ops) driven by the emulator's Launcher, for
// CPU tensors. Same schemas as marlin:: (metal_marlin_torch/ops/library.py) and the same
// wrappers and impl list as the Metal glue (csrc/ops/registration.h), plus
// fake_quantize_variant (pick the vec or block kernel), _gemm_plan, _attention_plan and _host_kernel_names, and
// the kernel-family hooks (csrc/ops/families.h, csrc/emu/emu_families.h): _families,
// _reject_family, _set_bfloat, _reset_families, _kernel_family, _msl_choice.
#include <torch/library.h>

#include <string>
#include <vector>

#include "emu/emu_families.h"
#include "emu/emu_launcher.h"
#include "ops/families.h"
#include "ops/registration.h"

namespace {

std::vector<std::string> families() { return marlin::emu_family_table().describe(); }

void reject_family(std::string family, std::string message) { marlin::emu_set_family_rejection(family, message); }

void set_bfloat(bool available) { marlin::emu_set_bfloat(available); }

void reset_families() { marlin::emu_family_table().reset(); }

std::string kernel_family(std::string kernel) {
  const int f = marlin::kernel_family(kernel);
  return f < 0 ? "" : marlin::kKernelFamilies[f].name;
}

// [MSL major, minor, bfloat, mathMode API] for a macOS version (what the Metal glue chooses).
std::vector<int64_t> msl_choice(int64_t macos_major, int64_t macos_minor) {
  const marlin::MslChoice c = marlin::choose_msl(int(macos_major), int(macos_minor));
  return {c.major, c.minor, c.bfloat, c.math_mode_api};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(marlin_emu, m) {
  m.def("dequantize(Tensor weight, Tensor scales, Tensor? biases, Tensor? global_scale, "
        "str format, int group_size, int in_features, ScalarType dtype) -> Tensor");
  m.def("fake_quantize(Tensor x, int bits) -> Tensor");
  m.def("fake_quantize_variant(Tensor x, int bits, str variant) -> Tensor");
  m.def("hadamard(Tensor x, int block) -> Tensor");
  m.def("gemm(Tensor x, Tensor weight, Tensor scales, Tensor? biases, Tensor? global_scale, "
        "Tensor? bias, str format, int group_size) -> Tensor");
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
  m.def("moe_gemm(Tensor x, Tensor expert_ids, Tensor weight, Tensor scales, Tensor? biases, "
        "Tensor? global_scale, Tensor? bias, str format, int group_size) -> Tensor");
  m.def("_moe_gemm_plan(int M, int E) -> int[]", &marlin::moe_gemm_plan);
  m.def("moe_route(Tensor logits, Tensor? bias, int top_k, str mode, bool renormalize, int n_group, "
        "int topk_group, float scaling) -> (Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, Tensor? residual, float eps) -> Tensor[]");
  m.def("layer_norm(Tensor x, Tensor? weight, Tensor? bias, Tensor? residual, float eps) -> Tensor[]");
  m.def("silu_mul(Tensor gate, Tensor? up) -> Tensor");
  m.def("gelu_mul(Tensor gate, Tensor? up) -> Tensor");
  m.def("rope(Tensor q, Tensor k, Tensor positions, Tensor inv_freq, float scaling, bool interleaved) "
        "-> (Tensor, Tensor)");
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale, bool causal, int window) -> Tensor");
  m.def("sample(Tensor logits, Tensor uniforms, Tensor? prev_tokens, float repetition_penalty, float temperature, "
        "int top_k, float top_p, float min_p) -> Tensor");
  m.def("attention_fp8(Tensor q, Tensor k, Tensor k_scales, Tensor v, Tensor v_scales, float scale, bool causal, "
        "int window) -> Tensor");
  m.def("attention_paged(Tensor q, Tensor k_pages, Tensor v_pages, Tensor block_table, int seq_k, float scale, "
        "bool causal, int window) -> Tensor");
  m.def("_gemm_plan(int M, int N, int K) -> int[]", &marlin::gemm_plan);
  m.def("_attention_plan(int rows, int sq, int sk, int d, bool causal, int window) -> int[]",
        &marlin::attention_plan);
  m.def("_host_kernel_names() -> str[]", &marlin::host_kernel_names);
  m.def("_families() -> str[]", &families);
  m.def("_reject_family(str family, str message) -> ()", &reject_family);
  m.def("_set_bfloat(bool available) -> ()", &set_bfloat);
  m.def("_reset_families() -> ()", &reset_families);
  m.def("_kernel_family(str kernel) -> str", &kernel_family);
  m.def("_msl_choice(int macos_major, int macos_minor) -> int[]", &msl_choice);
}

TORCH_LIBRARY_IMPL(marlin_emu, CPU, m) {
  marlin::impl_ops<marlin::EmuLauncher>(m);
  m.impl("fake_quantize_variant", &marlin::OpsOn<marlin::EmuLauncher>::fake_quantize_variant);
}
