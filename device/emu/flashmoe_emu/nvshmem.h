/**
 * @file nvshmem.h
 * @brief The NVSHMEM device API subset flashmoe uses, for several PEs in one process.
 *
 * Included by include/flashmoe/shmem.cuh in emulator builds instead of NVSHMEM's own
 * headers. Each PE is one grid of the same launch (fmoe_emu::launch with one grid per
 * PE); its symmetric heap is one host allocation, and every PE's heap has the same
 * size, so a symmetric address on PE q is PE q's base plus the offset of the address
 * in the caller's heap. A put is a copy, a full fence, then the signal update, which
 * is the ordering NVSHMEM guarantees between a put's data and its signal; puts land at
 * once (non-blocking puts never stay in flight, so a missing quiet goes unseen).
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
inline char* symmetric_on(const void* p, int pe, const char* what) {
  const ShmemWorld& w = shmem_world();
  if (pe < 0 || pe >= w.npes) fatal(std::string(what) + ": PE " + std::to_string(pe) + " does not exist");
  const char* mine = w.base[size_t(tl_pe)];
  const char* c = static_cast<const char*>(p);
  if (c < mine || c >= mine + w.bytes) {
    fatal(std::string(what) + ": address is not in this PE's symmetric heap");
  }
  return w.base[size_t(pe)] + (c - mine);
}

inline void signal_update(uint64_t* sig, uint64_t value, int op, int pe, const char* what) {
  auto* remote = reinterpret_cast<uint64_t*>(symmetric_on(sig, pe, what));
  if (op == 0) {
    __atomic_store_n(remote, value, __ATOMIC_SEQ_CST);
  } else {
    __atomic_fetch_add(remote, value, __ATOMIC_SEQ_CST);
  }
}

inline void put_signal(void* dest, const void* src, size_t bytes, uint64_t* sig, uint64_t value,
                       int op, int pe, const char* what) {
  char* remote = symmetric_on(dest, pe, what);
  if (bytes > 0) symmetric_on(static_cast<char*>(dest) + bytes - 1, pe, what);  // whole range
  chaos();
  std::memcpy(remote, src, bytes);
  std::atomic_thread_fence(std::memory_order_seq_cst);
  signal_update(sig, value, op, pe, what);
}

}  // namespace fmoe_emu

#define NVSHMEM_SIGNAL_SET 0
#define NVSHMEM_SIGNAL_ADD 5

inline int nvshmem_my_pe() { return fmoe_emu::tl_pe; }
inline int nvshmem_n_pes() { return fmoe_emu::shmem_world().npes; }
inline void nvshmem_quiet() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void nvshmem_fence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

inline uint64_t nvshmem_signal_fetch(const uint64_t* sig) {
  return __atomic_load_n(sig, __ATOMIC_SEQ_CST);
}
inline uint32_t nvshmem_uint32_g(const uint32_t* src, int pe) {
  return __atomic_load_n(reinterpret_cast<const uint32_t*>(fmoe_emu::symmetric_on(src, pe, "nvshmem_uint32_g")),
                         __ATOMIC_SEQ_CST);
}
inline void nvshmemx_signal_op(uint64_t* sig, uint64_t value, int op, int pe) {
  fmoe_emu::signal_update(sig, value, op, pe, "nvshmemx_signal_op");
}
inline void nvshmem_putmem_signal_nbi(void* dest, const void* src, size_t bytes, uint64_t* sig,
                                      uint64_t value, int op, int pe) {
  fmoe_emu::put_signal(dest, src, bytes, sig, value, op, pe, "nvshmem_putmem_signal_nbi");
}
/// Block-collective form: every thread of the block calls it; one thread moves the data.
inline void nvshmemx_putmem_signal_nbi_block(void* dest, const void* src, size_t bytes,
                                             uint64_t* sig, uint64_t value, int op, int pe,
                                             const char* file = __builtin_FILE(),
                                             int line = __builtin_LINE()) {
  fmoe_emu::block_barrier(1, {file, line, "nvshmemx_putmem_signal_nbi_block"});
  if (fmoe_emu::cur_fiber().tid == 0) {
    fmoe_emu::put_signal(dest, src, bytes, sig, value, op, pe, "nvshmemx_putmem_signal_nbi_block");
  }
  fmoe_emu::block_barrier(1, {file, line, "nvshmemx_putmem_signal_nbi_block (end)"});
}
