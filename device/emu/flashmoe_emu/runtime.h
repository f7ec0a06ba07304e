/**
 * @file runtime.h
 * @brief CPU emulation of the CUDA execution model, enough to run flashmoe's device code.
 *
 * The project's unchanged CUDA C++ (CuTe included) is compiled by a host C++ compiler
 * with this header in front of it (device/emu/kernels/*.cpp include it, then a
 * kernels/*.cu entry file). Execution model:
 *
 *  - every block is one OS thread, and every block of every launched grid runs at
 *    once, so a persistent kernel's inter-block spin waits make progress exactly as
 *    with co-resident CTAs;
 *  - every CUDA thread is a fiber on its block's OS thread; fibers switch at
 *    __syncthreads, warp collectives, __nanosleep and emulated tensor-core
 *    instructions (and, with Options::preempt in checked builds, at shared and global
 *    memory accesses), in round-robin order or in seeded random warp bursts (so warps
 *    drift apart and a missing barrier shows);
 *  - `__shared__` is `thread_local`: one copy per block, like shared memory;
 *  - warp collectives complete in the last lane to arrive, which computes every
 *    lane's result at once;
 *  - atomics are sequentially consistent builtins on the same addresses; fences are
 *    full fences. The host's memory model is stronger than the GPU's, so in unchecked
 *    builds a missing fence that only matters on weakly ordered hardware goes unseen.
 *    Checked builds (FMOE_EMU_CHECKED, memory.h) see every memory access of the device
 *    code and model the GPU's: per-block store buffers, device vs block vs system
 *    scope, the L1 rule and happens-before race detection.
 *
 * Faults of the emulated program (a barrier that can never complete, divergent warp
 * collectives, misaligned tensor-core addresses) do not kill the process: the block
 * stops, every other block stops at its next switch, and the launch returns the
 * report through fmoe_emu::error_text(), naming where each thread waited.
 */
#pragma once

// CUDA's host-safe headers give dim3, the vector types and __align__; they also define
// __device__ & co. as attributes g++ ignores, which are redefined below.
#include <cuda_runtime.h>
#include <vector_functions.h>

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __constant__
#undef __forceinline__
#undef __launch_bounds__
#undef __noinline__
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
// One copy per block: a block-scope `__shared__ T v;` becomes a block-scope (hence
// static) thread_local, `extern __shared__ T a[];` an extern thread_local the runner
// defines once.
#define __shared__ thread_local

#define FMOE_HOST_EMU 1
#ifndef FMOE_EMU_CHECKED
#define FMOE_EMU_CHECKED 0
#endif

// Checked builds (memory.h) instrument the device code; the runtime's own functions are
// left out: they are not the program under test, and they would be slower.
#if FMOE_EMU_CHECKED
#define FMOE_EMU_RT __attribute__((no_sanitize_thread))
#else
#define FMOE_EMU_RT
#endif

#if FMOE_EMU_SM90 || (defined(FMOE_MAINLOOP) && FMOE_MAINLOOP == 90)
// Hopper builds (sm90.h): CuTe takes shared addresses for wgmma descriptors through
// cvta, which maps a pointer into the block's registered dynamic shared memory.
namespace fmoe_emu {
inline uint32_t shared_address(const void* p);
}
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1
inline size_t __cvta_generic_to_shared(const void* p) { return fmoe_emu::shared_address(p); }
#endif

namespace fmoe_emu {

// ------------------------------------------------------------------ options and errors
/// Knobs of one launch (set from Python through emu_configure in entry.h).
struct Options {
  uint64_t seed = 0;            ///< 0: round-robin fibers; else seeded random warp bursts
  bool lazy_cp_async = false;   ///< cp.async lands at wait_group (true) or at issue
  bool poison_smem = true;      ///< dynamic shared memory starts as 0xFF bytes (NaN)
  int chaos = 0;                ///< >0: 1 in `chaos` atomics/fences stalls the block
  int chaos_us = 2000;          ///< longest such stall
  double watchdog_s = 600.0;    ///< a launch running longer is stopped and reported
  size_t stack_bytes = 256 * 1024;
  bool weak = false;            ///< weak global memory and rule 3 (memory.h; checked builds)
  bool races = false;           ///< shared- and global-memory race detection (checked builds)
  int preempt = 0;              ///< >0: about 1 in `preempt` memory accesses switches threads
};
inline Options& options() {
  static Options o;
  return o;
}

/// Set when a launch must stop (an emulator fault or the watchdog).
inline std::atomic<bool>& aborting() {
  static std::atomic<bool> a{false};
  return a;
}
inline std::mutex& error_mutex() {
  static std::mutex m;
  return m;
}
/// The first emulator fault of the last launch ("" if none).
inline std::string& error_text() {
  static std::string s;
  return s;
}
FMOE_EMU_RT inline void record_error(const std::string& what) {
  std::lock_guard<std::mutex> lock(error_mutex());
  if (error_text().empty()) error_text() = what;
  aborting().store(true);
}

/// A source location captured at the call site of a synchronisation point.
struct Site {
  const char* file = "?";
  int line = 0;
  const char* what = "";
};
inline std::string describe(const Site& s) {
  const char* base = std::strrchr(s.file, '/');
  return std::string(s.what) + " at " + (base ? base + 1 : s.file) + ":" + std::to_string(s.line);
}
#define FMOE_EMU_SITE(what) \
  ::fmoe_emu::Site { __builtin_FILE(), __builtin_LINE(), what }

// ------------------------------------------------------------------ context switching
// x86-64: a switch saves the callee-saved registers and the FP control words on the
// old stack and returns on the new one: no system call (ucontext's swapcontext makes
// one per switch to save the signal mask, which dominated run time). Elsewhere
// ucontext is used.
#if defined(__x86_64__)
extern "C" void fmoe_emu_switch(void** save_sp, void* new_sp);
extern "C" void fmoe_emu_fiber_start();
asm(R"(
  .text
  .p2align 4
  .hidden fmoe_emu_switch
  .globl fmoe_emu_switch
  .type fmoe_emu_switch,@function
fmoe_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size fmoe_emu_switch,.-fmoe_emu_switch

  .p2align 4
  .hidden fmoe_emu_fiber_start
  .globl fmoe_emu_fiber_start
  .type fmoe_emu_fiber_start,@function
fmoe_emu_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size fmoe_emu_fiber_start,.-fmoe_emu_fiber_start
)");

struct Context {
  void* sp = nullptr;
};
/// Prepare `ctx` to start entry(arg) on the stack [lo, lo + size).
FMOE_EMU_RT
inline void make_context(Context& ctx, void* lo, size_t size, void (*entry)(void*), void* arg) {
  auto top = reinterpret_cast<uintptr_t>(lo) + size;
  top &= ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 64);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  frame[0] = uint64_t(mxcsr) | (uint64_t(fpucw) << 32);
  frame[1] = 0;                                            // r15
  frame[2] = 0;                                            // r14
  frame[3] = reinterpret_cast<uint64_t>(entry);            // r13
  frame[4] = reinterpret_cast<uint64_t>(arg);              // r12
  frame[5] = 0;                                            // rbx
  frame[6] = 0;                                            // rbp
  frame[7] = reinterpret_cast<uint64_t>(&fmoe_emu_fiber_start);  // return address
  ctx.sp = frame;
}
FMOE_EMU_RT
inline void switch_context(Context& from, Context& to) { fmoe_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
FMOE_EMU_RT inline void trampoline(unsigned e0, unsigned e1, unsigned p0, unsigned p1) {
  auto entry = reinterpret_cast<void (*)(void*)>((uintptr_t(e1) << 32) | e0);
  entry(reinterpret_cast<void*>((uintptr_t(p1) << 32) | p0));
}
FMOE_EMU_RT
inline void make_context(Context& ctx, void* lo, size_t size, void (*entry)(void*), void* arg) {
  getcontext(&ctx.uc);
  ctx.uc.uc_stack.ss_sp = lo;
  ctx.uc.uc_stack.ss_size = size;
  ctx.uc.uc_link = nullptr;
  const auto p = reinterpret_cast<uintptr_t>(arg);
  const auto e = reinterpret_cast<uintptr_t>(entry);
  makecontext(&ctx.uc, reinterpret_cast<void (*)()>(&trampoline), 4, unsigned(e), unsigned(e >> 32),
              unsigned(p), unsigned(p >> 32));
}
FMOE_EMU_RT
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ------------------------------------------------------------------ blocks and fibers
enum class Wait : uint8_t { None, Barrier, Warp, Named };

/// Hardware named barriers per block (bar.sync / bar.arrive ids 0..15; 0 is __syncthreads').
constexpr int kNamedBarriers = 16;

/// A cp.async copy that has not landed yet (lazy mode).
struct PendingCopy {
  void* dst;
  const void* src;
  int bytes;
  int group;
  uintptr_t pc;  ///< where it was issued (checked builds)
};

struct Block;
struct MemBlock;  // memory.h

struct Fiber {
  Context ctx;
  void* stack = nullptr;
  Block* block = nullptr;
  unsigned tid = 0;
  bool done = false;
  Wait waiting = Wait::None;
  unsigned wait_gen = 0;
  int wait_id = 0;                 // which named barrier (Wait::Named)
  Site site;                       // where it waits (or last waited)
  std::vector<PendingCopy> pending;
  int group = 0;                   // cp.async groups committed so far
  int benign = 0;                  // inside FMOE_BENIGN_RACE scopes: races not reported
};

/// Result computed by the lane completing a warp collective, for every lane.
using WarpCompletion = void (*)(Block&, int warp);

struct WarpState {
  int arrived = 0;
  unsigned gen = 0;
  unsigned syncs = 0;  ///< __syncwarp()s completed (orders shared memory within the warp)
  int live = 32;
  WarpCompletion complete = nullptr;
  Site site;
  // Per-lane exchange slots: inputs written before arriving, results after release.
  alignas(16) unsigned char in[32][64];
  alignas(16) unsigned char out[32][64];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<WarpState> warps;
  Context sched;
  int cur = -1;
  int live = 0;
  int nthreads = 0;
  int pe = 0;
  dim3 idx;
  // __syncthreads
  int bar_arrived = 0;
  unsigned bar_gen = 0;
  int bar_and = 1, bar_or = 0, bar_count = 0;
  int result_and = 1, result_or = 0, result_count = 0;
  Site bar_site;
  struct Named {
    int arrived = 0, count = 0;
    unsigned gen = 0;
    int all = 1, any = 0;  // bar.red.and / .or of the arrivals
    int result_and = 1, result_or = 0;
    Site site;
  } named[kNamedBarriers];
  bool failed = false;
  std::mt19937_64 rng;
  MemBlock* mem = nullptr;  ///< the memory model's state of this block (checked builds)
};

/// The runtime's per-block thread-locals, in one place (the memory model tells them
/// apart from `__shared__` variables, which are thread-locals too).
struct ThreadState {
  Block* block = nullptr;
  dim3 blockIdx, blockDim, gridDim;
  int pe = 0;  ///< which PE's grid this block belongs to
  bool in_model = false;  ///< the memory model runs: instrumented code it calls is not checked
};
inline thread_local ThreadState tls;

FMOE_EMU_RT inline Fiber& cur_fiber() { return tls.block->fibers[size_t(tls.block->cur)]; }
FMOE_EMU_RT inline unsigned lane_id() { return cur_fiber().tid & 31u; }
/// threadIdx: called all over device code, so it stays inlinable there (no FMOE_EMU_RT).
inline dim3 thread_idx() { return dim3(tls.block->fibers.data()[tls.block->cur].tid, 0, 0); }

/// Where every live thread of a block waits, grouped by site (the deadlock report).
FMOE_EMU_RT inline std::string where_threads_wait(const Block& b) {
  std::map<std::string, std::vector<unsigned>> at;
  for (const Fiber& f : b.fibers) {
    if (f.done) continue;
    // A waiting thread's site names its barrier or collective; a runnable one its last.
    at[(f.waiting == Wait::None ? "running, last at " : "") + describe(f.site)].push_back(f.tid);
  }
  std::string out;
  for (auto& [where, tids] : at) {
    out += "\n    " + std::to_string(tids.size()) + " thread(s) " + where + " (threads " +
           std::to_string(tids.front());
    if (tids.size() > 1) out += ".." + std::to_string(tids.back());
    out += ")";
  }
  int done = 0;
  for (const Fiber& f : b.fibers) done += f.done;
  if (done) out += "\n    " + std::to_string(done) + " thread(s) exited";
  return out;
}

/// Stop the current block with a report; never returns to the faulting thread.
[[noreturn]] FMOE_EMU_RT inline void fatal(const std::string& what) {
  Block* b = tls.block;
  std::string msg = "emulated kernel fault";
  if (b != nullptr) {
    msg += " in block " + std::to_string(b->idx.x) + " of PE " + std::to_string(b->pe);
    if (b->cur >= 0) msg += ", thread " + std::to_string(cur_fiber().tid);
  }
  msg += ": " + what;
  if (b != nullptr) msg += "\n  where the block's threads are:" + where_threads_wait(*b);
  record_error(msg);
  if (b != nullptr && b->cur >= 0) {
    b->failed = true;
    switch_context(cur_fiber().ctx, b->sched);  // the scheduler abandons the block
  }
  std::fprintf(stderr, "%s\n", msg.c_str());
  std::abort();  // not inside a block: nothing to unwind to
}

/// Give the block's OS thread back to its scheduler; the fiber resumes later.
FMOE_EMU_RT inline void yield() {
  Block* b = tls.block;
  switch_context(b->fibers[size_t(b->cur)].ctx, b->sched);
}

/// Inter-block timing perturbation: now and then stall this block's OS thread.
FMOE_EMU_RT inline void chaos() {
  const int c = options().chaos;
  Block* b = tls.block;
  if (c <= 0 || b == nullptr) return;
  if (b->rng() % uint64_t(c) == 0) {
    std::this_thread::sleep_for(
        std::chrono::microseconds(b->rng() % uint64_t(std::max(1, options().chaos_us))));
  }
}

}  // namespace fmoe_emu

#include "memory.h"

namespace fmoe_emu {

// ------------------------------------------------------------------ cp.async
/// The copy lands: it reads global memory as L2 holds it now and writes shared memory.
FMOE_EMU_RT inline void land(const PendingCopy& c) {
  if (c.bytes > 0) copy_l2(c.dst, c.src, size_t(c.bytes), c.pc);
  if (c.bytes < 16) std::memset(static_cast<char*>(c.dst) + c.bytes, 0, size_t(16 - c.bytes));
#if FMOE_EMU_CHECKED
  on_access(c.dst, 16, Access::Write, c.pc);
#endif
}
/// Land every pending copy but those of the newest `keep` committed groups (PTX
/// cp.async.wait_group semantics; uncommitted copies are not waited for).
FMOE_EMU_RT inline void cp_async_complete(Fiber& f, int keep) {
  const int limit = f.group - keep;
  auto it = f.pending.begin();
  while (it != f.pending.end()) {
    if (it->group < limit) {
      land(*it);
      it = f.pending.erase(it);
    } else {
      ++it;
    }
  }
}
FMOE_EMU_RT inline void cp_async(void* dst, const void* src, int src_bytes) {
  const uintptr_t pc = FMOE_EMU_PC();
  if (reinterpret_cast<uintptr_t>(dst) % 16 ||
      (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16)) {
    fatal("cp.async with a shared or global address that is not 16-byte aligned");
  }
  const PendingCopy c{dst, src, src_bytes, 0, pc};
  if (!options().lazy_cp_async) {
    land(c);
    return;
  }
  Fiber& f = cur_fiber();
#if FMOE_EMU_CHECKED
  on_access(dst, 16, Access::Write, pc);  // in flight from now: nobody else may touch it
#endif
  f.pending.push_back({dst, src, src_bytes, f.group, pc});
}
FMOE_EMU_RT inline void cp_async_commit() { ++cur_fiber().group; }
FMOE_EMU_RT inline void cp_async_wait(int n) { cp_async_complete(cur_fiber(), n); }

// ------------------------------------------------------------------ __syncthreads
FMOE_EMU_RT inline void release_block_barrier(Block& b) {
  on_block_release(b);
  b.result_and = b.bar_and;
  b.result_or = b.bar_or;
  b.result_count = b.bar_count;
  b.bar_and = 1;
  b.bar_or = 0;
  b.bar_count = 0;
  b.bar_arrived = 0;
  for (Fiber& f : b.fibers) {
    if (f.waiting == Wait::Barrier && f.wait_gen == b.bar_gen) f.waiting = Wait::None;
  }
  ++b.bar_gen;
}

/// __syncthreads and its reductions: every live thread of the block meets here, at the
/// same call site (threads meeting at different __syncthreads is a divergence bug).
FMOE_EMU_RT inline void block_barrier(int pred, const Site& site) {
  Block& b = *tls.block;
  Fiber& f = cur_fiber();
  if (b.bar_arrived == 0) {
    b.bar_site = site;
  } else if (b.bar_site.line != site.line || std::strcmp(b.bar_site.file, site.file) != 0) {
    f.site = site;
    fatal("threads of one block meet at different barriers: " + describe(site) + " and " +
          describe(b.bar_site));
  }
  b.bar_and &= pred != 0;
  b.bar_or |= pred != 0;
  b.bar_count += pred != 0;
  f.site = site;
  on_block_arrive();
  if (++b.bar_arrived >= b.live) {
    release_block_barrier(b);
  } else {
    f.waiting = Wait::Barrier;
    f.wait_gen = b.bar_gen;
    yield();
  }
}

// ------------------------------------------------------------------ warp collectives
FMOE_EMU_RT inline void release_warp(Block& b, int w) {
  WarpState& ws = b.warps[size_t(w)];
  ws.arrived = 0;
  ws.complete = nullptr;
  const int lo = w * 32, hi = std::min(b.nthreads, lo + 32);
  for (int i = lo; i < hi; ++i) {
    Fiber& f = b.fibers[size_t(i)];
    if (f.waiting == Wait::Warp && f.wait_gen == ws.gen) f.waiting = Wait::None;
  }
  ++ws.gen;
}

/// A full-warp collective: the lane's input is already in its `in` slot; the last lane
/// to arrive runs `complete` (which fills every lane's `out` slot) and releases all.
/// One barrier suffices: a lane writes only its own `in` slot, and only after reading
/// its own `out` slot of the previous collective.
FMOE_EMU_RT inline void warp_collective(unsigned mask, WarpCompletion complete, const Site& site) {
  Block& b = *tls.block;
  Fiber& f = cur_fiber();
  f.site = site;
  if (mask != 0xffffffffu) fatal("warp collective with a partial mask (not emulated): " + describe(site));
  const int w = int(f.tid / 32);
  WarpState& ws = b.warps[size_t(w)];
  if (ws.live != 32) fatal("full-warp collective in a warp with exited lanes: " + describe(site));
  if (ws.arrived == 0) {
    ws.complete = complete;
    ws.site = site;
  } else if (ws.complete != complete || ws.site.line != site.line ||
             std::strcmp(ws.site.file, site.file) != 0) {
    fatal("lanes of one warp meet at different collectives: " + describe(site) + " and " +
          describe(ws.site));
  }
  if (++ws.arrived == ws.live) {
    complete(b, w);
    release_warp(b, w);
  } else {
    f.waiting = Wait::Warp;
    f.wait_gen = ws.gen;
    yield();
  }
}

FMOE_EMU_RT
inline unsigned char* lane_in() { return tls.block->warps[cur_fiber().tid / 32].in[lane_id()]; }
FMOE_EMU_RT
inline unsigned char* lane_out() { return tls.block->warps[cur_fiber().tid / 32].out[lane_id()]; }

/// Shuffle inputs: 8 bytes of value and the source lane each lane computed.
struct ShflIn {
  unsigned char value[8];
  int src;
};
FMOE_EMU_RT inline void complete_shfl(Block& b, int w) {
  WarpState& ws = b.warps[size_t(w)];
  for (int l = 0; l < 32; ++l) {
    ShflIn in;
    std::memcpy(&in, ws.in[l], sizeof in);
    ShflIn from;
    std::memcpy(&from, ws.in[in.src], sizeof from);
    std::memcpy(ws.out[l], from.value, 8);
  }
}

template <class T>
FMOE_EMU_RT inline T shfl(unsigned mask, T v, int src_lane, const Site& site) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of <= 8 bytes");
  ShflIn in{};
  std::memcpy(in.value, &v, sizeof(T));
  in.src = src_lane & 31;
  std::memcpy(lane_in(), &in, sizeof in);
  warp_collective(mask, &complete_shfl, site);
  T r;
  std::memcpy(&r, lane_out(), sizeof(T));
  return r;
}

FMOE_EMU_RT inline void check_width(int width, const Site& site) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) {
    fatal("shuffle width must be a power of two in 1..32: " + describe(site));
  }
}

FMOE_EMU_RT inline void complete_ballot(Block& b, int w) {
  WarpState& ws = b.warps[size_t(w)];
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= unsigned(ws.in[l][0] != 0) << l;
  for (int l = 0; l < 32; ++l) std::memcpy(ws.out[l], &r, sizeof r);
}
FMOE_EMU_RT inline void complete_syncwarp(Block& b, int w) {
  ++b.warps[size_t(w)].syncs;
  on_group_sync(b, w * 32, std::min(b.nthreads, w * 32 + 32));
}

// ------------------------------------------------------------------ named barriers
/// bar.sync / bar.arrive / bar.red.{and,or}.pred on named barrier `id` expecting `count`
/// threads (a multiple of 32, whole warps): the count-th arrival completes it, the
/// waiting (sync) arrivals go on; arrive-only ones went on at once. Returns the AND (or,
/// with red_or, the OR) of the arrivals' predicates to the waiting threads. Mixed
/// counts, an id out of range and more threads than the count are reported.
FMOE_EMU_RT inline int named_barrier(int id, int count, bool wait, int pred, const Site& site,
                                     bool red_or = false) {
  Block& b = *tls.block;
  Fiber& f = cur_fiber();
  f.site = site;
  if (id < 0 || id >= kNamedBarriers) fatal("named barrier id out of 0..15: " + describe(site));
  if (count <= 0 || count % 32 || count > b.nthreads) {
    fatal("named barrier thread count must be a multiple of 32 up to the block's threads: " +
          describe(site));
  }
  Block::Named& nb = b.named[id];
  if (nb.arrived == 0) {
    nb.count = count;
    nb.site = site;
    nb.all = 1;
    nb.any = 0;
  } else if (nb.count != count) {
    fatal("threads arrive at named barrier " + std::to_string(id) + " expecting " +
          std::to_string(count) + " and " + std::to_string(nb.count) + " threads: " +
          describe(site) + " and " + describe(nb.site));
  }
  nb.all &= pred != 0;
  nb.any |= pred != 0;
  on_named_arrive(id);
  if (++nb.arrived == nb.count) {
    nb.result_and = nb.all;
    nb.result_or = nb.any;
    nb.arrived = 0;
    for (Fiber& g : b.fibers) {
      if (g.waiting == Wait::Named && g.wait_id == id && g.wait_gen == nb.gen) {
        g.waiting = Wait::None;
        on_named_acquire(b, g.tid, id);
      }
    }
    if (wait) on_named_acquire(b, f.tid, id);
    on_named_reset(b, id);
    ++nb.gen;
    return red_or ? nb.result_or : nb.result_and;
  }
  if (!wait) return 1;
  f.waiting = Wait::Named;
  f.wait_id = id;
  f.wait_gen = nb.gen;
  yield();
  return red_or ? b.named[id].result_or : b.named[id].result_and;
}

// ------------------------------------------------------------------ launch
struct FiberStart {
  Block* block;
  int index;
  const std::function<void()>* body;
};

/// Called as each emulated thread exits (set per block: sm90.h checks in-flight ops).
inline thread_local void (*thread_exit_hook)() = nullptr;

FMOE_EMU_RT inline void fiber_main(void* arg) {
  auto* s = static_cast<FiberStart*>(arg);
  (*s->body)();
  Block& b = *s->block;
  Fiber& f = b.fibers[size_t(s->index)];
  if (thread_exit_hook != nullptr) thread_exit_hook();
  cp_async_complete(f, 0);
  f.done = true;
  --b.live;
  // Exited threads no longer take part in __syncthreads.
  if (b.bar_arrived > 0 && b.bar_arrived >= b.live) release_block_barrier(b);
  WarpState& ws = b.warps[f.tid / 32];
  --ws.live;
  if (ws.arrived > 0) fatal("a lane exited while its warp waits at a collective: " + describe(ws.site));
  switch_context(f.ctx, b.sched);  // never resumed
  std::abort();
}

inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// Run one block: blockDim.x fibers on this OS thread until all are done or the launch
/// is stopped.
FMOE_EMU_RT
inline void run_block(int pe, dim3 bidx, dim3 grid, dim3 block, const std::function<void()>& body,
                      const std::function<void()>& on_start,
                      std::chrono::steady_clock::time_point t0) {
  const int n = int(block.x);
  Block b;
  b.nthreads = n;
  b.live = n;
  b.pe = pe;
  b.idx = bidx;
  b.fibers.resize(size_t(n));
  b.warps.resize(size_t((n + 31) / 32));
  for (size_t w = 0; w < b.warps.size(); ++w) b.warps[w].live = std::min(32, n - int(w) * 32);
  b.rng.seed(options().seed * 0x9e3779b97f4a7c15ull + uint64_t(pe) * 7919u + bidx.x);
  tls.block = &b;
  tls.blockIdx = bidx;
  tls.gridDim = grid;
  tls.blockDim = block;
  tls.pe = pe;
  if (on_start) on_start();
  mem_block_start(b, pe * int(grid.x * grid.y) + int(bidx.y * grid.x + bidx.x));
  const size_t stack = options().stack_bytes;
  std::vector<FiberStart> starts(size_t(n), FiberStart{nullptr, 0, nullptr});
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[size_t(i)];
    f.tid = unsigned(i);
    f.block = &b;
    f.stack = mmap(nullptr, stack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (f.stack == MAP_FAILED) {
      record_error("emulator: cannot map a fiber stack");
      f.stack = nullptr;
      b.failed = true;
      break;
    }
    mprotect(f.stack, 4096, PROT_NONE);  // guard page: a stack overflow faults
    starts[size_t(i)] = FiberStart{&b, i, &body};
    make_context(f.ctx, f.stack, stack, &fiber_main, &starts[size_t(i)]);
  }
  const bool random = options().seed != 0;
  const int nwarps = int(b.warps.size());
  auto run = [&](int i) FMOE_EMU_RT {
    b.cur = i;
    switch_context(b.sched, b.fibers[size_t(i)].ctx);
    b.cur = -1;
  };
  uint64_t rounds = 0;
  while (b.live > 0 && !b.failed) {
    if (aborting().load(std::memory_order_relaxed)) break;
    if ((++rounds & 255u) == 0 && seconds_since(t0) > options().watchdog_s) {
      record_error("emulator watchdog: the launch ran longer than " +
                   std::to_string(int(options().watchdog_s)) + " s; block " +
                   std::to_string(bidx.x) + " of PE " + std::to_string(pe) +
                   " was still running:" + where_threads_wait(b));
      break;
    }
    bool ran = false;
    if (random) {
      // A burst of rounds of one random warp: warps drift apart between barriers.
      const int w = int(b.rng() % uint64_t(nwarps));
      const int burst = 1 + int(b.rng() % 8u);
      for (int rep = 0; rep < burst && !b.failed; ++rep) {
        for (int i = w * 32; i < std::min(n, w * 32 + 32) && !b.failed; ++i) {
          const Fiber& f = b.fibers[size_t(i)];
          if (f.done || f.waiting != Wait::None) continue;
          run(i);
          ran = true;
        }
      }
      if (ran) continue;
    }
    for (int i = 0; i < n && !b.failed; ++i) {
      const Fiber& f = b.fibers[size_t(i)];
      if (f.done || f.waiting != Wait::None) continue;
      run(i);
      ran = true;
    }
    if (!ran && b.live > 0 && !b.failed) {
      std::string msg = "emulated kernel fault in block " + std::to_string(bidx.x) + " of PE " +
                        std::to_string(pe) +
                        ": deadlock: every live thread waits at a barrier or warp collective "
                        "that cannot complete\n  where the block's threads are:" +
                        where_threads_wait(b);
      record_error(msg);
      break;
    }
  }
  mem_block_end(b);
  for (Fiber& f : b.fibers) {
    if (f.stack != nullptr) munmap(f.stack, stack);
  }
  tls.block = nullptr;
}

/// Launch `grids` 1-D grids at once (one per emulated PE): one OS thread per block,
/// all concurrent, as the blocks of a persistent grid must be co-resident. body(pe)
/// runs as every CUDA thread; on_start(pe) once per block before its threads start.
/// Returns false if the launch was stopped (error_text() says why).
FMOE_EMU_RT
inline bool launch(int grids, dim3 grid, dim3 block, const std::function<void(int)>& body,
                   const std::function<void(int)>& on_start = {}) {
  {
    std::lock_guard<std::mutex> lock(error_mutex());
    error_text().clear();
  }
  aborting().store(false);
  if (block.y != 1 || block.z != 1 || grid.z != 1) {
    record_error("emulator: only 1-D blocks and 1-D or 2-D grids are emulated");
    return false;
  }
  const auto t0 = std::chrono::steady_clock::now();
  mem_begin_launch(grids, int(grid.x * grid.y));
  std::vector<std::function<void()>> bodies, starts;
  for (int g = 0; g < grids; ++g) {
    bodies.emplace_back([&body, g] { body(g); });
    starts.emplace_back(on_start ? std::function<void()>([&on_start, g] { on_start(g); })
                                 : std::function<void()>());
  }
  std::vector<std::thread> threads;
  for (int g = 0; g < grids; ++g)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x)
        threads.emplace_back([&, g, x, y]() FMOE_EMU_RT {
          run_block(g, dim3(x, y, 1), grid, block, bodies[size_t(g)], starts[size_t(g)], t0);
        });
  for (std::thread& t : threads) t.join();
  mem_end_launch();
  return error_text().empty();
}

inline uint64_t now_ns() {
  return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(
                      std::chrono::steady_clock::now().time_since_epoch())
                      .count());
}

}  // namespace fmoe_emu

// ------------------------------------------------------------------ CUDA built-ins
#define threadIdx (::fmoe_emu::thread_idx())
#define blockIdx (::fmoe_emu::tls.blockIdx)
#define blockDim (::fmoe_emu::tls.blockDim)
#define gridDim (::fmoe_emu::tls.gridDim)
#define warpSize 32

FMOE_EMU_RT
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  fmoe_emu::block_barrier(1, {file, line, "__syncthreads"});
}
FMOE_EMU_RT
inline int __syncthreads_and(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  fmoe_emu::block_barrier(p, {file, line, "__syncthreads_and"});
  return fmoe_emu::tls.block->result_and;
}
FMOE_EMU_RT
inline int __syncthreads_or(int p, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  fmoe_emu::block_barrier(p, {file, line, "__syncthreads_or"});
  return fmoe_emu::tls.block->result_or;
}
FMOE_EMU_RT inline int __syncthreads_count(int p, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  fmoe_emu::block_barrier(p, {file, line, "__syncthreads_count"});
  return fmoe_emu::tls.block->result_count;
}
FMOE_EMU_RT inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  fmoe_emu::warp_collective(mask, &fmoe_emu::complete_syncwarp, {file, line, "__syncwarp"});
}
// Fences are fence.sc at their scope (membar is fence.sc since sm_70): the memory model
// drains the block's store buffer and synchronizes with earlier fences (memory.h).
FMOE_EMU_RT inline void __threadfence() {
  fmoe_emu::chaos();
  fmoe_emu::on_fence(fmoe_emu::Scope::Gpu);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
FMOE_EMU_RT inline void __threadfence_block() {
  fmoe_emu::on_fence(fmoe_emu::Scope::Cta);  // orders nothing for other blocks
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
FMOE_EMU_RT inline void __threadfence_system() {
  fmoe_emu::chaos();
  fmoe_emu::on_fence(fmoe_emu::Scope::Sys);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}
/// A spinning thread lets the other threads of its block run (other blocks have OS
/// threads of their own).
FMOE_EMU_RT
inline void __nanosleep(unsigned, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  fmoe_emu::cur_fiber().site = {file, line, "__nanosleep"};
  fmoe_emu::on_spin();
  fmoe_emu::yield();
  std::this_thread::yield();
}

template <class T>
FMOE_EMU_RT
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  const fmoe_emu::Site site{file, line, "__shfl_sync"};
  fmoe_emu::check_width(width, site);
  const int lane = int(fmoe_emu::lane_id());
  return fmoe_emu::shfl(mask, v, (lane & ~(width - 1)) + (src & (width - 1)), site);
}
template <class T>
FMOE_EMU_RT inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const fmoe_emu::Site site{file, line, "__shfl_xor_sync"};
  fmoe_emu::check_width(width, site);
  const int lane = int(fmoe_emu::lane_id());
  int src = lane ^ lane_mask;
  if (src >= (lane & ~(width - 1)) + width) src = lane;  // outside the segment: own value
  return fmoe_emu::shfl(mask, v, src, site);
}
template <class T>
FMOE_EMU_RT inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const fmoe_emu::Site site{file, line, "__shfl_down_sync"};
  fmoe_emu::check_width(width, site);
  const int lane = int(fmoe_emu::lane_id());
  const int src = (lane & (width - 1)) + int(delta) < width ? lane + int(delta) : lane;
  return fmoe_emu::shfl(mask, v, src, site);
}
template <class T>
FMOE_EMU_RT inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const fmoe_emu::Site site{file, line, "__shfl_up_sync"};
  fmoe_emu::check_width(width, site);
  const int lane = int(fmoe_emu::lane_id());
  const int src = (lane & (width - 1)) >= int(delta) ? lane - int(delta) : lane;
  return fmoe_emu::shfl(mask, v, src, site);
}
FMOE_EMU_RT
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  fmoe_emu::lane_in()[0] = pred != 0;
  fmoe_emu::warp_collective(mask, &fmoe_emu::complete_ballot, {file, line, "__ballot_sync"});
  unsigned r;
  std::memcpy(&r, fmoe_emu::lane_out(), sizeof r);
  return r;
}

// Atomics. CUDA's are relaxed device-scope read-modify-writes (they drain nothing and
// order nothing by themselves); the builtins underneath are sequentially consistent.
#if FMOE_EMU_CHECKED
#define FMOE_EMU_ATOMIC_HOOK(p) fmoe_emu::on_atomic(p, sizeof(*(p)), FMOE_EMU_PC())
#define FMOE_EMU_ATOMIC_DONE() fmoe_emu::after_strong()
#else
#define FMOE_EMU_ATOMIC_HOOK(p) (void)0
#define FMOE_EMU_ATOMIC_DONE() (void)0
#endif
#define FMOE_EMU_ATOMICS(T)                                                                     \
  FMOE_EMU_RT inline T atomicAdd(T* p, T v) {                                                   \
    fmoe_emu::chaos();                                                                          \
    FMOE_EMU_ATOMIC_HOOK(p);                                                                    \
    const T old = __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);                                   \
    FMOE_EMU_ATOMIC_DONE();                                                                     \
    return old;                                                                                 \
  }                                                                                             \
  FMOE_EMU_RT inline T atomicSub(T* p, T v) {                                                   \
    FMOE_EMU_ATOMIC_HOOK(p);                                                                    \
    const T old = __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST);                                   \
    FMOE_EMU_ATOMIC_DONE();                                                                     \
    return old;                                                                                 \
  }                                                                                             \
  FMOE_EMU_RT inline T atomicExch(T* p, T v) {                                                  \
    FMOE_EMU_ATOMIC_HOOK(p);                                                                    \
    const T old = __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST);                                  \
    FMOE_EMU_ATOMIC_DONE();                                                                     \
    return old;                                                                                 \
  }                                                                                             \
  FMOE_EMU_RT inline T atomicOr(T* p, T v) {                                                    \
    FMOE_EMU_ATOMIC_HOOK(p);                                                                    \
    const T old = __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST);                                    \
    FMOE_EMU_ATOMIC_DONE();                                                                     \
    return old;                                                                                 \
  }                                                                                             \
  FMOE_EMU_RT inline T atomicAnd(T* p, T v) {                                                   \
    FMOE_EMU_ATOMIC_HOOK(p);                                                                    \
    const T old = __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST);                                   \
    FMOE_EMU_ATOMIC_DONE();                                                                     \
    return old;                                                                                 \
  }                                                                                             \
  FMOE_EMU_RT inline T atomicMax(T* p, T v) {                                                   \
    FMOE_EMU_ATOMIC_HOOK(p);                                                                    \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                               \
    while (old < v &&                                                                           \
           !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) \
      ;                                                                                         \
    FMOE_EMU_ATOMIC_DONE();                                                                     \
    return old;                                                                                 \
  }                                                                                             \
  FMOE_EMU_RT inline T atomicMin(T* p, T v) {                                                   \
    FMOE_EMU_ATOMIC_HOOK(p);                                                                    \
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);                                               \
    while (old > v &&                                                                           \
           !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) \
      ;                                                                                         \
    FMOE_EMU_ATOMIC_DONE();                                                                     \
    return old;                                                                                 \
  }                                                                                             \
  FMOE_EMU_RT inline T atomicCAS(T* p, T expected, T desired) {                                 \
    fmoe_emu::chaos();                                                                          \
    FMOE_EMU_ATOMIC_HOOK(p);                                                                    \
    __atomic_compare_exchange_n(p, &expected, desired, false, __ATOMIC_SEQ_CST,                 \
                                __ATOMIC_SEQ_CST);                                              \
    FMOE_EMU_ATOMIC_DONE();                                                                     \
    return expected;                                                                            \
  }                                                                                             \
  FMOE_EMU_RT inline T atomicCAS_system(T* p, T expected, T desired) {                          \
    return atomicCAS(p, expected, desired);                                                     \
  }
FMOE_EMU_ATOMICS(int)
FMOE_EMU_ATOMICS(unsigned)
FMOE_EMU_ATOMICS(unsigned long long)
#undef FMOE_EMU_ATOMICS

FMOE_EMU_RT inline float atomicAdd(float* p, float v) {
  fmoe_emu::chaos();
  FMOE_EMU_ATOMIC_HOOK(p);
  uint32_t old_bits = __atomic_load_n(reinterpret_cast<uint32_t*>(p), __ATOMIC_SEQ_CST);
  for (;;) {
    float old_val, new_val;
    std::memcpy(&old_val, &old_bits, 4);
    new_val = old_val + v;
    uint32_t new_bits;
    std::memcpy(&new_bits, &new_val, 4);
    if (__atomic_compare_exchange_n(reinterpret_cast<uint32_t*>(p), &old_bits, new_bits, false,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
      FMOE_EMU_ATOMIC_DONE();
      return old_val;
    }
  }
}

/// ld.global.cg: through L2 (what other blocks' drained stores made visible). Volatile
/// for scalars in unchecked builds, so that spin loops re-read memory.
template <class T>
FMOE_EMU_RT inline T __ldcg(const T* p) {
#if FMOE_EMU_CHECKED
  T v;
  fmoe_emu::copy_l2(static_cast<void*>(&v), static_cast<const void*>(p), sizeof(T), FMOE_EMU_PC());
  return v;
#else
  if constexpr (std::is_arithmetic<T>::value) {
    return *reinterpret_cast<const volatile T*>(p);
  } else {
    T v;
    std::memcpy(static_cast<void*>(&v), static_cast<const void*>(p), sizeof(T));
    return v;
  }
#endif
}
/// ld.global.nc: the read-only path (the data must not change during the launch).
template <class T>
FMOE_EMU_RT inline T __ldg(const T* p) {
#if FMOE_EMU_CHECKED
  fmoe_emu::on_access(p, sizeof(T), fmoe_emu::Access::NcRead, FMOE_EMU_PC());
#endif
  return *p;
}

namespace fmoe_emu {
template <class To, class From>
inline To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To out;
  std::memcpy(&out, &v, sizeof out);
  return out;
}
}  // namespace fmoe_emu
inline float __uint_as_float(unsigned u) { return fmoe_emu::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return fmoe_emu::bit_cast<unsigned>(f); }
inline float __int_as_float(int i) { return fmoe_emu::bit_cast<float>(i); }
inline int __float_as_int(float f) { return fmoe_emu::bit_cast<int>(f); }

inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
