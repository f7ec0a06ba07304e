/**
 * @file entry.h
 * @brief The C functions every emulator library exports besides its kernel launcher
 *        (called from flashmoe_core.host.emulator through ctypes).
 */
#pragma once

#include "atoms.h"
#include "runtime.h"

#define FMOE_EMU_EXPORT extern "C" __attribute__((visibility("default")))

/// Set the launch options (runtime.h Options); returns 0, or 1 when the memory model is
/// asked for (weak, races, preempt) in a library built without it.
FMOE_EMU_EXPORT int emu_configure(unsigned long long seed, int lazy_cp_async, int poison_smem,
                                  int chaos, int chaos_us, double watchdog_s, int stack_kib,
                                  int weak, int races, int preempt) {
  fmoe_emu::Options& o = fmoe_emu::options();
#if !FMOE_EMU_CHECKED
  if (weak || races || preempt) return 1;
#endif
  o.weak = weak != 0;
  o.races = races != 0;
  o.preempt = preempt;
  o.seed = seed;
  o.lazy_cp_async = lazy_cp_async != 0;
  o.poison_smem = poison_smem != 0;
  o.chaos = chaos;
  o.chaos_us = chaos_us;
  o.watchdog_s = watchdog_s;
  o.stack_bytes = size_t(stack_kib) * 1024;
  return 0;
}

/// 1 if this library carries the memory model (a checked build: memory.h).
FMOE_EMU_EXPORT int emu_checked() { return FMOE_EMU_CHECKED ? 1 : 0; }

/// The buffers of the next launches, by name (memory.h checks only these): n entries
/// of base address, size in bytes, PE and flags (1: an NVSHMEM symmetric heap buffer).
FMOE_EMU_EXPORT int emu_register(int n, const char* const* names, const unsigned long long* base,
                                 const unsigned long long* bytes, const int* pes,
                                 const int* flags) {
  fmoe_emu::register_buffers(n, names, reinterpret_cast<const uint64_t*>(base),
                             reinterpret_cast<const uint64_t*>(bytes), pes, flags);
  return 0;
}

/// Why the last launch stopped ("" if it did not).
FMOE_EMU_EXPORT const char* emu_last_error() { return fmoe_emu::error_text().c_str(); }

/// Fragment-layout disagreements between the emulated MMA atoms and CuTe (0 expected).
FMOE_EMU_EXPORT int emu_mma_layout_mismatches() { return fmoe_emu::mma_layout_mismatches(); }

/// Fill `bytes` of a block's dynamic shared memory with 0xFF (a float NaN) when asked,
/// so that reading shared memory nobody wrote shows up in results.
inline void emu_poison(void* smem, size_t bytes) {
  if (fmoe_emu::options().poison_smem) std::memset(smem, 0xff, bytes);
}

/// A block's start for a kernel on the tile GEMM: poisoned shared memory and, with the
/// wgmma mainloop, the shared window its descriptors address (1024-byte aligned).
inline void emu_block_start(void* smem, size_t bytes) {
  emu_poison(smem, bytes);
#if FMOE_SM90_MAINLOOP
  fmoe_emu::sm90_block_start(smem, bytes);
#endif
}
