// MSL emulator runtime: fibers, barriers, simd rendezvous, guard-page fault reporting.
// See runtime.h for the model and docs/METAL.md for what it does and does not check.
#include "runtime.h"

#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <unordered_map>
#include <cstdlib>
#include <csetjmp>
#include <cstdio>
#include <cstring>
#include <functional>
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
  int last_phase = -1;                                // profiling: last phase it touched memory in
  int last_weight_phase = -1;                         // ... and read the 'weight' buffer in
  bool collective = false;                            // inside simdgroup_load/store
  bool collective_leader = false;                     // ... and the simdgroup's first live lane
  const void* collective_site = nullptr;              // its call site (site_token)
  std::unordered_map<const void*, uint32_t> occurrence;  // profiling: executions per access site
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
  bool contains(const void* a) const {
    auto p = static_cast<const char*>(a);
    return base && p >= base && p < base + count * (kStackSize + page());
  }
  bool contains_guard(const void* a) const {
    if (!base) return false;
    auto p = static_cast<const char*>(a);
    if (p < base || p >= base + count * (kStackSize + page())) return false;
    return static_cast<size_t>(p - base) % (kStackSize + page()) < page();
  }
};

enum class Order { Forward, Reverse, Skew, SkewReverse };

// Shadow state of one threadgroup byte for race detection: the last writer and up to two
// readers from different simdgroups in the current barrier interval (`epoch`, unique per
// interval and worker, so stale entries never match and nothing is cleared between groups).
struct TgShadow {
  uint64_t w_epoch = 0, r_epoch = 0;
  uint16_t w_thread = 0, r_thread = 0, r2_thread = 0;
  bool r2 = false;
  const void* w_pc = nullptr;
  const void* r_pc = nullptr;
  const void* r2_pc = nullptr;
};

struct TgAlloc {
  char* p;
  size_t size;
  const char* name;
  size_t offset;  // from the start of the group's threadgroup memory (declaration order)
  TgShadow* shadow;
  int id;
};

// Threadgroup arena: the 32 KiB Metal allows plus a red zone after each array.
constexpr size_t kRedZone = 64;
constexpr size_t kArenaSize = kMaxThreadgroupMemory + 64 * kRedZone;

// One bound device buffer as the access hook sees it: the exact bytes and the pages around
// them (the slack before the guard pages, where an access is out of bounds too).
struct DevRegion {
  const char* lo;    // page floor of data
  const char* hi;    // page ceiling of data + size
  const char* data;
  size_t size;
  size_t byte_offset;
  int index;
  const char* name;
  std::atomic<uint64_t>* writer;   // race check: last writer of each byte (see on_device)
  std::atomic<const void*>* writer_pc;
};

// Per-launch counters (profiling). An "instruction" is one dynamic memory access site of a
// simdgroup: the same code address, executed for the n-th time by each lane.
struct InstrKey {
  const void* pc;
  uint32_t simd, occurrence;
  bool operator==(const InstrKey& o) const {
    return pc == o.pc && simd == o.simd && occurrence == o.occurrence;
  }
};
struct InstrKeyHash {
  size_t operator()(const InstrKey& k) const {
    return std::hash<const void*>()(k.pc) ^ (size_t(k.simd) << 32) ^ (size_t(k.occurrence) * 0x9E3779B97F4A7C15ull);
  }
};
struct Instr {
  bool threadgroup = false;
  std::vector<std::pair<uint64_t, uint32_t>> lanes;  // (address, bytes); tg: offset in tg memory
};
struct PhaseStat {
  std::string site;
  uint64_t thread_slots = 0, threads_active = 0, device_bytes = 0, tg_accesses = 0;
  uint64_t threads_weight = 0, weight_bytes = 0;  // threads reading the 'weight' buffer, its bytes
};
struct BufferStat {
  std::string name;
  uint64_t size = 0, read = 0, written = 0;
  std::vector<bool> touched;  // bytes read at least once
};
struct LaunchStats {
  uint64_t dev_instr = 0, lines64 = 0, lines128 = 0, ideal64 = 0, ideal128 = 0;
  uint64_t tg_instr = 0, bank_conflicts = 0, tg_wavefronts = 0;
  uint64_t simd_ops = 0, simd_lanes = 0;
  std::map<int, BufferStat> buffers;
  std::vector<PhaseStat> phases;
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
  Order order = Order::Forward;
  bool racecheck = true;
  bool profiling = false;
  std::string error;
  std::vector<TgAlloc> tg_allocs;
  std::unordered_map<int, std::vector<TgShadow>> tg_shadows;  // per declaration id
  alignas(64) unsigned char arena[kArenaSize];
  size_t arena_used = 0;
  size_t tg_bytes = 0;
  uint64_t epoch = 0;      // barrier interval, unique per worker (race check)
  uint32_t barriers = 0;   // barriers passed by the current group
  uint64_t group_linear = 0;
  const std::vector<DevRegion>* regions = nullptr;
  LaunchStats* stats = nullptr;  // profiling
  std::unordered_map<InstrKey, Instr, InstrKeyHash> instrs;
  std::vector<PhaseStat> group_phases;
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

void finish_group_profile(Worker& w);

// Releases simdgroup s when all its live lanes wait at one simd operation; fails on divergence
// (lanes at different simd sites, or some at a simd operation and others at a barrier).
// Returns true when it released the lanes.
bool release_simdgroup(Worker& w, unsigned s, unsigned n) {
  const Fiber* first_simd = nullptr;
  const Fiber* first_barrier = nullptr;
  uint32_t mask = 0;
  for (unsigned i = s * kSimdWidth; i < std::min(n, (s + 1) * kSimdWidth); ++i) {
    const Fiber& f = w.fibers[i];
    if (f.state == State::Done) continue;
    if (f.state == State::Simd) {
      if (first_simd && !same_site(*first_simd, f))
        fail(w, "simd divergence in simdgroup " + std::to_string(s) + ": lanes wait at " +
                    site(*first_simd) + " and at " + site(f));
      if (!first_simd) first_simd = &f;
      mask |= 1u << f.lane;
    } else if (f.state == State::Barrier && !first_barrier) {
      first_barrier = &f;
    } else if (f.state == State::Runnable) {
      return false;  // not everyone has arrived yet
    }
  }
  if (first_simd && first_barrier)
    fail(w, "divergence in simdgroup " + std::to_string(s) + ": some lanes wait at the simd "
            "operation at " + site(*first_simd) + ", others at the threadgroup_barrier at " +
            site(*first_barrier));
  if (!first_simd) return false;
  w.sg_mask[s][first_simd->parity] = mask;
  if (w.stats) {
    w.stats->simd_ops += 1;
    w.stats->simd_lanes += unsigned(__builtin_popcount(mask));
  }
  for (unsigned i = s * kSimdWidth; i < std::min(n, (s + 1) * kSimdWidth); ++i)
    if (w.fibers[i].state == State::Simd) w.fibers[i].state = State::Runnable;
  return true;
}

// Runs the runnable fibers of [lo, hi) once each, in the worker's order.
void run_fibers(Worker& w, unsigned lo, unsigned hi) {
  const bool rev = w.order == Order::Reverse || w.order == Order::SkewReverse;
  for (unsigned k = lo; k < hi; ++k) {
    const unsigned i = rev ? hi - 1 - (k - lo) : k;
    if (w.fibers[i].state != State::Runnable) continue;
    resume(w, w.fibers[i]);
    if (!w.error.empty()) fail(w, w.error);
  }
}

bool simdgroup_busy(const Worker& w, unsigned s, unsigned n) {
  for (unsigned i = s * kSimdWidth; i < std::min(n, (s + 1) * kSimdWidth); ++i)
    if (w.fibers[i].state == State::Runnable || w.fibers[i].state == State::Simd) return true;
  return false;
}

void begin_phase(Worker& w, const std::string& where) {
  ++w.epoch;
  if (!w.stats) return;
  PhaseStat p;
  p.site = where;
  p.thread_slots = w.fibers.size();
  w.group_phases.push_back(std::move(p));
}

// Schedules (METAL_MARLIN_EMU_ORDER). Metal promises no order among a group's threads between
// barriers, and simdgroups need not run in lockstep with each other:
//   forward / reverse: every thread runs to its next rendezvous (simd operation or barrier),
//     first to last or last to first; simd operations then act as group-wide meeting points.
//   skew / skew-reverse: one simdgroup at a time runs alone up to its next threadgroup barrier
//     (its own simd operations included), first simdgroup to last or last to first; so a
//     simdgroup that reads what another writes without a barrier between sees the old bytes.
void run_group(Worker& w, uint3_t group, uint3_t size) {
  const unsigned n = size.x * size.y * size.z;
  w.group = group;
  w.group_size = size;
  w.fibers.resize(n);
  w.tg_allocs.clear();
  w.tg_bytes = 0;
  w.arena_used = 0;
  w.barriers = 0;
  w.instrs.clear();
  w.group_phases.clear();
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = w.fibers[i];
    f.state = State::Runnable;
    f.started = false;
    f.linear = i;
    f.tpos = {i % size.x, (i / size.x) % size.y, i / (size.x * size.y)};
    f.simd = i / kSimdWidth;
    f.lane = i % kSimdWidth;
    f.parity = 0;
    f.last_phase = -1;
    f.last_weight_phase = -1;
    f.occurrence.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = w.stacks.get(i, n);
    f.ctx.uc_stack.ss_size = kStackSize;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  begin_phase(w, "kernel entry");
  const unsigned nsimd = (n + kSimdWidth - 1) / kSimdWidth;
  const bool skew = w.order == Order::Skew || w.order == Order::SkewReverse;
  const bool rev = w.order == Order::SkewReverse;
  for (;;) {
    if (skew) {
      // The first (last) simdgroup that can still move runs alone until all its live lanes
      // wait at a threadgroup barrier or have exited.
      bool ran = false;
      for (unsigned k = 0; k < nsimd && !ran; ++k) {
        const unsigned s = rev ? nsimd - 1 - k : k;
        if (!simdgroup_busy(w, s, n)) continue;
        ran = true;
        while (simdgroup_busy(w, s, n)) {
          // Each pass runs every lane to a rendezvous; then either the simd operation they all
          // wait at is released, or they all wait at a barrier (the loop ends).
          run_fibers(w, s * kSimdWidth, std::min(n, (s + 1) * kSimdWidth));
          release_simdgroup(w, s, n);
        }
      }
      if (ran) continue;
    } else {
      run_fibers(w, 0, n);
      // Nobody can run: release simdgroups whose live lanes all wait at one simd operation.
      bool released = false;
      for (unsigned s = 0; s < nsimd; ++s) released |= release_simdgroup(w, s, n);
      if (released) continue;
    }
    // Every live thread waits at a threadgroup barrier: they must all be at the same one, and
    // no thread may have exited (Metal requires every thread of the group to reach it).
    const Fiber* first = nullptr;
    unsigned exited = 0, live = 0;
    for (const Fiber& f : w.fibers) {
      if (f.state == State::Done) {
        ++exited;
        continue;
      }
      ++live;
      if (f.state != State::Barrier)
        fail(w, "emulator scheduler: thread " + coords(f.tpos) + " neither done nor at a barrier");
      if (first && !same_site(*first, f))
        fail(w, "barrier divergence: thread " + coords(first->tpos) + " waits at " + site(*first) +
                    ", thread " + coords(f.tpos) + " at " + site(f));
      if (!first) first = &f;
    }
    if (live == 0) break;
    if (exited)
      fail(w, "barrier divergence: " + std::to_string(exited) + " thread(s) exited while " +
                  std::to_string(live) + " wait at the threadgroup_barrier at " + site(*first));
    ++w.barriers;
    begin_phase(w, "threadgroup_barrier at " + site(*first));
    for (Fiber& f : w.fibers) f.state = State::Runnable;
  }
  if (w.stats) finish_group_profile(w);
}


// ---------------------------------------------------------------------------------------------
// Memory-access checks and counters. Kernel translation units are compiled with
// -fsanitize=thread, whose instrumentation calls __tsan_readN/__tsan_writeN/__tsan_memcpy... for
// every load and store that may touch shared memory (locals that never escape are skipped), and
// with -fsanitize=alignment, which calls __ubsan_handle_type_mismatch_v1 when a pointer is not
// aligned for the type it is dereferenced as. Neither sanitizer's runtime is linked: the
// callbacks below are ours. They sort each access into private memory (fiber stacks: ignored),
// threadgroup memory (race check, bounds, bank counters) or a bound device buffer (exact
// bounds, write/write check, traffic counters).

std::string thread_name(const Worker& w, unsigned linear) {
  const uint3_t s = w.group_size;
  const uint3_t t{linear % s.x, (linear / s.x) % s.y, linear / (s.x * s.y)};
  return "thread " + coords(t) + " (simdgroup " + std::to_string(linear / kSimdWidth) + ")";
}

std::string short_path(std::string p) {
  for (const char* root : {"/shaders/", "/csrc/", "/tests/"}) {
    const size_t k = p.rfind(root);
    if (k != std::string::npos) return p.substr(k + 1);
  }
  return p;
}

// Call sites of collective operations stand in for code addresses in the shadow records and
// counters: a token is the address of an interned "file:line" string (never a code address).
std::mutex g_site_mutex;
std::map<std::pair<const char*, int>, std::unique_ptr<std::string>> g_sites;
std::map<const void*, const std::string*> g_site_tokens;

const void* site_token(const char* file, int line) {
  thread_local std::map<std::pair<const char*, int>, const void*> local;
  auto it = local.find({file, line});
  if (it != local.end()) return it->second;
  std::lock_guard<std::mutex> lock(g_site_mutex);
  auto& slot = g_sites[{file, line}];
  if (!slot) {
    slot = std::make_unique<std::string>(short_path(file) + ":" + std::to_string(line));
    g_site_tokens[slot.get()] = slot.get();
  }
  local[{file, line}] = slot.get();
  return slot.get();
}

// "file:line" of a code address in a kernel library (its line tables: -gline-tables-only),
// through llvm-symbolizer (or addr2line); only called to word a report.
std::string describe_pc(const void* pc) {
  static std::mutex m;
  static std::map<const void*, std::string> cache;
  {
    std::lock_guard<std::mutex> lock(g_site_mutex);
    auto t = g_site_tokens.find(pc);
    if (t != g_site_tokens.end()) return *t->second;
  }
  std::lock_guard<std::mutex> lock(m);
  auto it = cache.find(pc);
  if (it != cache.end()) return it->second;
  Dl_info info{};
  char off[32];
  std::string out;
  if (dladdr(pc, &info) && info.dli_fname) {
    std::snprintf(off, sizeof off, "0x%lx",
                  static_cast<unsigned long>(reinterpret_cast<uintptr_t>(pc) -
                                             reinterpret_cast<uintptr_t>(info.dli_fbase) - 1));
    for (const char* tool : {"llvm-symbolizer-19", "llvm-symbolizer", "addr2line"}) {
      const std::string cmd = std::string(tool) + (std::strcmp(tool, "addr2line") == 0 ? " -i -e '" : " --obj='") +
                              info.dli_fname + "' " + off + " 2>/dev/null";
      FILE* p = popen(cmd.c_str(), "r");
      if (!p) continue;
      char line[4096];
      while (std::fgets(line, sizeof line, p)) {
        std::string l(line);
        while (!l.empty() && (l.back() == '\n' || l.back() == '\r')) l.pop_back();
        // The first "file:line[:col]" line is the innermost (inlined) frame: the access itself.
        const size_t colon = l.find(':');
        if (colon != std::string::npos && colon > 0 && l[0] != '?' && l.find('/') != std::string::npos) {
          std::string fl = short_path(l);
          const size_t c2 = fl.find(':', fl.find(':') + 1);
          out = c2 == std::string::npos ? fl : fl.substr(0, c2);  // drop the column
          break;
        }
      }
      pclose(p);
      if (!out.empty()) break;
    }
    if (out.empty()) out = std::string(info.dli_fname) + "+" + off;
  } else {
    std::snprintf(off, sizeof off, "%p", pc);
    out = off;
  }
  cache.emplace(pc, out);
  return out;
}

// Ends the running fiber with an error; the scheduler reports it (naming kernel and group).
[[noreturn]] void abort_fiber(Worker& w, const std::string& what) {
  if (w.error.empty()) w.error = what;
  w.cur->state = State::Done;
  _longjmp(w.sched_jb, 1);
}

std::string tg_where(const TgAlloc& t, size_t off) {
  return "threadgroup array '" + std::string(t.name) + "' (" + std::to_string(t.size) +
         " bytes) at byte offset " + std::to_string(off);
}

void tg_race(Worker& w, const TgAlloc& t, size_t off, const char* kind, unsigned other,
             const void* other_pc, const char* other_did, const void* pc, const char* me_does) {
  abort_fiber(w, std::string("threadgroup memory race (") + kind + ") on " + tg_where(t, off) + ": " +
                     thread_name(w, other) + " " + other_did + " it at " + describe_pc(other_pc) + ", " +
                     thread_name(w, w.cur->linear) + " " + me_does + " it at " + describe_pc(pc) +
                     ", with no threadgroup_barrier between them");
}

// What an access is to, for the per-phase thread counts: the argument block (which every thread
// reads, so it does not make a thread "active"), the packed weights, or other data.
enum class Touch { Data, Args, Weight };

Touch touch_of(const char* buffer_name) {
  if (std::strcmp(buffer_name, "args") == 0) return Touch::Args;
  if (std::strcmp(buffer_name, "weight") == 0) return Touch::Weight;
  return Touch::Data;
}

void count_access(Worker& w, const void* pc, uint64_t where, size_t size, bool tg, Touch touch = Touch::Data) {
  Fiber& f = *w.cur;
  const uint32_t occ = f.occurrence[pc]++;
  Instr& in = w.instrs[InstrKey{pc, f.simd, occ}];
  in.threadgroup = tg;
  in.lanes.emplace_back(where, uint32_t(size));
  const int p = int(w.group_phases.size()) - 1;
  PhaseStat& ph = w.group_phases[size_t(p)];
  if (touch != Touch::Args && f.last_phase != p) {
    f.last_phase = p;
    ++ph.threads_active;
  }
  if (touch == Touch::Weight) {
    ph.weight_bytes += size;
    if (f.last_weight_phase != p) {
      f.last_weight_phase = p;
      ++ph.threads_weight;
    }
  }
  if (tg) ++ph.tg_accesses; else ph.device_bytes += size;
}

void on_threadgroup(Worker& w, TgAlloc& t, const char* a, size_t size, bool write, const void* pc) {
  const size_t off = size_t(a - t.p);
  if (off + size > t.size)
    abort_fiber(w, "out-of-bounds threadgroup access: " + std::to_string(size) + " bytes of " +
                       tg_where(t, off) + " at " + describe_pc(pc));
  if (w.racecheck) {
    const uint16_t me = uint16_t(w.cur->linear);
    const unsigned simd = w.cur->simd;
    for (size_t i = 0; i < size; ++i) {
      TgShadow& sh = t.shadow[off + i];
      if (sh.w_epoch == w.epoch && sh.w_thread / kSimdWidth != simd)
        tg_race(w, t, off + i, write ? "write/write" : "write/read", sh.w_thread, sh.w_pc, "wrote", pc,
                write ? "writes" : "reads");
      if (write) {
        if (sh.r_epoch == w.epoch && sh.r_thread / kSimdWidth != simd)
          tg_race(w, t, off + i, "read/write", sh.r_thread, sh.r_pc, "read", pc, "writes");
        if (sh.r_epoch == w.epoch && sh.r2 && sh.r2_thread / kSimdWidth != simd)
          tg_race(w, t, off + i, "read/write", sh.r2_thread, sh.r2_pc, "read", pc, "writes");
        sh.w_epoch = w.epoch;
        sh.w_thread = me;
        sh.w_pc = pc;
      } else if (sh.r_epoch != w.epoch) {
        sh.r_epoch = w.epoch;
        sh.r_thread = me;
        sh.r_pc = pc;
        sh.r2 = false;
      } else if (!sh.r2 && sh.r_thread / kSimdWidth != simd) {
        sh.r2 = true;  // a second reader simdgroup: a later write by either one is a race
        sh.r2_thread = me;
        sh.r2_pc = pc;
      }
    }
  }
  if (w.stats) count_access(w, pc, t.offset + off, size, true);
}

void on_device(Worker& w, const DevRegion& r, const char* a, size_t size, bool write, const void* pc) {
  if (a < r.data || a + size > r.data + r.size) {
    // Inside the buffer's pages but outside its bytes (the guard pages catch the rest).
    const long off = long(a - r.data);
    abort_fiber(w, "out-of-bounds access in kernel '" + std::string(w.spec->kernel) + "' by " +
                       thread_name(w, w.cur->linear) + ": buffer(" + std::to_string(r.index) + ") '" + r.name + "' of " +
                       std::to_string(r.size) + " bytes accessed at byte offset " + std::to_string(off) +
                       " (" + std::to_string(size) + " bytes, " + (write ? "write" : "read") + ") at " +
                       describe_pc(pc));
  }
  const size_t off = size_t(a - r.data);
  if (write && w.racecheck && r.writer) {
    // Writer id: group (+1, so 0 means none), thread in group, barriers the group passed.
    const uint64_t me = ((w.group_linear + 1) << 32) | (uint64_t(w.cur->linear) << 16) | (w.barriers & 0xFFFF);
    for (size_t i = 0; i < size; ++i) {
      const uint64_t old = r.writer[off + i].exchange(me, std::memory_order_relaxed);
      const void* old_pc = r.writer_pc[off + i].exchange(pc, std::memory_order_relaxed);
      if (old == 0 || old == me) continue;
      const bool same_group = (old >> 32) == (me >> 32);
      const unsigned old_thread = unsigned((old >> 16) & 0xFFFF);
      if (same_group && ((old & 0xFFFF) != (me & 0xFFFF) || old_thread == w.cur->linear)) continue;
      std::string other;
      if (same_group) {
        other = thread_name(w, old_thread) + " of this threadgroup";
      } else {
        other = "a thread of threadgroup #" + std::to_string((old >> 32) - 1) + " (linear index)";
      }
      abort_fiber(w, "device memory write/write conflict on buffer(" + std::to_string(r.index) + ") '" +
                         r.name + "' at byte offset " + std::to_string(off + i) + ": " + other +
                         " wrote it at " + describe_pc(old_pc) + ", " + thread_name(w, w.cur->linear) +
                         " writes it at " + describe_pc(pc) + " in the same launch");
    }
  }
  if (w.stats) {
    BufferStat& b = w.stats->buffers[r.index];
    if (write) {
      b.written += size;
    } else {
      b.read += size;
      if (!b.touched.empty())
        for (size_t i = 0; i < size; ++i) b.touched[off + i] = true;
    }
    count_access(w, pc, reinterpret_cast<uint64_t>(a) - reinterpret_cast<uint64_t>(r.data) + r.byte_offset +
                            (uint64_t(r.index) << 48), size, false, touch_of(r.name));
  }
}

// Sorted, merged byte ranges of one instruction's lanes.
std::vector<std::pair<uint64_t, uint64_t>> merged(const Instr& in) {
  std::vector<std::pair<uint64_t, uint64_t>> r;
  for (auto [a, n] : in.lanes) r.emplace_back(a, a + n);
  std::sort(r.begin(), r.end());
  std::vector<std::pair<uint64_t, uint64_t>> out;
  for (auto& x : r) {
    if (!out.empty() && x.first <= out.back().second) out.back().second = std::max(out.back().second, x.second);
    else out.push_back(x);
  }
  return out;
}

uint64_t distinct_lines(const std::vector<std::pair<uint64_t, uint64_t>>& ranges, unsigned shift) {
  uint64_t n = 0, last = ~0ull;
  for (auto [lo, hi] : ranges)
    for (uint64_t l = lo >> shift; l <= (hi - 1) >> shift; ++l)
      if (l != last) { ++n; last = l; }
  return n;
}

void finish_group_profile(Worker& w) {
  LaunchStats& s = *w.stats;
  for (auto& [key, in] : w.instrs) {
    const auto ranges = merged(in);
    uint64_t bytes = 0;
    for (auto [lo, hi] : ranges) bytes += hi - lo;
    if (!in.threadgroup) {
      // Addresses carry the buffer index in bits 48+, so different buffers never share a line.
      ++s.dev_instr;
      s.lines64 += distinct_lines(ranges, 6);
      s.lines128 += distinct_lines(ranges, 7);
      s.ideal64 += (bytes + 63) / 64;
      s.ideal128 += (bytes + 127) / 128;
    } else {
      // 32 banks of 4 bytes: lanes touching different words of one bank serialize.
      ++s.tg_instr;
      uint32_t depth[32] = {};
      uint64_t words = 0;
      for (auto [lo, hi] : ranges)
        for (uint64_t wd = lo >> 2; wd <= (hi - 1) >> 2; ++wd) {
          ++depth[wd % 32];
          ++words;
        }
      const uint64_t deepest = *std::max_element(depth, depth + 32);
      const uint64_t ideal = (words + 31) / 32;
      s.tg_wavefronts += deepest;
      if (deepest > ideal) s.bank_conflicts += deepest - ideal;
    }
  }
  w.instrs.clear();
  for (size_t i = 0; i < w.group_phases.size(); ++i) {
    if (s.phases.size() <= i) s.phases.push_back(PhaseStat{w.group_phases[i].site});
    PhaseStat& d = s.phases[i];
    const PhaseStat& g = w.group_phases[i];
    d.thread_slots += g.thread_slots;
    d.threads_active += g.threads_active;
    d.threads_weight += g.threads_weight;
    d.weight_bytes += g.weight_bytes;
    d.device_bytes += g.device_bytes;
    d.tg_accesses += g.tg_accesses;
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

// What every worker of one launch shares: the schedule, the check switches, the bound device
// buffers and their writer shadows, and (profiling) the counters.
struct LaunchContext {
  Order order = Order::Forward;
  bool racecheck = true;
  std::vector<DevRegion> regions;
  std::vector<std::unique_ptr<std::atomic<uint64_t>[]>> writer_shadow;
  std::vector<std::unique_ptr<std::atomic<const void*>[]>> writer_pc;
  LaunchStats* stats = nullptr;
};

// Runs groups [claimed from `next`] until done or an error anywhere; returns the error text.
std::string work(const LaunchSpec& spec, Trampoline tramp, const LaunchContext& ctx,
                 std::atomic<uint64_t>& next, std::atomic<bool>& stop) {
  if (!t_pool_worker) t_pool_worker = std::make_unique<Worker>();
  Worker& w = *t_pool_worker;
  w.spec = &spec;
  w.tramp = tramp;
  w.order = ctx.order;
  w.racecheck = ctx.racecheck;
  w.regions = &ctx.regions;
  w.stats = ctx.stats;
  w.error.clear();
  w.cur = nullptr;
  const uint3_t tg = spec.tg_size;
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
    w.group_linear = g;
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
  w.regions = nullptr;
  w.stats = nullptr;
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
  const uint3_t tg = s.tg_size;
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

void* threadgroup_alloc(size_t size, const char* name, int id) {
  Worker* w = t_worker;
  if (!w || !w->cur) kernel_error("metal_emu: threadgroup memory outside a kernel");
  for (const auto& a : w->tg_allocs)
    if (a.id == id) return a.p;
  if (w->tg_bytes + size > kMaxThreadgroupMemory || w->arena_used + size + kRedZone > kArenaSize)
    kernel_error(("metal_emu: threadgroup memory exceeds 32 KiB (" + std::to_string(w->tg_bytes + size) +
                  " bytes, at '" + name + "')").c_str());
  char* p = reinterpret_cast<char*>(w->arena) + w->arena_used;
  std::memset(p, 0xFF, size);  // poison: NaN in every float type, all-ones integers
  std::vector<TgShadow>& sh = w->tg_shadows[id];
  if (sh.size() < size) sh.assign(size, TgShadow{});  // stale epochs never match: no reset
  w->tg_allocs.push_back({p, size, name, w->tg_bytes, sh.data(), id});
  w->tg_bytes += size;
  w->arena_used += (size + kRedZone + 15) / 16 * 16;
  return p;
}

void collective_begin(const char* file, int line) {
  Worker* w = t_worker;
  if (!w || !w->cur) return;
  w->cur->collective_site = site_token(file, line);
  // The lanes that met at the rendezvous just before the operation (simdgroup_barrier flipped
  // the parity after it): the lowest of them leads.
  Fiber& f = *w->cur;
  const uint32_t mask = w->sg_mask[f.simd][f.parity ^ 1];
  f.collective = true;
  f.collective_leader = mask != 0 && unsigned(__builtin_ctz(mask)) == f.lane;
}
void collective_end() {
  if (t_worker && t_worker->cur) t_worker->cur->collective = false;
}

void on_access(const void* addr, size_t size, bool write, const void* pc) {
  Worker* w = t_worker;
  if (!w || !w->cur || size == 0) return;  // not kernel code
  auto a = static_cast<const char*>(addr);
  if (w->stacks.contains(a)) return;  // thread-private memory
  // Only the leading lane's copy of a collective access counts, at the operation's call site.
  if (w->cur->collective) {
    if (!w->cur->collective_leader) return;
    pc = w->cur->collective_site;
  }
  const auto arena = reinterpret_cast<const char*>(w->arena);
  if (a >= arena && a < arena + kArenaSize) {
    // The array the access starts in or, in a red zone, the array before it (past its end).
    TgAlloc* t = nullptr;
    for (TgAlloc& x : w->tg_allocs)
      if (x.p <= a && (!t || x.p > t->p)) t = &x;
    if (!t) abort_fiber(*w, "threadgroup access before any threadgroup array at " + describe_pc(pc));
    return on_threadgroup(*w, *t, a, size, write, pc);
  }
  if (w->regions)
    for (const DevRegion& r : *w->regions)
      if (a >= r.lo && a < r.hi) return on_device(*w, r, a, size, write, pc);
  // Anything else is the kernel's own constant tables (program-scope `constant` arrays).
}

namespace {
std::mutex g_profile_mutex;
bool g_profiling = false;
std::vector<std::string> g_profiles;

Order parse_order() {
  const char* env = std::getenv("METAL_MARLIN_EMU_ORDER");
  if (env == nullptr || *env == 0 || std::strcmp(env, "forward") == 0) return Order::Forward;
  if (std::strcmp(env, "reverse") == 0) return Order::Reverse;
  if (std::strcmp(env, "skew") == 0) return Order::Skew;
  if (std::strcmp(env, "skew-reverse") == 0) return Order::SkewReverse;
  throw std::runtime_error(std::string("metal_emu: METAL_MARLIN_EMU_ORDER must be forward, reverse, skew or "
                                       "skew-reverse, got '") + env + "'");
}

bool parse_racecheck() {
  const char* env = std::getenv("METAL_MARLIN_EMU_RACECHECK");
  if (env == nullptr || *env == 0 || std::strcmp(env, "1") == 0) return true;
  if (std::strcmp(env, "0") == 0) return false;
  throw std::runtime_error(std::string("metal_emu: METAL_MARLIN_EMU_RACECHECK must be 0 or 1, got '") + env + "'");
}

std::string json_str(const std::string& s) {
  std::string o = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') { o += '\\'; o += c; }
    else if (static_cast<unsigned char>(c) < 0x20) { char b[8]; std::snprintf(b, sizeof b, "\\u%04x", c); o += b; }
    else o += c;
  }
  return o + "\"";
}

std::string profile_json(const LaunchSpec& spec, const LaunchStats& s) {
  auto u = [](uint64_t v) { return std::to_string(v); };
  std::string j = "{\"kernel\": " + json_str(spec.kernel) + ", \"grid\": [" + u(spec.grid.x) + ", " +
                  u(spec.grid.y) + ", " + u(spec.grid.z) + "], \"threadgroup\": [" + u(spec.tg_size.x) + ", " +
                  u(spec.tg_size.y) + ", " + u(spec.tg_size.z) + "], \"dispatch_threads\": " +
                  (spec.dispatch_threads ? "true" : "false") + ", \"buffers\": {";
  bool first = true;
  for (const auto& [idx, b] : s.buffers) {
    uint64_t uniq = 0;
    for (bool t : b.touched) uniq += t;
    j += std::string(first ? "" : ", ") + "\"" + std::to_string(idx) + "\": {\"name\": " + json_str(b.name) +
         ", \"size\": " + u(b.size) + ", \"read\": " + u(b.read) + ", \"written\": " + u(b.written) +
         ", \"unique_read\": " + u(uniq) + "}";
    first = false;
  }
  j += "}, \"device_instructions\": " + u(s.dev_instr) + ", \"lines64\": " + u(s.lines64) +
       ", \"lines128\": " + u(s.lines128) + ", \"ideal_lines64\": " + u(s.ideal64) +
       ", \"ideal_lines128\": " + u(s.ideal128) + ", \"tg_instructions\": " + u(s.tg_instr) +
       ", \"tg_wavefronts\": " + u(s.tg_wavefronts) + ", \"bank_conflicts\": " + u(s.bank_conflicts) +
       ", \"simd_ops\": " + u(s.simd_ops) + ", \"simd_lanes\": " + u(s.simd_lanes) + ", \"phases\": [";
  for (size_t i = 0; i < s.phases.size(); ++i) {
    const PhaseStat& p = s.phases[i];
    j += std::string(i ? ", " : "") + "{\"index\": " + u(i) + ", \"site\": " + json_str(p.site) +
         ", \"thread_slots\": " + u(p.thread_slots) + ", \"threads_active\": " + u(p.threads_active) +
         ", \"device_bytes\": " + u(p.device_bytes) + ", \"tg_accesses\": " + u(p.tg_accesses) +
         ", \"threads_weight\": " + u(p.threads_weight) + ", \"weight_bytes\": " + u(p.weight_bytes) + "}";
  }
  return j + "]}";
}
}  // namespace

void set_profiling(bool on) {
  std::lock_guard<std::mutex> lock(g_profile_mutex);
  g_profiling = on;
}
size_t profile_count() {
  std::lock_guard<std::mutex> lock(g_profile_mutex);
  return g_profiles.size();
}
const char* profile_record(size_t i) {
  std::lock_guard<std::mutex> lock(g_profile_mutex);
  return i < g_profiles.size() ? g_profiles[i].c_str() : "";
}
void profile_clear() {
  std::lock_guard<std::mutex> lock(g_profile_mutex);
  g_profiles.clear();
}

void launch(const LaunchSpec& spec) {
  Trampoline tramp = find_kernel(spec.kernel);
  if (!tramp) throw std::runtime_error("metal_emu: no kernel named '" + std::string(spec.kernel) + "'");
  const uint3_t tg = spec.tg_size;
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
  LaunchContext ctx;
  ctx.order = parse_order();
  ctx.racecheck = parse_racecheck();
  bool profiling;
  {
    std::lock_guard<std::mutex> lock(g_profile_mutex);
    profiling = g_profiling;
  }
  LaunchStats stats;
  if (profiling) ctx.stats = &stats;
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  for (int i = 0; i < 32; ++i) {
    const BoundBuffer& b = spec.args.buffers[i];
    if (!b.bound || b.ptr == nullptr) continue;
    const auto data = reinterpret_cast<uintptr_t>(b.ptr);
    DevRegion r{reinterpret_cast<const char*>(data / page * page),
                reinterpret_cast<const char*>((data + b.size + page - 1) / page * page),
                static_cast<const char*>(b.ptr), b.size, b.byte_offset, i, b.name, nullptr, nullptr};
    if (ctx.racecheck && b.writable && b.size) {
      ctx.writer_shadow.emplace_back(new std::atomic<uint64_t>[b.size]());
      ctx.writer_pc.emplace_back(new std::atomic<const void*>[b.size]());
      r.writer = ctx.writer_shadow.back().get();
      r.writer_pc = ctx.writer_pc.back().get();
    }
    if (profiling) {
      BufferStat& bs = stats.buffers[i];
      bs.name = b.name;
      bs.size = b.size;
      if (b.size <= (size_t(1) << 30)) bs.touched.assign(b.size, false);
    }
    ctx.regions.push_back(r);
  }
  unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  if (const char* env = std::getenv("METAL_MARLIN_EMU_THREADS")) hw = std::max(1, std::atoi(env));
  unsigned nworkers = spec.max_workers > 0 ? unsigned(spec.max_workers) : hw;
  if (profiling) nworkers = 1;  // counters are merged per group on one worker
  nworkers = unsigned(std::min<uint64_t>(nworkers, total));
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::vector<std::string> errors(nworkers);
  std::vector<std::thread> threads;
  for (unsigned i = 1; i < nworkers; ++i)
    threads.emplace_back([&, i] { errors[i] = work(spec, tramp, ctx, next, stop); });
  errors[0] = work(spec, tramp, ctx, next, stop);
  for (auto& t : threads) t.join();
  for (const auto& e : errors)
    if (!e.empty()) throw std::runtime_error(e);
  if (profiling) {
    std::string j = profile_json(spec, stats);
    std::lock_guard<std::mutex> lock(g_profile_mutex);
    g_profiles.push_back(std::move(j));
  }
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

// ---------------------------------------------------------------------------------------------
// The instrumentation's entry points (see "Memory-access checks" above).

namespace {
struct UbsanSourceLocation {
  const char* file;
  uint32_t line, column;
};
struct UbsanTypeDescriptor {
  uint16_t kind, info;
  char name[1];
};
struct UbsanTypeMismatch {
  UbsanSourceLocation loc;
  const UbsanTypeDescriptor* type;
  unsigned char log_alignment;
  unsigned char check_kind;
};

void misaligned(UbsanTypeMismatch* d, uintptr_t ptr) {
  using namespace metal_emu;
  static const char* const kinds[] = {"load of", "store to", "reference binding to", "member access within",
                                      "member call on", "constructor call on", "downcast of", "downcast of",
                                      "upcast of", "cast to virtual base of", "_Nonnull binding to",
                                      "dynamic operation on"};
  const unsigned align = 1u << d->log_alignment;
  // clang words it "'const float4' (aka 'const metal_emu::vec<float, 4>')": keep the MSL name
  std::string type = d->type->name;
  if (!type.empty() && type.front() == '\'') type = type.substr(1, type.find('\'', 1) - 1);
  // A vector read or written through a pointer shows up as a reference binding (the copy's
  // source or the assignment's `this`): say "access", which is what it is.
  const char* kind = d->check_kind == 2 || d->check_kind == 4 ? "access to"
                     : d->check_kind < 12                     ? kinds[d->check_kind]
                                                              : "access to";
  std::string what = std::string("misaligned access: ") + kind + " type '" + type + "' needs " +
                     std::to_string(align) + "-byte alignment";
  Worker* w = t_worker;
  const auto a = reinterpret_cast<const char*>(ptr);
  if (w && w->cur) {
    std::string where;
    for (const TgAlloc& t : w->tg_allocs)
      if (a >= t.p && a < t.p + t.size) where = tg_where(t, size_t(a - t.p));
    if (w->regions)
      for (const DevRegion& r : *w->regions)
        if (a >= r.lo && a < r.hi)
          where = "buffer(" + std::to_string(r.index) + ") '" + r.name + "' at byte offset " +
                  std::to_string(long(a - r.data)) + " (bound at byte offset " + std::to_string(r.byte_offset) +
                  " of its Metal buffer)";
    if (where.empty()) where = "thread-private memory";
    abort_fiber(*w, what + ", got " + where + ", at " + short_path(d->loc.file) + ":" + std::to_string(d->loc.line));
  }
  kernel_error(("metal_emu: " + what).c_str());
}
}  // namespace

extern "C" {
#define EMU_ACCESS(N)                                                                                   \
  __attribute__((visibility("default"))) void __tsan_read##N(void* p) {                                \
    metal_emu::on_access(p, N, false, __builtin_return_address(0));                                     \
  }                                                                                                     \
  __attribute__((visibility("default"))) void __tsan_write##N(void* p) {                               \
    metal_emu::on_access(p, N, true, __builtin_return_address(0));                                      \
  }                                                                                                     \
  __attribute__((visibility("default"))) void __tsan_unaligned_read##N(void* p) {                      \
    metal_emu::on_access(p, N, false, __builtin_return_address(0));                                     \
  }                                                                                                     \
  __attribute__((visibility("default"))) void __tsan_unaligned_write##N(void* p) {                     \
    metal_emu::on_access(p, N, true, __builtin_return_address(0));                                      \
  }                                                                                                     \
  __attribute__((visibility("default"))) void __tsan_volatile_read##N(void* p) {                       \
    metal_emu::on_access(p, N, false, __builtin_return_address(0));                                     \
  }                                                                                                     \
  __attribute__((visibility("default"))) void __tsan_volatile_write##N(void* p) {                      \
    metal_emu::on_access(p, N, true, __builtin_return_address(0));                                      \
  }
EMU_ACCESS(1)
EMU_ACCESS(2)
EMU_ACCESS(4)
EMU_ACCESS(8)
EMU_ACCESS(16)
#undef EMU_ACCESS

__attribute__((visibility("default"))) void __tsan_read_range(void* p, size_t n) {
  metal_emu::on_access(p, n, false, __builtin_return_address(0));
}
__attribute__((visibility("default"))) void __tsan_write_range(void* p, size_t n) {
  metal_emu::on_access(p, n, true, __builtin_return_address(0));
}
__attribute__((visibility("default"))) void* __tsan_memcpy(void* d, const void* s, size_t n) {
  metal_emu::on_access(s, n, false, __builtin_return_address(0));
  metal_emu::on_access(d, n, true, __builtin_return_address(0));
  return std::memcpy(d, s, n);
}
__attribute__((visibility("default"))) void* __tsan_memmove(void* d, const void* s, size_t n) {
  metal_emu::on_access(s, n, false, __builtin_return_address(0));
  metal_emu::on_access(d, n, true, __builtin_return_address(0));
  return std::memmove(d, s, n);
}
__attribute__((visibility("default"))) void* __tsan_memset(void* d, int c, size_t n) {
  metal_emu::on_access(d, n, true, __builtin_return_address(0));
  return std::memset(d, c, n);
}
// Module constructor and function hooks the instrumentation may emit: nothing to do.
__attribute__((visibility("default"))) void __tsan_init() {}
__attribute__((visibility("default"))) void __tsan_func_entry(void*) {}
__attribute__((visibility("default"))) void __tsan_func_exit() {}
__attribute__((visibility("default"))) void __tsan_vptr_update(void*, void*) {}
__attribute__((visibility("default"))) void __tsan_vptr_read(void*) {}

__attribute__((visibility("default"))) void __ubsan_handle_type_mismatch_v1(UbsanTypeMismatch* d, uintptr_t p) {
  misaligned(d, p);
}
__attribute__((visibility("default"))) void __ubsan_handle_type_mismatch_v1_abort(UbsanTypeMismatch* d,
                                                                                   uintptr_t p) {
  misaligned(d, p);
}
}  // extern "C"
