// The Metal Launcher: encodes kernels on PyTorch's current MPS stream (macOS arm64).
#pragma once

#include "ops/launcher.h"

namespace marlin {

class MetalLauncher final : public RecordingLauncher {
 private:
  void check_tensor(const at::Tensor& t, const char* name) override;
  void run(Dim3 grid, Dim3 threadgroup, bool dispatch_threads) override;
};

}  // namespace marlin
