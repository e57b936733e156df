// Raw entry points of an emulator library, in the namespace given by -DMETAL_EMU_NS:
//   _launch: run one kernel on CPU tensors bound by index (tests of the engine itself);
//   _kernels: every kernel registered in the process (one runtime library is shared);
//   _profile / _profile_take: switch the runtime's counters on or off, and take the JSON
//   records of the launches profiled so far (metal_marlin_torch.emulator.profile()).
#include <torch/library.h>

#include <string>
#include <vector>

#include "emu/emu_launcher.h"
#include "emu/runtime.h"

#ifndef METAL_EMU_NS
#error "compile with -DMETAL_EMU_NS=<torch.ops namespace>"
#endif

namespace {

void raw_launch(const std::string& kernel, const std::vector<at::Tensor>& buffers,
                const std::vector<int64_t>& indices, const std::vector<int64_t>& grid,
                const std::vector<int64_t>& threadgroup, bool dispatch_threads,
                const std::vector<std::string>& access) {
  TORCH_CHECK(buffers.size() == indices.size() && buffers.size() == access.size(),
              "_launch: buffers, indices and access must have the same length");
  TORCH_CHECK(grid.size() == 3 && threadgroup.size() == 3, "_launch: grid and threadgroup need 3 values");
  marlin::EmuLauncher l(/*families=*/false);  // engine test kernels belong to no kernel family
  l.set_kernel(kernel);
  for (size_t i = 0; i < buffers.size(); ++i) {
    const auto a = access[i] == "r" ? marlin::Access::Read
                 : access[i] == "w" ? marlin::Access::Write
                                    : marlin::Access::ReadWrite;
    l.bind_tensor(int(indices[i]), buffers[i], a, ("arg" + std::to_string(indices[i])).c_str());
  }
  const marlin::Dim3 g{uint32_t(grid[0]), uint32_t(grid[1]), uint32_t(grid[2])};
  const marlin::Dim3 t{uint32_t(threadgroup[0]), uint32_t(threadgroup[1]), uint32_t(threadgroup[2])};
  if (dispatch_threads) l.dispatch_threads(g, t); else l.dispatch_threadgroups(g, t);
}

std::vector<std::string> kernels() {
  const size_t n = metal_emu::kernel_names(nullptr, 0);
  std::vector<const char*> names(n);
  metal_emu::kernel_names(names.data(), n);
  return {names.begin(), names.end()};
}

void profile(bool on) { metal_emu::set_profiling(on); }

std::vector<std::string> profile_take() {
  std::vector<std::string> out;
  for (size_t i = 0, n = metal_emu::profile_count(); i < n; ++i) out.emplace_back(metal_emu::profile_record(i));
  metal_emu::profile_clear();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(METAL_EMU_NS, m) {
  m.def("_launch(str kernel, Tensor(a!)[] buffers, int[] indices, int[] grid, int[] threadgroup, "
        "bool dispatch_threads, str[] access) -> ()");
  m.def("_kernels() -> str[]", &kernels);
  m.def("_profile(bool on) -> ()", &profile);
  m.def("_profile_take() -> str[]", &profile_take);
}

TORCH_LIBRARY_IMPL(METAL_EMU_NS, CPU, m) { m.impl("_launch", &raw_launch); }
