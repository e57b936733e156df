// EmuLauncher: each bound buffer is copied into an exact-size region that ends where a
// PROT_NONE page begins (with another guard page before it), so any device access past the
// end faults and the runtime reports kernel, buffer and offset; results are copied back.
#include "emu/emu_launcher.h"

#include <sys/mman.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <cstring>
#include <memory>
#include <stdexcept>

#include "emu/emu_families.h"
#include "emu/runtime.h"

namespace marlin {
namespace {

// Metal's alignment rules apply to the address a kernel sees, which is the MTLBuffer's start
// (page-aligned) plus the binding's byte offset. So the copy is placed at an address congruent
// to that offset modulo 16 (the largest alignment an MSL type needs), as close to the guard
// page as that allows: accesses past the end fault on the guard page or, in the up to 15 bytes
// before it, are caught by the runtime's exact bounds check of every instrumented access.
class GuardedRegion {
 public:
  GuardedRegion(size_t size, size_t byte_offset) : size_(size) {
    page_ = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t slack = (16 - (size + byte_offset) % 16) % 16;
    const size_t body = (size + slack + page_ - 1) / page_ * page_;
    total_ = body + 2 * page_;
    void* p = mmap(nullptr, total_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "metal_emu: cannot map a guarded buffer of ", size, " bytes");
    base_ = static_cast<char*>(p);
    mprotect(base_, page_, PROT_NONE);
    mprotect(base_ + page_ + body, page_, PROT_NONE);
    data_ = base_ + page_ + body - size - slack;
  }
  ~GuardedRegion() { munmap(base_, total_); }
  GuardedRegion(const GuardedRegion&) = delete;
  GuardedRegion& operator=(const GuardedRegion&) = delete;
  char* data() const { return data_; }
  size_t size() const { return size_; }
  const char* lo_guard() const { return base_; }
  const char* hi_guard() const { return base_ + total_ - page_; }
  size_t page() const { return page_; }

 private:
  char* base_ = nullptr;
  char* data_ = nullptr;
  size_t size_ = 0, total_ = 0, page_ = 0;
};

// Start of a tensor's storage: bindings locate their bytes from here by their byte_offset.
char* storage_bytes(const at::Tensor& t) { return static_cast<char*>(t.storage().mutable_data()); }

}  // namespace

void EmuLauncher::require_kernel(const std::string& name) {
  if (families_) emu_require_kernel(name);
}

void EmuLauncher::check_index(int index) {
  TORCH_CHECK(index >= 0 && index < 31, "metal_emu: buffer index must be 0..30, got ", index);
}

void EmuLauncher::check_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "metal_emu: buffer '", name, "' must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "metal_emu: buffer '", name, "' must be contiguous");
}

void EmuLauncher::run(Dim3 grid, Dim3 threadgroup, bool dispatch_threads) {
  TORCH_CHECK(!kernel_.empty(), "metal_emu: dispatch without set_kernel");
  metal_emu::LaunchSpec spec{};
  spec.kernel = kernel_.c_str();
  spec.args.kernel = spec.kernel;
  spec.grid = {grid.x, grid.y, grid.z};
  spec.tg_size = {threadgroup.x, threadgroup.y, threadgroup.z};
  spec.dispatch_threads = dispatch_threads;
  std::vector<std::unique_ptr<GuardedRegion>> regions;
  for (const Binding& b : bindings_) {
    // Offset and size come from the shared host code (launcher.h), as Metal's setBuffer:offset:
    // gets them: a byte/element mix-up there copies the wrong bytes here and fails the tests.
    const size_t size = b.byte_size;
    const size_t byte_offset = b.tensor.defined() ? b.byte_offset : 0;
    auto r = std::make_unique<GuardedRegion>(size, byte_offset);
    const void* src = b.tensor.defined() ? static_cast<const void*>(storage_bytes(b.tensor) + b.byte_offset)
                                         : static_cast<const void*>(b.bytes.data());
    if (b.access == Access::Write) {
      std::memset(r->data(), 0xFF, size);  // NaN in every float type: unwritten outputs show
    } else if (size) {
      std::memcpy(r->data(), src, size);
    }
    TORCH_CHECK(!spec.args.buffers[b.index].bound, "metal_emu: kernel '", kernel_, "': buffer(",
                b.index, ") bound twice");
    spec.args.buffers[b.index] = {r->data(), size, true, b.name.c_str(), byte_offset,
                                  b.tensor.defined() && b.access != Access::Read};
    spec.guards[spec.num_guards++] = {r->lo_guard(), r->lo_guard() + r->page(), r->data(),
                                      b.index, b.name.c_str(), size};
    spec.guards[spec.num_guards++] = {r->hi_guard(), r->hi_guard() + r->page(), r->data(),
                                      b.index, b.name.c_str(), size};
    regions.push_back(std::move(r));
  }
  try {
    metal_emu::launch(spec);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
  for (size_t i = 0; i < bindings_.size(); ++i) {
    const Binding& b = bindings_[i];
    const GuardedRegion& r = *regions[i];
    if (!b.tensor.defined() || r.size() == 0) continue;
    char* dst = storage_bytes(b.tensor) + b.byte_offset;
    if (b.access == Access::Read) {
      TORCH_CHECK(std::memcmp(r.data(), dst, r.size()) == 0, "metal_emu: kernel '", kernel_,
                  "' wrote to read-only buffer(", b.index, ") '", b.name, "'");
    } else {
      std::memcpy(dst, r.data(), r.size());
    }
  }
  bindings_.clear();
}

}  // namespace marlin
