// Kernel families: one Metal library per op family, compiled on first use, so one construct that
// Apple's compiler rejects costs that family its Metal kernels, not every op. This header is the
// one table of families and the logic around it (which family a kernel name belongs to, which
// MSL version an OS gets, whether bfloat kernels exist there, the per-family compile state). It
// is shared by the Metal glue (csrc/metal, which supplies the real compiler) and the emulator
// (csrc/emu, which supplies a stub the tests can make fail), so the logic is tested on Linux.
//
// metal_marlin_torch/metal_families.py reads kKernelFamilies from this file (to embed each
// family's shader files in the build); tests/metal/test_families.py checks that every kernel
// belongs to exactly one family and every shaders/*.metal file to exactly one library.
#pragma once

#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace marlin {

struct KernelFamily {
  const char* name;             // the library: marlin_<name>.metallib, the key in backend_info()
  const char* kernel_prefixes;  // space-separated prefixes of the kernel names it instantiates
  const char* shader_files;     // space-separated shaders/*.metal files compiled into it
};

// Add a row to add a family (e.g. moe, attention): its kernels' name prefix and its files.
// clang-format off
inline constexpr KernelFamily kKernelFamilies[] = {
    {"dequantize",    "marlin_dequantize_",    "dequantize.metal"},
    {"gemv",          "marlin_gemv_",          "gemv.metal"},
    {"gemm",          "marlin_gemm_",          "gemm.metal"},
    {"hadamard",      "marlin_hadamard_",      "hadamard.metal"},
    {"fake_quantize", "marlin_fake_quantize_", "fake_quantize.metal"},
    {"kv",            "marlin_kv_",            "kv_quantize.metal kv_dequantize.metal"},
    {"moe",           "marlin_moe_",           "moe_gemv.metal moe_gemm.metal moe_route.metal"},
    {"norm",          "marlin_rms_norm_ marlin_layer_norm_", "norm.metal"},
    {"act",           "marlin_silu_mul_ marlin_gelu_mul_",   "act.metal"},
    {"rope",          "marlin_rope_",          "rope.metal"},
    {"attention",     "marlin_attention_",     "attention.metal"},
    {"sample",        "marlin_sample_",        "sample.metal"},
};
// clang-format on
inline constexpr int kNumKernelFamilies = int(sizeof(kKernelFamilies) / sizeof(kKernelFamilies[0]));

// Index into kKernelFamilies of the family that instantiates kernel `name`; -1 when none does
// (a host-code bug: every name a dispatcher builds has a family, tests/metal/test_families.py).
inline int kernel_family(const std::string& name) {
  for (int f = 0; f < kNumKernelFamilies; ++f) {
    const char* p = kKernelFamilies[f].kernel_prefixes;
    while (*p) {
      const char* end = std::strchr(p, ' ');
      const size_t n = end ? size_t(end - p) : std::strlen(p);
      if (name.compare(0, n, p, n) == 0) return f;
      p += n + (end ? 1 : 0);
    }
  }
  return -1;
}

// bf16 kernels spell their activation type `bfloat16` in the name (docs/METAL.md, naming).
inline bool kernel_needs_bfloat(const std::string& name) { return name.find("_bfloat16") != std::string::npos; }

// The Metal Shading Language version for a macOS version, as PyTorch picks it
// (aten/src/ATen/native/mps/OperationUtils.mm): 4.0 from macOS 26, 3.2 from 15, 3.1 on 14; we
// also accept macOS 13 with 3.0, where `bfloat` does not exist (MSL 3.1 added it), so bf16
// kernels are left out (shaders guard them with __METAL_VERSION__ >= 310) and bf16 ops fall back.
// From macOS 15 `fastMathEnabled` is deprecated in favour of mathMode (safe math: NaN and Inf
// must survive, fake_quantize and hadamard propagate them as the torch ops do).
struct MslChoice {
  int major = 0, minor = 0;   // MSL version; 0.0 = the OS is too old for these kernels
  bool bfloat = false;        // bf16 kernels are compiled
  bool math_mode_api = false; // set mathMode / mathFloatingPointFunctions, not fastMathEnabled
};

inline MslChoice choose_msl(int macos_major, int macos_minor) {
  (void)macos_minor;  // no choice depends on a minor release so far
  if (macos_major >= 26) return {4, 0, true, true};
  if (macos_major >= 15) return {3, 2, true, true};
  if (macos_major == 14) return {3, 1, true, false};
  if (macos_major == 13) return {3, 0, false, false};
  return {};
}

// Thrown by a Launcher's set_kernel when the kernel cannot run on this backend (its family was
// rejected by the compiler, or it needs bfloat the OS lacks). The op wrappers of registration.h
// catch it before anything was encoded and run the op's pure-torch kernel instead.
class KernelUnavailable : public std::runtime_error {
 public:
  KernelUnavailable(std::string family, const std::string& why)
      : std::runtime_error(why), family_(std::move(family)) {}
  const std::string& family() const { return family_; }

 private:
  std::string family_;
};

// Per-process state of every family on one backend: compiled lazily by `compile` (the backend's
// compiler: returns "" on success, else the compiler's message), once; the result is kept.
class FamilyTable {
 public:
  enum class State { NotCompiled, Compiled, Rejected };
  // `compile(f)` builds family f's library; returns "" when it compiled, else the message.
  using Compiler = std::function<std::string(int family)>;

  // Throws KernelUnavailable when `kernel` cannot run: no family (never for a name the host
  // code builds), the family rejected now or before, or a bf16 kernel without bfloat support.
  void require(const std::string& kernel, bool have_bfloat, const char* no_bfloat_reason,
               const Compiler& compile) {
    const int f = kernel_family(kernel);
    if (f < 0) throw KernelUnavailable("?", "no kernel family instantiates '" + kernel + "'");
    std::lock_guard<std::mutex> lock(mutex_);
    Entry& e = entries_[f];
    if (kernel_needs_bfloat(kernel) && !have_bfloat) {
      e.bfloat_fallback = true;
      throw KernelUnavailable(kKernelFamilies[f].name, no_bfloat_reason);
    }
    if (e.state == State::NotCompiled) {
      std::string msg = compile(f);
      e.state = msg.empty() ? State::Compiled : State::Rejected;
      e.message = std::move(msg);
    }
    if (e.state == State::Rejected) throw KernelUnavailable(kKernelFamilies[f].name, e.message);
  }

  // Marks family f rejected with `message` (a pipeline that failed after its library compiled).
  void reject(int f, std::string message) {
    std::lock_guard<std::mutex> lock(mutex_);
    entries_[f].state = State::Rejected;
    entries_[f].message = std::move(message);
  }

  // One row per family, "name\tstate\tbf16\tmessage": state not_compiled | compiled | rejected,
  // bf16 "metal" or "fallback" (a bf16 call fell back for lack of bfloat), message the
  // compiler's (empty unless rejected). Read by metal_marlin_torch._native.family_status().
  std::vector<std::string> describe() const {
    std::lock_guard<std::mutex> lock(mutex_);
    std::vector<std::string> rows;
    for (int f = 0; f < kNumKernelFamilies; ++f) {
      const Entry& e = entries_[f];
      const char* state = e.state == State::NotCompiled ? "not_compiled"
                        : e.state == State::Compiled    ? "compiled"
                                                        : "rejected";
      rows.push_back(std::string(kKernelFamilies[f].name) + "\t" + state + "\t" +
                     (e.bfloat_fallback ? "fallback" : "metal") + "\t" + e.message);
    }
    return rows;
  }

  // Back to "nothing compiled" (emulator tests of the lazy compile).
  void reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (Entry& e : entries_) e = Entry{};
  }

 private:
  struct Entry {
    State state = State::NotCompiled;
    bool bfloat_fallback = false;
    std::string message;
  };
  mutable std::mutex mutex_;
  Entry entries_[kNumKernelFamilies];
};

}  // namespace marlin
