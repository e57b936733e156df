// The Launcher interface: the only thing op host code (csrc/ops/*.cpp) knows about how a
// kernel runs. csrc/metal/ implements it on PyTorch's MPS stream; csrc/emu/ implements it with
// the MSL emulator on CPU tensors. So one host code (checks, output allocation, kernel choice,
// grid) serves both, and the emulator tests exercise exactly what runs on a Mac.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <type_traits>

namespace marlin {

struct Dim3 {
  uint32_t x = 1, y = 1, z = 1;
};

// How a kernel uses a bound tensor. Metal ignores it; the emulator poisons write-only buffers
// before the launch (so unwritten outputs show up as NaN) and checks that read-only ones are
// unchanged after it.
enum class Access { Read, Write, ReadWrite };

class Launcher {
 public:
  virtual ~Launcher() = default;

  // Starts a new command for the kernel function `name` (as instantiated in shaders/*.metal).
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

}  // namespace marlin
