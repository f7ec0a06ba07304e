/**
 * @file nvshmem.h
 * @brief The NVSHMEM device API subset flashmoe uses, for several PEs in one process.
 *
 * Included by include/flashmoe/shmem.cuh in emulator builds instead of NVSHMEM's own
 * headers. Each PE is one grid of the same launch (fmoe_emu::launch with one grid per
 * PE); its symmetric heap is one host allocation, and every PE's heap has the same
 * size, so a symmetric address on PE q is PE q's base plus the offset of the address
 * in the caller's heap.
 *
 * A put with a signal lands at once: the data (read from the source as L2 holds it),
 * then a release of that data, then the signal update (the order NVSHMEM guarantees). A
 * put without a signal (putmem_nbi) lands at once too, unless the memory model's weak
 * mode is on: then it stays in flight until the putting block's nvshmem_fence or
 * nvshmem_quiet (or kernel end), and if a signal to the same PE overtakes it, it lands
 * only after a delay, so the peer sees the signal before the data, as a GPU may let it.
 */
#pragma once

#include "runtime.h"

namespace fmoe_emu {

/// The PEs of the running launch and their symmetric heaps.
struct ShmemWorld {
  int npes = 1;
  std::vector<char*> base;
  size_t bytes = 0;
};
inline ShmemWorld& shmem_world() {
  static ShmemWorld w;
  return w;
}

/// The address on PE `pe` that corresponds to the caller's symmetric address `p`.
FMOE_EMU_RT inline char* symmetric_on(const void* p, int pe, const char* what) {
  const ShmemWorld& w = shmem_world();
  if (pe < 0 || pe >= w.npes) fatal(std::string(what) + ": PE " + std::to_string(pe) + " does not exist");
  const char* mine = w.base[size_t(tls.pe)];
  const char* c = static_cast<const char*>(p);
  if (c < mine || c >= mine + w.bytes) {
    fatal(std::string(what) + ": address is not in this PE's symmetric heap");
  }
  return w.base[size_t(pe)] + (c - mine);
}

#if FMOE_EMU_CHECKED
/// Puts still in flight to `pe` are overtaken by a signal about to be sent there.
FMOE_EMU_RT inline void signal_overtakes(int pe) {
  MemBlock* m = cur_mem();
  if (m == nullptr) return;
  InModel guard;
  for (PendingPut& p : m->puts) p.late |= p.pe == pe;
}

/// Land every put of this block still in flight (in issue order); late ones after a
/// pause, so that a peer acting on the signal that overtook them reads first.
FMOE_EMU_RT inline void land_puts() {
  MemBlock* m = cur_mem();
  if (m == nullptr) return;
  InModel guard;
  if (m->puts.empty()) return;
  bool late = false;
  for (const PendingPut& p : m->puts) late |= p.late;
  if (late) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  while (!m->puts.empty()) {
    PendingPut p = std::move(m->puts.front());
    m->puts.pop_front();
    on_access(p.dst, p.data.size(), Access::Put, module_base() + p.pc);
    std::memcpy(p.dst, p.data.data(), p.data.size());
  }
}
#endif

/// The data of a put arrives at `remote` (read from `src` as L2 holds it).
FMOE_EMU_RT inline void deliver(char* remote, const void* src, size_t bytes, uintptr_t pc) {
#if FMOE_EMU_CHECKED
  InModel guard;
  std::vector<char> data(bytes);
  copy_l2(data.data(), src, bytes, pc);
  on_access(remote, bytes, Access::Put, pc);
  std::memcpy(remote, data.data(), bytes);
#else
  (void)pc;
  std::memcpy(remote, src, bytes);
#endif
}

FMOE_EMU_RT
inline void signal_update(uint64_t* sig, uint64_t value, int op, int pe, const char* what,
                                      uintptr_t pc) {
  auto* remote = reinterpret_cast<uint64_t*>(symmetric_on(sig, pe, what));
#if FMOE_EMU_CHECKED
  signal_overtakes(pe);
  on_atomic(remote, sizeof(uint64_t), pc);
#else
  (void)pc;
#endif
  if (op == 0) {
    __atomic_store_n(remote, value, __ATOMIC_SEQ_CST);
  } else {
    __atomic_fetch_add(remote, value, __ATOMIC_SEQ_CST);
  }
}

FMOE_EMU_RT inline void put_signal(void* dest, const void* src, size_t bytes, uint64_t* sig,
                                   uint64_t value, int op, int pe, const char* what,
                                   uintptr_t pc) {
  char* remote = symmetric_on(dest, pe, what);
  if (bytes > 0) symmetric_on(static_cast<char*>(dest) + bytes - 1, pe, what);  // whole range
  chaos();
  deliver(remote, src, bytes, pc);
#if FMOE_EMU_CHECKED
  MemBlock* m = cur_mem();
  if (m != nullptr && options().races) {
    InModel guard;
    record_fence(*m, true);  // the data before the signal
  }
#endif
  std::atomic_thread_fence(std::memory_order_seq_cst);
  signal_update(sig, value, op, pe, what, pc);
}

/// nvshmem_fence / nvshmem_quiet: every put of this block lands, then a system fence.
FMOE_EMU_RT inline void complete_puts() {
#if FMOE_EMU_CHECKED
  land_puts();
#endif
  on_fence(Scope::Sys);
  std::atomic_thread_fence(std::memory_order_seq_cst);
}

}  // namespace fmoe_emu

#define NVSHMEM_SIGNAL_SET 0
#define NVSHMEM_SIGNAL_ADD 5

inline int nvshmem_my_pe() { return fmoe_emu::tls.pe; }
inline int nvshmem_n_pes() { return fmoe_emu::shmem_world().npes; }
FMOE_EMU_RT inline void nvshmem_quiet() { fmoe_emu::complete_puts(); }
FMOE_EMU_RT inline void nvshmem_fence() { fmoe_emu::complete_puts(); }

FMOE_EMU_RT inline uint64_t nvshmem_signal_fetch(const uint64_t* sig) {
#if FMOE_EMU_CHECKED
  fmoe_emu::on_access(sig, sizeof(uint64_t), fmoe_emu::Access::StrongRead, FMOE_EMU_PC());
#endif
  const uint64_t v = __atomic_load_n(sig, __ATOMIC_SEQ_CST);
  fmoe_emu::after_strong();
  return v;
}
FMOE_EMU_RT inline uint32_t nvshmem_uint32_g(const uint32_t* src, int pe) {
  const auto* remote = reinterpret_cast<const uint32_t*>(
      fmoe_emu::symmetric_on(src, pe, "nvshmem_uint32_g"));
#if FMOE_EMU_CHECKED
  fmoe_emu::on_access(remote, sizeof(uint32_t), fmoe_emu::Access::StrongRead, FMOE_EMU_PC());
#endif
  const uint32_t v = __atomic_load_n(remote, __ATOMIC_SEQ_CST);
  fmoe_emu::after_strong();
  return v;
}
FMOE_EMU_RT inline void nvshmemx_signal_op(uint64_t* sig, uint64_t value, int op, int pe) {
  fmoe_emu::signal_update(sig, value, op, pe, "nvshmemx_signal_op", FMOE_EMU_PC());
}
FMOE_EMU_RT inline void nvshmem_putmem_nbi(void* dest, const void* src, size_t bytes, int pe) {
  const uintptr_t pc = FMOE_EMU_PC();
  char* remote = fmoe_emu::symmetric_on(dest, pe, "nvshmem_putmem_nbi");
  if (bytes > 0) {
    fmoe_emu::symmetric_on(static_cast<char*>(dest) + bytes - 1, pe, "nvshmem_putmem_nbi");
  }
  fmoe_emu::chaos();
#if FMOE_EMU_CHECKED
  fmoe_emu::MemBlock* m = fmoe_emu::cur_mem();
  if (m != nullptr && fmoe_emu::options().weak) {  // in flight until fence / quiet
    fmoe_emu::InModel guard;
    std::vector<char> data(bytes);
    fmoe_emu::copy_l2(data.data(), src, bytes, pc);
    m->puts.push_back({remote, std::move(data), pe, fmoe_emu::pc_id(pc), false});
    return;
  }
#endif
  fmoe_emu::deliver(remote, src, bytes, pc);
}
FMOE_EMU_RT
inline void nvshmem_putmem_signal_nbi(void* dest, const void* src, size_t bytes, uint64_t* sig,
                                      uint64_t value, int op, int pe) {
  fmoe_emu::put_signal(dest, src, bytes, sig, value, op, pe, "nvshmem_putmem_signal_nbi",
                       FMOE_EMU_PC());
}
/// Warp-collective form: every lane of the warp calls it; lane 0 moves the data.
FMOE_EMU_RT inline void nvshmemx_putmem_signal_nbi_warp(void* dest, const void* src,
                                                        size_t bytes, uint64_t* sig,
                                                        uint64_t value, int op, int pe,
                                                        const char* file = __builtin_FILE(),
                                                        int line = __builtin_LINE()) {
  const uintptr_t pc = FMOE_EMU_PC();
  fmoe_emu::warp_collective(0xffffffffu, &fmoe_emu::complete_syncwarp,
                            {file, line, "nvshmemx_putmem_signal_nbi_warp"});
  if (fmoe_emu::lane_id() == 0) {
    fmoe_emu::put_signal(dest, src, bytes, sig, value, op, pe, "nvshmemx_putmem_signal_nbi_warp",
                         pc);
  }
  fmoe_emu::warp_collective(0xffffffffu, &fmoe_emu::complete_syncwarp,
                            {file, line, "nvshmemx_putmem_signal_nbi_warp (end)"});
}
/// Block-collective form: every thread of the block calls it; one thread moves the data.
FMOE_EMU_RT inline void nvshmemx_putmem_signal_nbi_block(void* dest, const void* src,
                                                         size_t bytes, uint64_t* sig,
                                                         uint64_t value, int op, int pe,
                                                         const char* file = __builtin_FILE(),
                                                         int line = __builtin_LINE()) {
  const uintptr_t pc = FMOE_EMU_PC();
  fmoe_emu::block_barrier(1, {file, line, "nvshmemx_putmem_signal_nbi_block"});
  if (fmoe_emu::cur_fiber().tid == 0) {
    fmoe_emu::put_signal(dest, src, bytes, sig, value, op, pe, "nvshmemx_putmem_signal_nbi_block",
                         pc);
  }
  fmoe_emu::block_barrier(1, {file, line, "nvshmemx_putmem_signal_nbi_block (end)"});
}
