// The emulator's Launcher: binds CPU tensors into guarded copies and runs the kernel in the
// MSL emulator (runtime.h).
#pragma once

#include <string>

#include "ops/launcher.h"

namespace marlin {

class EmuLauncher final : public RecordingLauncher {
 public:
  // `families`: check each kernel against the kernel families (csrc/ops/families.h), as the Metal
  // glue does; false for the raw _launch entry point, whose test kernels belong to no family.
  explicit EmuLauncher(bool families = true) : families_(families) {}

 private:
  bool families_;
  void require_kernel(const std::string& name) override;
  void check_index(int index) override;
  void check_tensor(const at::Tensor& t, const char* name) override;
  void run(Dim3 grid, Dim3 threadgroup, bool dispatch_threads) override;
};

}  // namespace marlin
