// The Metal Launcher: encodes kernels on PyTorch's current MPS stream (macOS arm64).
#pragma once

#include <string>
#include <vector>

#include "ops/launcher.h"

namespace marlin {

class MetalLauncher final : public Launcher {
 public:
  void set_kernel(const std::string& name) override;
  void bind_tensor(int index, const at::Tensor& t, Access access, const char* name) override;
  void bind_bytes(int index, const void* data, size_t size, const char* name) override;
  void dispatch_threads(Dim3 grid, Dim3 threadgroup) override;
  void dispatch_threadgroups(Dim3 groups, Dim3 threadgroup) override;

 private:
  struct Binding {
    int index;
    at::Tensor tensor;  // undefined for bytes
    std::vector<unsigned char> bytes;
  };
  void encode(Dim3 grid, Dim3 threadgroup, bool dispatch_threads);
  std::string kernel_;
  std::vector<Binding> bindings_;
};

}  // namespace marlin
