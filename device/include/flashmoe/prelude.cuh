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

/// Named barrier `id` (1..15; 0 is __syncthreads') of `count` threads, whole warps: wait
/// until `count` threads arrived (bar.sync). Lets part of a block meet while the rest
/// (a producer warp) goes on.
#if FMOE_HOST_EMU
FMOE_DEVICE void named_sync(int id, int count, const char* file = __builtin_FILE(),
                            int line = __builtin_LINE()) {
  fmoe_emu::named_barrier(id, count, true, 1, {file, line, "bar.sync"});
}
/// bar.red.and.pred: named_sync that returns whether `pred` held in every arrival.
FMOE_DEVICE bool named_sync_and(int id, int count, bool pred, const char* file = __builtin_FILE(),
                                int line = __builtin_LINE()) {
  return fmoe_emu::named_barrier(id, count, true, pred ? 1 : 0, {file, line, "bar.red.and"}) != 0;
}
/// bar.red.or.pred: named_sync that returns whether `pred` held in any arrival.
FMOE_DEVICE bool named_sync_or(int id, int count, bool pred, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  return fmoe_emu::named_barrier(id, count, true, pred ? 1 : 0, {file, line, "bar.red.or"},
                                 true) != 0;
}
/// Arrive at named barrier `id` without waiting (bar.arrive): the producer side.
FMOE_DEVICE void named_arrive(int id, int count, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  fmoe_emu::named_barrier(id, count, false, 1, {file, line, "bar.arrive"});
}
#else
FMOE_DEVICE void named_sync(int id, int count) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
FMOE_DEVICE bool named_sync_and(int id, int count, bool pred) {
  uint32_t r;
  asm volatile(
      "{\n.reg .pred p, q;\n"
      "setp.ne.u32 p, %1, 0;\n"
      "bar.red.and.pred q, %2, %3, p;\n"
      "selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r)
      : "r"(uint32_t(pred)), "r"(id), "r"(count)
      : "memory");
  return r != 0u;
}
FMOE_DEVICE bool named_sync_or(int id, int count, bool pred) {
  uint32_t r;
  asm volatile(
      "{\n.reg .pred p, q;\n"
      "setp.ne.u32 p, %1, 0;\n"
      "bar.red.or.pred q, %2, %3, p;\n"
      "selp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r)
      : "r"(uint32_t(pred)), "r"(id), "r"(count)
      : "memory");
  return r != 0u;
}
FMOE_DEVICE void named_arrive(int id, int count) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}
#endif

/// The barriers of a kernel's body. kBody 0: the whole block (__syncthreads and its
/// reductions); kBody > 0: the first kBody threads of a warp-specialised block (named
/// barrier 1), while the producer warp after them goes on.
constexpr int kBodyBarrier = 1;
#if FMOE_HOST_EMU
template <int kBody = 0>
FMOE_DEVICE void body_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  if constexpr (kBody == 0) {
    __syncthreads(file, line);
  } else {
    named_sync(kBodyBarrier, kBody, file, line);
  }
}
template <int kBody = 0>
FMOE_DEVICE bool body_sync_and(bool p, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  if constexpr (kBody == 0) {
    return __syncthreads_and(p, file, line) != 0;
  } else {
    return named_sync_and(kBodyBarrier, kBody, p, file, line);
  }
}
template <int kBody = 0>
FMOE_DEVICE bool body_sync_or(bool p, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  if constexpr (kBody == 0) {
    return __syncthreads_or(p, file, line) != 0;
  } else {
    return named_sync_or(kBodyBarrier, kBody, p, file, line);
  }
}
#else
template <int kBody = 0>
FMOE_DEVICE void body_sync() {
  if constexpr (kBody == 0) {
    __syncthreads();
  } else {
    named_sync(kBodyBarrier, kBody);
  }
}
template <int kBody = 0>
FMOE_DEVICE bool body_sync_and(bool p) {
  if constexpr (kBody == 0) {
    return __syncthreads_and(p) != 0;
  } else {
    return named_sync_and(kBodyBarrier, kBody, p);
  }
}
template <int kBody = 0>
FMOE_DEVICE bool body_sync_or(bool p) {
  if constexpr (kBody == 0) {
    return __syncthreads_or(p) != 0;
  } else {
    return named_sync_or(kBodyBarrier, kBody, p);
  }
}
#endif

}  // namespace flashmoe
