// TORCH_LIBRARY_IMPL(marlin, MPS): the Metal kernels for the ops whose schemas Python defines
// (metal_marlin_torch/ops/library.py), each through its host code in csrc/ops (the wrappers and
// the impl list are shared with the emulator: csrc/ops/registration.h). Plus
// marlin_metal::fake_quantize_variant to pick the vec or block kernel (benchmarks).
#include <torch/library.h>

#include "metal/metal_launcher.h"
#include "ops/registration.h"

TORCH_LIBRARY_IMPL(marlin, MPS, m) { marlin::impl_ops<marlin::MetalLauncher>(m); }

TORCH_LIBRARY_FRAGMENT(marlin_metal, m) {
  m.def("fake_quantize_variant(Tensor x, int bits, str variant) -> Tensor");
}

TORCH_LIBRARY_IMPL(marlin_metal, MPS, m) {
  m.impl("fake_quantize_variant", &marlin::OpsOn<marlin::MetalLauncher>::fake_quantize_variant);
}
