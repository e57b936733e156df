// MSL emulator runtime: fibers, barriers, simd rendezvous, guard-page fault reporting.
// See runtime.h for the model and docs/METAL.md for what it does and does not check.
#include "runtime.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace metal_emu {
namespace {

constexpr size_t kStackSize = 256 * 1024;      // per simulated thread (private arrays live here)
constexpr size_t kMaxThreadsPerGroup = 1024;    // Metal's limit
constexpr size_t kMaxThreadgroupMemory = 32768; // Metal's limit on every Apple GPU family
constexpr int kSimdWidth = 32;

std::map<std::string, Trampoline>& registry() {
  static std::map<std::string, Trampoline> r;
  return r;
}

enum class State { Runnable, Barrier, Simd, Done };

// Context switches: a fiber's first entry goes through its ucontext (makecontext); after
// that, switches use _setjmp/_longjmp, which unlike swapcontext do not save and restore the
// signal mask (two system calls per switch), several times faster for barrier-heavy kernels.
struct Fiber {
  ucontext_t ctx;
  jmp_buf jb;
  bool started = false;
  State state = State::Runnable;
  uint3_t tpos{};
  unsigned linear = 0, simd = 0, lane = 0;
  const char* file = "";
  int line = 0;
  int parity = 0;
};

struct Stacks {
  char* base = nullptr;
  size_t count = 0;
  ~Stacks() {
    if (base) munmap(base, count * (kStackSize + page()));
  }
  static size_t page() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }
  // Stack i, with a PROT_NONE page below it so an overflow faults instead of corrupting.
  char* get(size_t i, size_t need) {
    if (need > count) {
      if (base) munmap(base, count * (kStackSize + page()));
      // Grow in powers of two (worker threads are made per launch: map only what is needed).
      size_t n = 32;
      while (n < need) n *= 2;
      size_t stride = kStackSize + page();
      void* p = mmap(nullptr, n * stride, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) throw std::runtime_error("metal_emu: cannot map fiber stacks");
      base = static_cast<char*>(p);
      count = n;
      for (size_t k = 0; k < n; ++k) mprotect(base + k * stride, page(), PROT_NONE);
    }
    return base + i * (kStackSize + page()) + page();
  }
  bool contains_guard(const void* a) const {
    if (!base) return false;
    auto p = static_cast<const char*>(a);
    if (p < base || p >= base + count * (kStackSize + page())) return false;
    return static_cast<size_t>(p - base) % (kStackSize + page()) < page();
  }
};

// Everything a worker OS thread needs to run threadgroups.
struct Worker {
  const LaunchSpec* spec = nullptr;
  Trampoline tramp = nullptr;
  std::vector<Fiber> fibers;
  Stacks stacks;
  ucontext_t sched;
  jmp_buf sched_jb;
  Fiber* cur = nullptr;
  uint3_t group{}, group_size{};
  bool reverse = false;  // run the threads of a group last to first between rendezvous
  std::string error;
  std::vector<std::pair<void*, size_t>> tg_allocs;
  size_t tg_bytes = 0;
  uint32_t sg_mask[kMaxThreadsPerGroup / kSimdWidth][2];
  unsigned char sg_slots[kMaxThreadsPerGroup / kSimdWidth][2][kSimdWidth][16];
};

thread_local Worker* t_worker = nullptr;
thread_local sigjmp_buf* t_fault_jmp = nullptr;
thread_local void* volatile t_fault_addr = nullptr;
thread_local volatile int t_fault_sig = 0;

struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* si, void* uc) {
  if (t_fault_jmp != nullptr) {
    t_fault_addr = si->si_addr;
    t_fault_sig = sig;
    siglongjmp(*t_fault_jmp, 1);
  }
  // Not ours: hand over to whoever was installed before (faulthandler, default action).
  struct sigaction& old = sig == SIGSEGV ? g_old_segv : g_old_bus;
  if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction) {
    old.sa_sigaction(sig, si, uc);
  } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
    old.sa_handler(sig);
  } else {
    sigaction(sig, &old, nullptr);  // returning re-runs the faulting instruction
  }
}

// Installs on_fault for SIGSEGV/SIGBUS unless it is already installed; whatever handler was
// there (Python's faulthandler, the default action) is kept for faults that are not ours.
// Checked at every launch: something may have installed its own handler since the last one.
void install_handler() {
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  for (int sig : {SIGSEGV, SIGBUS}) {
    struct sigaction cur {};
    sigaction(sig, nullptr, &cur);
    if ((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_fault) continue;
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(sig, &sa, sig == SIGSEGV ? &g_old_segv : &g_old_bus);
  }
}

std::string coords(uint3_t v) {
  return "(" + std::to_string(v.x) + ", " + std::to_string(v.y) + ", " + std::to_string(v.z) + ")";
}

std::string site(const Fiber& f) { return std::string(f.file) + ":" + std::to_string(f.line); }

bool same_site(const Fiber& a, const Fiber& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

[[noreturn]] void fail(Worker& w, const std::string& what) {
  throw std::runtime_error("metal_emu: kernel '" + std::string(w.spec->kernel) + "', threadgroup " +
                           coords(w.group) + ": " + what);
}

void fiber_entry() {
  Worker& w = *t_worker;
  Fiber& f = *w.cur;
  try {
    w.tramp(w.spec->args);
  } catch (const std::exception& e) {
    if (w.error.empty()) w.error = "thread " + coords(f.tpos) + ": " + e.what();
  } catch (...) {
    if (w.error.empty()) w.error = "thread " + coords(f.tpos) + ": unknown exception";
  }
  f.state = State::Done;
  _longjmp(w.sched_jb, 1);  // never resumed
}

void yield(Worker& w, State s, const char* file, int line) {
  Fiber& f = *w.cur;
  f.state = s;
  f.file = file;
  f.line = line;
  if (_setjmp(f.jb) == 0) _longjmp(w.sched_jb, 1);
}

// Runs fiber f until it yields or finishes.
void resume(Worker& w, Fiber& f) {
  w.cur = &f;
  if (_setjmp(w.sched_jb) == 0) {
    if (!f.started) {
      f.started = true;
      swapcontext(&w.sched, &f.ctx);  // first entry; the fiber comes back by _longjmp
    } else {
      _longjmp(f.jb, 1);
    }
  }
}

void run_group(Worker& w, uint3_t group, uint3_t size) {
  const unsigned n = size.x * size.y * size.z;
  w.group = group;
  w.group_size = size;
  w.fibers.resize(n);
  w.tg_allocs.clear();
  w.tg_bytes = 0;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    f.state = State::Runnable;
    f.started = false;
    f.linear = i;
    f.tpos = {i % size.x, (i / size.x) % size.y, i / (size.x * size.y)};
    f.simd = i / kSimdWidth;
    f.lane = i % kSimdWidth;
    f.parity = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = w.stacks.get(i, n);
    f.ctx.uc_stack.ss_size = kStackSize;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const unsigned nsimd = (n + kSimdWidth - 1) / kSimdWidth;
  for (;;) {
    for (unsigned k = 0; k < n; ++k) {
      const unsigned i = w.reverse ? n - 1 - k : k;
      if (w.fibers[i].state != State::Runnable) continue;
      resume(w, w.fibers[i]);
      if (!w.error.empty()) fail(w, w.error);
    }
    // Nobody can run: release simdgroups whose live lanes all wait at one simd operation.
    bool released = false;
    unsigned live = 0;
    for (unsigned s = 0; s < nsimd; ++s) {
      const Fiber* first_simd = nullptr;
      const Fiber* first_barrier = nullptr;
      uint32_t mask = 0;
      for (unsigned i = s * kSimdWidth; i < std::min(n, (s + 1) * kSimdWidth); ++i) {
        const Fiber& f = w.fibers[i];
        if (f.state == State::Done) continue;
        ++live;
        if (f.state == State::Simd) {
          if (first_simd && !same_site(*first_simd, f))
            fail(w, "simd divergence in simdgroup " + std::to_string(s) + ": lanes wait at " +
                        site(*first_simd) + " and at " + site(f));
          if (!first_simd) first_simd = &f;
          mask |= 1u << f.lane;
        } else if (f.state == State::Barrier && !first_barrier) {
          first_barrier = &f;
        }
      }
      if (first_simd && first_barrier)
        fail(w, "divergence in simdgroup " + std::to_string(s) + ": some lanes wait at the simd "
                "operation at " + site(*first_simd) + ", others at the threadgroup_barrier at " +
                site(*first_barrier));
      if (first_simd) {
        w.sg_mask[s][first_simd->parity] = mask;
        for (unsigned i = s * kSimdWidth; i < std::min(n, (s + 1) * kSimdWidth); ++i)
          if (w.fibers[i].state == State::Simd) w.fibers[i].state = State::Runnable;
        released = true;
      }
    }
    if (released) continue;
    if (live == 0) return;
    // Every live thread waits at a threadgroup barrier: they must all be at the same one, and
    // no thread may have exited (Metal requires every thread of the group to reach it).
    const Fiber* first = nullptr;
    unsigned exited = 0;
    for (const Fiber& f : w.fibers) {
      if (f.state == State::Done) {
        ++exited;
        continue;
      }
      if (first && !same_site(*first, f))
        fail(w, "barrier divergence: thread " + coords(first->tpos) + " waits at " + site(*first) +
                    ", thread " + coords(f.tpos) + " at " + site(f));
      if (!first) first = &f;
    }
    if (exited)
      fail(w, "barrier divergence: " + std::to_string(exited) + " thread(s) exited while " +
                  std::to_string(live) + " wait at the threadgroup_barrier at " + site(*first));
    for (Fiber& f : w.fibers) f.state = State::Runnable;
  }
}

std::string describe_fault(const LaunchSpec& spec, Worker& w, void* addr, int sig) {
  auto a = static_cast<const char*>(addr);
  std::string where = "threadgroup " + coords(w.group);
  if (w.cur) where += ", thread " + coords(w.cur->tpos);
  for (int i = 0; i < spec.num_guards; ++i) {
    const auto& g = spec.guards[i];
    if (a >= static_cast<const char*>(g.lo) && a < static_cast<const char*>(g.hi)) {
      const long off = long(a - static_cast<const char*>(g.data));
      return "metal_emu: out-of-bounds access in kernel '" + std::string(spec.kernel) +
             "' (" + where + "): buffer(" + std::to_string(g.index) + ") '" + g.name +
             "' of " + std::to_string(g.size) + " bytes accessed at byte offset " +
             std::to_string(off);
    }
  }
  if (w.stacks.contains_guard(addr))
    return "metal_emu: stack overflow in kernel '" + std::string(spec.kernel) + "' (" + where +
           "): thread-private data exceeds " + std::to_string(kStackSize) + " bytes";
  char buf[64];
  std::snprintf(buf, sizeof buf, "%p", addr);
  return "metal_emu: invalid memory access (" + std::string(sig == SIGBUS ? "SIGBUS" : "SIGSEGV") +
         " at " + buf + ") in kernel '" + spec.kernel + "' (" + where + ")";
}

struct AltStack {
  stack_t old{};
  std::vector<char> mem;
  AltStack() : mem(1 << 16) {
    stack_t ss{};
    ss.ss_sp = mem.data();
    ss.ss_size = mem.size();
    sigaltstack(&ss, &old);
  }
  ~AltStack() { sigaltstack(&old, nullptr); }
};

thread_local std::unique_ptr<Worker> t_pool_worker;  // stacks reused per OS thread

// Runs groups [claimed from `next`] until done or an error anywhere; returns the error text.
std::string work(const LaunchSpec& spec, Trampoline tramp, std::atomic<uint64_t>& next,
                 std::atomic<bool>& stop) {
  if (!t_pool_worker) t_pool_worker = std::make_unique<Worker>();
  Worker& w = *t_pool_worker;
  w.spec = &spec;
  w.tramp = tramp;
  // METAL_MARLIN_EMU_ORDER=reverse: between two barriers Metal gives no order among a group's
  // threads; a kernel that misses a barrier may pass in one order and fail in the other.
  const char* order = std::getenv("METAL_MARLIN_EMU_ORDER");
  w.reverse = order != nullptr && std::strcmp(order, "reverse") == 0;
  w.error.clear();
  w.cur = nullptr;
  const uint3_t tg = spec.threadgroup;
  uint3_t groups = spec.grid;
  if (spec.dispatch_threads)
    groups = {(spec.grid.x + tg.x - 1) / tg.x, (spec.grid.y + tg.y - 1) / tg.y,
              (spec.grid.z + tg.z - 1) / tg.z};
  const uint64_t total = uint64_t(groups.x) * groups.y * groups.z;
  AltStack alt;
  sigjmp_buf jb;
  Worker* volatile wp = &w;
  t_worker = &w;
  if (sigsetjmp(jb, 1) != 0) {
    t_fault_jmp = nullptr;
    stop = true;
    return describe_fault(spec, *wp, t_fault_addr, t_fault_sig);
  }
  t_fault_jmp = &jb;
  std::string err;
  while (!stop) {
    uint64_t g = next.fetch_add(1);
    if (g >= total) break;
    uint3_t gp{unsigned(g % groups.x), unsigned((g / groups.x) % groups.y),
               unsigned(g / (uint64_t(groups.x) * groups.y))};
    uint3_t size = tg;
    if (spec.dispatch_threads) {  // non-uniform edge threadgroups are smaller
      size.x = std::min(tg.x, spec.grid.x - gp.x * tg.x);
      size.y = std::min(tg.y, spec.grid.y - gp.y * tg.y);
      size.z = std::min(tg.z, spec.grid.z - gp.z * tg.z);
    }
    try {
      run_group(w, gp, size);
    } catch (const std::exception& e) {
      err = e.what();
      stop = true;
      break;
    }
  }
  t_fault_jmp = nullptr;
  t_worker = nullptr;
  return err;
}

}  // namespace

KernelRegistrar::KernelRegistrar(const char* name, Trampoline fn) { registry()[name] = fn; }

Trampoline find_kernel(const char* name) {
  auto it = registry().find(name);
  return it == registry().end() ? nullptr : it->second;
}

size_t kernel_names(const char** out, size_t cap) {
  size_t i = 0;
  for (const auto& kv : registry()) {
    if (i < cap) out[i] = kv.first.c_str();
    ++i;
  }
  return i;
}

void kernel_error(const char* what) { throw std::runtime_error(what); }

uint3_t builtin(Builtin which) {
  Worker* w = t_worker;
  if (!w || !w->cur) kernel_error("metal_emu: builtin read outside a kernel");
  const Fiber& f = *w->cur;
  const LaunchSpec& s = *w->spec;
  const uint3_t tg = s.threadgroup;
  uint3_t groups = s.grid;
  if (s.dispatch_threads)
    groups = {(s.grid.x + tg.x - 1) / tg.x, (s.grid.y + tg.y - 1) / tg.y,
              (s.grid.z + tg.z - 1) / tg.z};
  const unsigned n = w->group_size.x * w->group_size.y * w->group_size.z;
  switch (which) {
    case Builtin::thread_position_in_grid:
      return {w->group.x * tg.x + f.tpos.x, w->group.y * tg.y + f.tpos.y,
              w->group.z * tg.z + f.tpos.z};
    case Builtin::thread_position_in_threadgroup: return f.tpos;
    case Builtin::threadgroup_position_in_grid: return w->group;
    case Builtin::threads_per_threadgroup: return w->group_size;
    case Builtin::threadgroups_per_grid: return groups;
    case Builtin::threads_per_grid:
      return s.dispatch_threads ? s.grid : uint3_t{groups.x * tg.x, groups.y * tg.y, groups.z * tg.z};
    case Builtin::thread_index_in_threadgroup: return {f.linear, 0, 0};
    case Builtin::thread_index_in_simdgroup: return {f.lane, 0, 0};
    case Builtin::simdgroup_index_in_threadgroup: return {f.simd, 0, 0};
    case Builtin::threads_per_simdgroup: return {unsigned(kSimdWidth), 0, 0};
    case Builtin::simdgroups_per_threadgroup: return {(n + kSimdWidth - 1) / kSimdWidth, 0, 0};
  }
  kernel_error("metal_emu: unknown builtin");
}

void threadgroup_barrier(const char* file, int line) {
  Worker* w = t_worker;
  if (!w || !w->cur) kernel_error("metal_emu: threadgroup_barrier outside a kernel");
  yield(*w, State::Barrier, file, line);
}

void simdgroup_barrier(const char* file, int line) {
  Worker* w = t_worker;
  if (!w || !w->cur) kernel_error("metal_emu: simdgroup_barrier outside a kernel");
  yield(*w, State::Simd, file, line);
  w->cur->parity ^= 1;
}

SimdExchange simd_exchange(const void* value, size_t size, const char* file, int line) {
  Worker* w = t_worker;
  if (!w || !w->cur) kernel_error("metal_emu: simd operation outside a kernel");
  if (size > 16) kernel_error("metal_emu: simd operation on a value wider than 16 bytes");
  Fiber& f = *w->cur;
  std::memcpy(w->sg_slots[f.simd][f.parity][f.lane], value, size);
  yield(*w, State::Simd, file, line);
  const int bank = f.parity;
  f.parity ^= 1;
  return {&w->sg_slots[f.simd][bank][0][0], w->sg_mask[f.simd][bank], f.lane};
}

void threadgroup_alloc(void* p, size_t size, const char* name) {
  Worker* w = t_worker;
  if (!w || !w->cur) kernel_error("metal_emu: threadgroup memory outside a kernel");
  for (const auto& a : w->tg_allocs)
    if (a.first == p) return;
  std::memset(p, 0xFF, size);  // poison: NaN in every float type, all-ones integers
  w->tg_allocs.emplace_back(p, size);
  w->tg_bytes += size;
  if (w->tg_bytes > kMaxThreadgroupMemory)
    kernel_error(("metal_emu: threadgroup memory exceeds 32 KiB (" + std::to_string(w->tg_bytes) +
                  " bytes, at '" + name + "')").c_str());
}

void launch(const LaunchSpec& spec) {
  Trampoline tramp = find_kernel(spec.kernel);
  if (!tramp) throw std::runtime_error("metal_emu: no kernel named '" + std::string(spec.kernel) + "'");
  const uint3_t tg = spec.threadgroup;
  const uint64_t tg_threads = uint64_t(tg.x) * tg.y * tg.z;
  if (tg_threads == 0 || tg_threads > kMaxThreadsPerGroup)
    throw std::runtime_error("metal_emu: kernel '" + std::string(spec.kernel) +
                             "': threads per threadgroup must be 1..1024, got " + coords(tg));
  if (uint64_t(spec.grid.x) * spec.grid.y * spec.grid.z == 0) return;
  install_handler();
  uint3_t groups = spec.grid;
  if (spec.dispatch_threads)
    groups = {(spec.grid.x + tg.x - 1) / tg.x, (spec.grid.y + tg.y - 1) / tg.y,
              (spec.grid.z + tg.z - 1) / tg.z};
  const uint64_t total = uint64_t(groups.x) * groups.y * groups.z;
  unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  if (const char* env = std::getenv("METAL_MARLIN_EMU_THREADS")) hw = std::max(1, std::atoi(env));
  unsigned nworkers = spec.max_workers > 0 ? unsigned(spec.max_workers) : hw;
  nworkers = unsigned(std::min<uint64_t>(nworkers, total));
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::vector<std::string> errors(nworkers);
  std::vector<std::thread> threads;
  for (unsigned i = 1; i < nworkers; ++i)
    threads.emplace_back([&, i] { errors[i] = work(spec, tramp, next, stop); });
  errors[0] = work(spec, tramp, next, stop);
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    if (!e.empty()) throw std::runtime_error(e);
}

}  // namespace metal_emu

#include "trampoline.h"

namespace metal_emu {
void bind_error(const KernelArgs& a, int index, const char* param, const char* what) {
  throw std::runtime_error("metal_emu: kernel '" + std::string(a.kernel) + "': buffer(" +
                           std::to_string(index) + ") for parameter '" + param + "' " + what);
}
}  // namespace metal_emu

// float -> bfloat16 with round-to-nearest-even, NaN kept quiet. Clang lowers `__bf16(float)`
// to this compiler-rt builtin on x86-64; libgcc 12 lacks it, and compiler-rt's builtins
// archive is not always installed with clang, so the emulator carries its own.
extern "C" __bf16 __truncsfbf2(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint16_t r;
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    r = uint16_t((u >> 16) | 0x40u);
  } else {
    r = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  __bf16 out;
  std::memcpy(&out, &r, 2);
  return out;
}
