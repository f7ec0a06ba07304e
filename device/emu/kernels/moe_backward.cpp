// Emulator build of kernels/moe_backward.cu (the fused MoE backward), unchanged source.
#include <flashmoe_emu/runtime.h>

#include "kernels/moe_backward.cu"

#include <flashmoe_emu/entry.h>

/// Most PEs one emulated launch serves (sizes the peer tables in shared memory).
constexpr int kEmuMaxWorld = 64;

// backward()'s `extern __shared__ char smem[]`: its tables, then the two peer prefix
// tables expert parallelism adds (2 * (world + 1) ints).
namespace flashmoe {
namespace moe {
alignas(1024) thread_local char smem[Backward<BwdCfg>::kSmemBytes + 2 * (kEmuMaxWorld + 1) * 4];
}  // namespace moe
}  // namespace flashmoe

FMOE_EMU_EXPORT int emu_moe_backward_smem() { return flashmoe_moe_backward_smem; }
FMOE_EMU_EXPORT unsigned emu_moe_backward_abi() { return flashmoe_moe_backward_abi; }

/**
 * One launch of the backward kernel on `pes` PEs at once. Per PE p: fwd[p], bwd[p],
 * x[p], dy[p], dx[p], tokens[p]; grads[15 p .. 15 p + 14] are its gradient pointers in
 * abi::BwdGrad order; launched[p] == 0 leaves PE p out (an absent rank). heaps[p]
 * is PE p's symmetric heap (expert parallelism only; every heap holds heap_bytes).
 */
FMOE_EMU_EXPORT int emu_moe_backward(int pes, const flashmoe::abi::MoeLayout* const* fwd,
                                     const flashmoe::abi::MoeBackwardLayout* const* bwd,
                                     const BwdS* const* x, const BwdS* const* dy,
                                     BwdS* const* dx, float* const* grads, const int* tokens,
                                     const int* launched, int flags, int grid,
                                     char* const* heaps, unsigned long long heap_bytes) {
  if (pes < 1 || pes > kEmuMaxWorld) {
    fmoe_emu::record_error("emulator: " + std::to_string(pes) + " PEs; 1.." +
                           std::to_string(kEmuMaxWorld) + " are supported");
    return 1;
  }
#if FLASHMOE_NVSHMEM
  fmoe_emu::ShmemWorld& w = fmoe_emu::shmem_world();
  w.npes = pes;
  w.base.assign(heaps, heaps + pes);
  w.bytes = size_t(heap_bytes);
#else
  (void)heaps;
  (void)heap_bytes;
#endif
  const bool ok = fmoe_emu::launch(
      pes, dim3(unsigned(grid)), dim3(128),
      [&](int pe) {
        if (!launched[pe]) return;
        float* const* g = grads + flashmoe::abi::kGradPointers * pe;
        flashmoe_moe_backward(fwd[pe], bwd[pe], x[pe], dy[pe], dx[pe], g[0], g[1], g[2], g[3],
                              g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13],
                              g[14], tokens[pe], flags);
      },
      [](int) { emu_block_start(flashmoe::moe::smem, sizeof flashmoe::moe::smem); });
  return ok ? 0 : 1;
}
