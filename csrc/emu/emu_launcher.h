// The emulator's Launcher: binds CPU tensors into guarded copies and runs the kernel in the
// MSL emulator (runtime.h).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "ops/launcher.h"

namespace marlin {

class EmuLauncher final : public Launcher {
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
    Access access;
    std::string name;
  };
  void run(Dim3 grid, Dim3 threadgroup, bool dispatch_threads);
  std::string kernel_;
  std::vector<Binding> bindings_;
};

}  // namespace marlin
