// The emulator's stand-in for Apple's compiler and for the OS's bfloat support, behind the same
// FamilyTable (csrc/ops/families.h) the Metal glue uses: tests make a family "fail to compile"
// or turn bfloat off, and watch the ops fall back to their pure-torch kernels (marlin_emu::
// _reject_family, _set_bfloat, _families, _reset_families in register_ops.cpp).
#pragma once

#include <c10/util/Exception.h>

#include <mutex>
#include <string>

#include "emu/emu_launcher.h"
#include "ops/families.h"

namespace marlin {

struct EmuFamilies {
  std::mutex mutex;
  std::string rejections[kNumKernelFamilies];  // "" = the family compiles
  bool bfloat = true;
  FamilyTable table;
};

inline EmuFamilies& emu_families() {
  static EmuFamilies f;
  return f;
}

inline FamilyTable& emu_family_table() { return emu_families().table; }

// A non-empty `message` makes `family` fail to compile from its next first use (reset the table
// to make that happen again); "" lets it compile.
inline void emu_set_family_rejection(const std::string& family, const std::string& message) {
  EmuFamilies& f = emu_families();
  for (int i = 0; i < kNumKernelFamilies; ++i) {
    if (family == kKernelFamilies[i].name) {
      std::lock_guard<std::mutex> lock(f.mutex);
      f.rejections[i] = message;
      return;
    }
  }
  TORCH_CHECK(false, "metal_emu: unknown kernel family '", family, "'");
}

inline void emu_set_bfloat(bool available) {
  std::lock_guard<std::mutex> lock(emu_families().mutex);
  emu_families().bfloat = available;
}

// EmuLauncher::require_kernel: the FamilyTable with the stand-in compiler above.
inline void emu_require_kernel(const std::string& name) {
  EmuFamilies& f = emu_families();
  bool bfloat;
  {
    std::lock_guard<std::mutex> lock(f.mutex);
    bfloat = f.bfloat;
  }
  f.table.require(name, bfloat, "bf16 kernels are off (metal_emu test setting: no bfloat)", [&f](int family) {
    std::lock_guard<std::mutex> lock(f.mutex);
    return f.rejections[family];
  });
}

}  // namespace marlin
