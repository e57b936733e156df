// The Metal Launcher: encodes kernels on PyTorch's current MPS stream (macOS arm64), one Metal
// library per kernel family compiled on first use (csrc/ops/families.h).
#pragma once

#include <string>
#include <vector>

#include "ops/launcher.h"

namespace marlin {

class MetalLauncher final : public RecordingLauncher {
 private:
  void require_kernel(const std::string& name) override;
  void check_tensor(const at::Tensor& t, const char* name) override;
  void run(Dim3 grid, Dim3 threadgroup, bool dispatch_threads) override;
};

// FamilyTable::describe() of the Metal families (marlin_metal::_families).
std::vector<std::string> metal_family_status();
// The MSL version chosen for this macOS, and whether bfloat kernels exist ("3.2 bfloat").
std::string metal_msl_version();

}  // namespace marlin
