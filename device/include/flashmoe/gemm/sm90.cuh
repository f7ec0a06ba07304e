/**
 * @file sm90.cuh
 * @brief Hopper's asynchronous building blocks for the sm_90a mainloop: mbarriers,
 *        TMA tile loads, wgmma.mma_async on shared-memory descriptors, the wgmma
 *        fence/commit/wait, proxy fences, elect.sync and setmaxnreg.
 *
 * On the GPU these are PTX (sm_90a only; CuTe's SM90 GMMA atoms for the MMA itself);
 * under the CPU emulator the same calls run flashmoe_emu/sm90.h, which models their
 * asynchrony (accumulators unreadable until the wait, operands that must not change
 * while an op is in flight, mbarrier phases with arrival and transaction counts).
 *
 * Descriptors: both operands K-major in a CuTe GMMA layout atom
 * (cute::GMMA::Layout_K_{INTER,SW32,SW64,SW128}_Atom), built with
 * cute::GMMA::make_gmma_desc<Major::K> on the k-step's sub-tile. 128-byte swizzled
 * tiles must start 1024-byte aligned.
 */
#pragma once

#include "element.cuh"

#if FMOE_HOST_EMU
#include <flashmoe_emu/sm90.h>
#else
#include <cute/arch/mma_sm90_gmma.hpp>
#endif
#include <cute/atom/mma_traits_sm90_gmma.hpp>

namespace flashmoe {
namespace sm90 {

#if !FMOE_HOST_EMU
FMOE_DEVICE uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// ------------------------------------------------------------------ mbarrier
FMOE_DEVICE void mbarrier_init(uint64_t* bar, uint32_t count) {
#if FMOE_HOST_EMU
  fmoe_emu::mbarrier_init(bar, count);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
#endif
}

/// Make initialised barriers visible to the other threads (and the async proxy).
FMOE_DEVICE void fence_mbarrier_init() {
#if !FMOE_HOST_EMU
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

FMOE_DEVICE void mbarrier_arrive(uint64_t* bar) {
#if FMOE_HOST_EMU
  fmoe_emu::mbarrier_arrive(bar);
#else
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
#endif
}

/// Arrive and declare `bytes` more transaction bytes for the current phase.
FMOE_DEVICE void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
#if FMOE_HOST_EMU
  fmoe_emu::mbarrier_arrive(bar, bytes);
#else
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes) : "memory");
#endif
}

FMOE_DEVICE void mbarrier_expect_tx(uint64_t* bar, uint32_t bytes) {
#if FMOE_HOST_EMU
  fmoe_emu::mbarrier_expect_tx(bar, bytes);
#else
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)),
               "r"(bytes) : "memory");
#endif
}

/// Complete `bytes` of the current phase's transactions (what a TMA load does as it lands).
FMOE_DEVICE void mbarrier_complete_tx(uint64_t* bar, uint32_t bytes) {
#if FMOE_HOST_EMU
  fmoe_emu::mbarrier_complete_tx(bar, bytes);
#else
  asm volatile("mbarrier.complete_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n"
               ::"r"(smem_u32(bar)), "r"(bytes) : "memory");
#endif
}

/// Whether the phase of this parity has completed (a bounded probe: loop on it).
FMOE_DEVICE bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
#if FMOE_HOST_EMU
  return fmoe_emu::mbarrier_try_wait_parity(bar, parity);
#else
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_u32(bar)), "r"(parity)
      : "memory");
  return done != 0u;
#endif
}

/// An arrival on `bar` once every cp.async this thread issued before has landed (noinc:
/// the barrier's init count must include these arrivals): how a producer hands over
/// the stages it fills with cp.async.
FMOE_DEVICE void cp_async_mbarrier_arrive_noinc(uint64_t* bar) {
#if FMOE_HOST_EMU
  fmoe_emu::cp_async_mbarrier_arrive_noinc(bar, {__FILE__, __LINE__, "cp.async.mbarrier.arrive"});
#else
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar))
               : "memory");
#endif
}

/// Order this thread's generic-proxy shared-memory stores before async-proxy reads
/// (wgmma operands, TMA stores) that follow a barrier.
FMOE_DEVICE void fence_proxy_async() {
#if FMOE_HOST_EMU
  fmoe_emu::fence_proxy_async();
#else
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// ------------------------------------------------------------------ TMA
/// A tensor map, as cuTensorMapEncodeTiled writes it (128 bytes; pass it to a kernel as
/// a `const __grid_constant__` parameter). The emulator reads its own encoding of the
/// same fields (host/tma.py).
struct alignas(64) TensorMap {
  unsigned long long opaque[16];
};

/// Load the box at (c0, c1) of a 2-D tensor map into shared memory at dst; its bytes
/// complete transactions on bar (declare them first with mbarrier_arrive_expect_tx).
FMOE_DEVICE void tma_load_2d(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1) {
#if FMOE_HOST_EMU
  const int coord[2] = {c0, c1};
  fmoe_emu::tma_load(dst, map, bar, 2, coord, {__FILE__, __LINE__, "cp.async.bulk.tensor.2d"});
#else
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4}], [%2];\n"
      ::"r"(smem_u32(dst)), "l"(map), "r"(smem_u32(bar)), "r"(c0), "r"(c1)
      : "memory");
#endif
}

FMOE_DEVICE void tma_load_3d(void* dst, const TensorMap* map, uint64_t* bar, int c0, int c1,
                             int c2) {
#if FMOE_HOST_EMU
  const int coord[3] = {c0, c1, c2};
  fmoe_emu::tma_load(dst, map, bar, 3, coord, {__FILE__, __LINE__, "cp.async.bulk.tensor.3d"});
#else
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%3, %4, %5}], [%2];\n"
      ::"r"(smem_u32(dst)), "l"(map), "r"(smem_u32(bar)), "r"(c0), "r"(c1), "r"(c2)
      : "memory");
#endif
}

// ------------------------------------------------------------------ wgmma
FMOE_DEVICE void wgmma_fence() {
#if FMOE_HOST_EMU
  fmoe_emu::wgmma_fence();
#else
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

FMOE_DEVICE void wgmma_commit() {
#if FMOE_HOST_EMU
  fmoe_emu::wgmma_commit();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

/// Wait until at most N committed groups of this thread's wgmma ops are in flight.
template <int N>
FMOE_DEVICE void wgmma_wait() {
  static_assert(N >= 0 && N <= 7, "wgmma.wait_group takes 0..7");
#if FMOE_HOST_EMU
  fmoe_emu::wgmma_wait(N);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

/// Keep the compiler from moving accesses of accumulator registers across wgmma
/// instructions (they are read and written asynchronously).
template <int R>
FMOE_DEVICE void fence_operands(float (&d)[R]) {
#if !FMOE_HOST_EMU
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

/// The CuTe SM90 GMMA op for an m64nNk16 (16-bit) or m64nNk8 (tf32) tile, both
/// operands K-major in shared memory, f32 accumulators.
template <int kDtype, int N>
struct GmmaOp;
#define FMOE_GMMA_OP(DT, N, NAME)                                                   \
  template <>                                                                       \
  struct GmmaOp<DT, N> {                                                            \
    using type = cute::SM90::GMMA::NAME<cute::GMMA::Major::K, cute::GMMA::Major::K>; \
  };
FMOE_GMMA_OP(gemm::kBFloat16, 64, MMA_64x64x16_F32BF16BF16_SS)
FMOE_GMMA_OP(gemm::kBFloat16, 128, MMA_64x128x16_F32BF16BF16_SS)
FMOE_GMMA_OP(gemm::kBFloat16, 256, MMA_64x256x16_F32BF16BF16_SS)
FMOE_GMMA_OP(gemm::kFloat16, 64, MMA_64x64x16_F32F16F16_SS)
FMOE_GMMA_OP(gemm::kFloat16, 128, MMA_64x128x16_F32F16F16_SS)
FMOE_GMMA_OP(gemm::kFloat16, 256, MMA_64x256x16_F32F16F16_SS)
#undef FMOE_GMMA_OP

#if !FMOE_HOST_EMU
template <class Op, int R, size_t... I>
FMOE_DEVICE void gmma_call(float (&d)[R], uint64_t da, uint64_t db, bool accumulate,
                           cuda::std::index_sequence<I...>) {
  Op::fma(da, db, d[I]..., accumulate ? cute::GMMA::ScaleOut::One : cute::GMMA::ScaleOut::Zero);
}
#endif

/// d (this thread's N / 2 accumulators) = A B^T (+ d when accumulate), A 64 x k and B
/// N x k in shared memory as the descriptors say (k = 16 elements of 16 bits). Async:
/// d may be read only after a wgmma_wait that retires this op's group.
template <int kDtype, int N>
FMOE_DEVICE void wgmma(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
#if FMOE_HOST_EMU
  constexpr auto type = kDtype == gemm::kBFloat16 ? fmoe_emu::GmmaType::BF16
                                                  : fmoe_emu::GmmaType::F16;
  fmoe_emu::wgmma_issue(d, N, type, desc_a, desc_b, accumulate,
                        {__FILE__, __LINE__, "wgmma.mma_async"});
#else
  gmma_call<typename GmmaOp<kDtype, N>::type>(d, desc_a, desc_b, accumulate,
                                              cuda::std::make_index_sequence<N / 2>{});
#endif
}

/// Descriptor of a K-major shared-memory tile (a CuTe tensor in a GMMA layout atom).
template <class Tensor>
FMOE_DEVICE uint64_t descriptor(const Tensor& t) {
  return uint64_t(cute::GMMA::make_gmma_desc<cute::GMMA::Major::K>(t));
}

/// Row and column of accumulator i of warpgroup thread t (m64nN, f32).
FMOE_DEVICE void acc_coord(int t, int i, int& m, int& n) {
  const int warp = t / 32, lane = t % 32;
  m = 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
  n = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
}

// ------------------------------------------------------------------ warps
/// elect.sync over the full warp: true in exactly one lane.
FMOE_DEVICE bool elect_one() {
#if FMOE_HOST_EMU
  return fmoe_emu::elect_one();
#else
  uint32_t pred;
  asm volatile(
      "{\n.reg .b32 r;\n.reg .pred p;\n"
      "elect.sync r|p, 0xffffffff;\n"
      "selp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(pred));
  return pred != 0u;
#endif
}

/// Raise (producer warpgroups lower) this warpgroup's register budget; the count must
/// be the same in every thread of the warpgroup.
template <int R>
FMOE_DEVICE void setmaxnreg_inc() {
#if FMOE_HOST_EMU
  fmoe_emu::setmaxnreg(R, {__FILE__, __LINE__, "setmaxnreg.inc"});
#else
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}

template <int R>
FMOE_DEVICE void setmaxnreg_dec() {
#if FMOE_HOST_EMU
  fmoe_emu::setmaxnreg(R, {__FILE__, __LINE__, "setmaxnreg.dec"});
#else
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}

}  // namespace sm90
}  // namespace flashmoe
