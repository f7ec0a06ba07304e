/**
 * @file prelude.cuh
 * @brief Common includes and small helpers for every flashmoe device translation unit.
 *
 * The sources are compiled by NVRTC at run time (no host compiler): only device
 * headers are included, and everything unannotated is device code
 * (-default-device), which CuTe's constexpr helpers need.
 */
#pragma once

#include <cuda/std/cstdint>
#include <cuda/std/limits>
#include <cuda/std/type_traits>
#include <cute/tensor.hpp>
#if FMOE_HOST_EMU
#include <flashmoe_emu/atoms.h>  // CPU emulator: warp-cooperative mma.sync / ldmatrix
#define FMOE_ARCH_ATOM(op) cute::EMU_##op
#else
#define FMOE_ARCH_ATOM(op) cute::op
#endif

#define FMOE_DEVICE __device__ __forceinline__

// FMOE_BENIGN_RACE("why"); as a statement: the memory accesses of the enclosing scope
// race with other blocks on purpose. The CPU emulator's race detector skips them
// (device/emu/flashmoe_emu/memory.h); on the GPU it is nothing.
#if FMOE_HOST_EMU
#define FMOE_BENIGN_RACE(why) const ::fmoe_emu::BenignRace fmoe_benign_race_scope_(why)
#else
#define FMOE_BENIGN_RACE(why) static_cast<void>(0)
#endif

namespace flashmoe {

using cuda::std::int32_t;
using cuda::std::int64_t;
using cuda::std::uint16_t;
using cuda::std::uint32_t;
using cuda::std::uint64_t;

/// Nanoseconds from the GPU's global timer (the same clock on every SM).
FMOE_DEVICE uint64_t global_timer_ns() {
#if FMOE_HOST_EMU
  return fmoe_emu::now_ns();
#else
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
#endif
}

FMOE_DEVICE int ceil_div(int a, int b) { return (a + b - 1) / b; }

}  // namespace flashmoe
