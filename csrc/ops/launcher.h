// The Launcher interface: the only thing op host code (csrc/ops/*.cpp) knows about how a
// kernel runs. csrc/metal/ implements it on PyTorch's MPS stream; csrc/emu/ implements it with
// the MSL emulator on CPU tensors. So one host code (checks, output allocation, kernel choice,
// grid) serves both, and the emulator tests exercise exactly what runs on a Mac.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "ops/families.h"  // KernelUnavailable, thrown by require_kernel

namespace marlin {

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};

// Threads in a threadgroup (what Metal's maxTotalThreadsPerThreadgroup limits): the glue checks
// this number, it does not compute it.
inline uint64_t thread_count(Dim3 d) { return uint64_t(d.x) * d.y * d.z; }

// How a kernel uses a bound tensor. Metal ignores it; the emulator poisons write-only buffers
// before the launch (so unwritten outputs show up as NaN) and checks that read-only ones are
// unchanged after it.
enum class Access { Read, Write, ReadWrite };

class Launcher {
 public:
  virtual ~Launcher() = default;

  // Starts a new command for the kernel function `name` (as instantiated in shaders/*.metal).
  // Throws KernelUnavailable (families.h) when the backend cannot run it; the op wrappers of
  // registration.h then run the pure-torch kernel.
  virtual void set_kernel(const std::string& name) = 0;
  // Binds a contiguous tensor's bytes, from its storage offset, at [[buffer(index)]].
  virtual void bind_tensor(int index, const at::Tensor& t, Access access, const char* name) = 0;
  // Binds a small argument block (setBytes) at [[buffer(index)]].
  virtual void bind_bytes(int index, const void* data, size_t size, const char* name) = 0;
  // dispatchThreads: `grid` counts threads; edge threadgroups may be partial.
  virtual void dispatch_threads(Dim3 grid, Dim3 threadgroup) = 0;
  // dispatchThreadgroups: `groups` counts threadgroups; every threadgroup is full.
  virtual void dispatch_threadgroups(Dim3 groups, Dim3 threadgroup) = 0;

  template <class T>
  void bind_value(int index, const T& value, const char* name) {
    static_assert(std::is_trivially_copyable_v<T>, "bind_value needs a POD argument struct");
    bind_bytes(index, &value, sizeof(T), name);
  }
};

// What both backends do with the calls above: remember the kernel and its bindings, check each
// tensor as the backend needs (check_tensor), and hand them all to run() at dispatch. Metal
// encodes them on the MPS stream; the emulator copies them into guarded buffers.
class RecordingLauncher : public Launcher {
 public:
  void set_kernel(const std::string& name) final {
    require_kernel(name);
    kernel_ = name;
    bindings_.clear();
  }
  void bind_tensor(int index, const at::Tensor& t, Access access, const char* name) final {
    check_index(index);
    check_tensor(t, name);
    // Metal's setBuffer:offset: and the emulator's copy both take bytes; storage_offset() counts
    // elements. Computed here, once, for both backends (tests/metal/test_glue.py binds views whose
    // element and byte offsets differ).
    const size_t byte_offset = size_t(t.storage_offset()) * t.element_size();
    bindings_.push_back({index, t, byte_offset, size_t(t.numel()) * t.element_size(), {}, access, name});
  }
  void bind_bytes(int index, const void* data, size_t size, const char* name) final {
    check_index(index);
    auto p = static_cast<const unsigned char*>(data);
    bindings_.push_back(
        {index, at::Tensor(), 0, size, std::vector<unsigned char>(p, p + size), Access::Read, name});
  }
  void dispatch_threads(Dim3 grid, Dim3 threadgroup) final { run(grid, threadgroup, true); }
  void dispatch_threadgroups(Dim3 groups, Dim3 threadgroup) final { run(groups, threadgroup, false); }

 protected:
  struct Binding {
    int index;           // [[buffer(index)]]
    at::Tensor tensor;   // undefined for bytes
    size_t byte_offset;  // where the tensor's data starts in its storage, in bytes (0 for bytes)
    size_t byte_size;    // bytes the kernel may access from there (numel * element size, or bytes.size())
    std::vector<unsigned char> bytes;
    Access access;
    std::string name;
  };
  // Throws KernelUnavailable when the backend cannot run kernel `name`; by default it can.
  virtual void require_kernel(const std::string& /*name*/) {}
  // Rejects a [[buffer(index)]] the backend cannot bind (TORCH_CHECK); by default any index.
  virtual void check_index(int /*index*/) {}
  // Rejects a tensor the backend cannot bind (wrong device, not contiguous) with TORCH_CHECK.
  virtual void check_tensor(const at::Tensor& t, const char* name) = 0;
  // Runs kernel_ with bindings_ (then clears them); `dispatch_threads` says whether `grid`
  // counts threads (dispatchThreads) or threadgroups (dispatchThreadgroups).
  virtual void run(Dim3 grid, Dim3 threadgroup, bool dispatch_threads) = 0;

  std::string kernel_;
  std::vector<Binding> bindings_;
};

}  // namespace marlin
