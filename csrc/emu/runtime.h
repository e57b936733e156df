// MSL emulator runtime: the interface between emulated kernels (compiled against the shim
// headers in msl/) and the scheduler that runs them. Torch-free on purpose: kernel
// translation units include only this and the shim, so they compile in seconds.
//
// Model: a launch runs threadgroups one after another on each worker OS thread; the threads of
// one threadgroup are fibers (ucontext) on that OS thread. Threadgroup memory is a
// `static thread_local` array (the build rewrites `threadgroup T x[N];` declarations), so the
// fibers of a group share exactly what Metal shares. A fiber yields only at barriers and simd
// operations; the scheduler checks at each rendezvous that every live thread arrived at the
// same call site and reports divergence otherwise.
#pragma once

#include <cstddef>
#include <cstdint>

namespace metal_emu {

struct uint3_t {
  unsigned x, y, z;
};

// Builtin thread attributes of the running fiber (Metal's [[thread_position_in_grid]] etc).
enum class Builtin : int {
  thread_position_in_grid,
  thread_position_in_threadgroup,
  threadgroup_position_in_grid,
  threads_per_threadgroup,
  threadgroups_per_grid,
  threads_per_grid,
  thread_index_in_threadgroup,
  thread_index_in_simdgroup,
  simdgroup_index_in_threadgroup,
  threads_per_simdgroup,
  simdgroups_per_threadgroup,
};

// Raw argument block handed to a kernel trampoline.
struct BoundBuffer {
  void* ptr = nullptr;
  size_t size = 0;
  bool bound = false;
  const char* name = "";   // for reports
  size_t byte_offset = 0;  // where Metal would bind it: offset of ptr within its MTLBuffer
  bool writable = true;    // race check: track writers of its bytes
};
struct KernelArgs {
  const char* kernel = "";
  BoundBuffer buffers[32];
};

using Trampoline = void (*)(const KernelArgs&);

// Kernel registry: every emulated `kernel void` registers its trampoline at load time.
struct KernelRegistrar {
  KernelRegistrar(const char* name, Trampoline fn);
};
Trampoline find_kernel(const char* name);
// Writes up to `cap` names into `out`; returns the total count.
size_t kernel_names(const char** out, size_t cap);

// Called from kernel code (through the shim).
uint3_t builtin(Builtin which);
void threadgroup_barrier(const char* file, int line);
void simdgroup_barrier(const char* file, int line);
// A 32-lane rendezvous: stores `size` bytes of this lane's value, waits for every live lane
// of the simdgroup to reach the same call site, then returns the exchange view below.
struct SimdExchange {
  const unsigned char* slots;  // 32 slots of 16 bytes
  uint32_t active;             // bit i: lane i took part
  unsigned lane;
};
SimdExchange simd_exchange(const void* value, size_t size, const char* file, int line);
// Threadgroup memory declared in a kernel (`threadgroup T x[N];`, rewritten by the build into a
// call of this): returns the group's storage for declaration `id` of the kernel's translation
// unit. The first thread of the group to reach the declaration places it in the group's arena
// (16-byte aligned, with a red zone after it) and fills it with 0xFF bytes (NaN for every float
// type), so reading before writing shows up; also enforces the 32 KiB threadgroup memory limit.
void* threadgroup_alloc(size_t size, const char* name, int id);
[[noreturn]] void kernel_error(const char* what);

// Host side.
struct LaunchSpec {
  const char* kernel;
  uint3_t grid;        // threads (dispatch_threads) or threadgroups (dispatch_threadgroups)
  uint3_t tg_size;     // threads per threadgroup (not named `threadgroup`: the kernel
                       // translation rewrites that word away)
  bool dispatch_threads;
  KernelArgs args;
  // Byte ranges [guard_lo, guard_hi) that belong to buffer i's guard pages, for messages.
  struct Guard {
    const void* lo;
    const void* hi;
    const void* data;  // start of the buffer's bytes, for the offset in the message
    int index;
    const char* name;
    size_t size;
  } guards[64];
  int num_guards = 0;
  int max_workers = 0;  // 0: all cores
};
// Runs the launch; throws std::runtime_error naming the kernel on divergence, out-of-bounds
// or misaligned access, a threadgroup-memory race or device write/write conflict, a fault, or an
// exception inside the kernel.
void launch(const LaunchSpec& spec);

// Profiling (off by default): while on, every launch runs on one worker and appends one JSON
// object of memory-traffic and lane-activity counters (docs/METAL.md) to a list that
// profile_take() returns and clears.
void set_profiling(bool on);
size_t profile_count();
// Copies the JSON of record i into a std::string the caller owns (kept torch-free: the C
// string is valid until the next profile_take/clear call).
const char* profile_record(size_t i);
void profile_clear();

// Marks the accesses of a simdgroup-collective operation (simdgroup_load/store, which every
// emulated lane performs whole): the checks and counters attribute them to the simdgroup's first
// live lane and ignore the other lanes' copies.
void collective_begin();
void collective_end();
struct CollectiveAccess {
  CollectiveAccess() { collective_begin(); }
  ~CollectiveAccess() { collective_end(); }
  CollectiveAccess(const CollectiveAccess&) = delete;
  CollectiveAccess& operator=(const CollectiveAccess&) = delete;
};

// Memory-access hooks, called by the instrumentation clang inserts into kernel code
// (-fsanitize=thread's load/store callbacks, -fsanitize=alignment's handler; see runtime.cpp).
void on_access(const void* addr, size_t size, bool write, const void* pc);

}  // namespace metal_emu
