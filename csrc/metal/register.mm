// TORCH_LIBRARY_IMPL(marlin, MPS): the Metal kernels for the ops whose schemas Python defines
// (metal_marlin_torch/ops/library.py), each through its host code in csrc/ops (the wrappers and
// the impl list are shared with the emulator: csrc/ops/registration.h, which also falls back to
// the pure-torch kernels per kernel family). Plus, under marlin_metal::, fake_quantize_variant
// (pick the vec or block kernel: benchmarks), _families and _msl_version (backend_info(),
// `marlin doctor`). Loaded as a plain shared library (metal_marlin_torch/build.py).
#include <torch/library.h>

#include "metal/metal_launcher.h"
#include "ops/registration.h"

TORCH_LIBRARY_IMPL(marlin, MPS, m) { marlin::impl_ops<marlin::MetalLauncher>(m); }

TORCH_LIBRARY_FRAGMENT(marlin_metal, m) {
  m.def("fake_quantize_variant(Tensor x, int bits, str variant) -> Tensor");
  m.def("_families() -> str[]", &marlin::metal_family_status);
  m.def("_msl_version() -> str", &marlin::metal_msl_version);
}

TORCH_LIBRARY_IMPL(marlin_metal, MPS, m) {
  m.impl("fake_quantize_variant", &marlin::OpsOn<marlin::MetalLauncher>::fake_quantize_variant);
}
