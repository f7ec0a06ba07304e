// Emulator build of kernels/gmma_test.cu (the sm_90a building blocks), unchanged source.
#define FMOE_EMU_SM90 1
#include <flashmoe_emu/runtime.h>

#include "kernels/gmma_test.cu"

#include <flashmoe_emu/entry.h>
#include <flashmoe_emu/sm90.h>

// The kernel's `extern __shared__ char smem[]`: one copy per block, aligned as 128-byte
// swizzled operand tiles need.
alignas(1024) thread_local char smem[kSmemA + kSmemB];

FMOE_EMU_EXPORT int emu_gmma_test_smem() { return flashmoe_gmma_test_smem; }

/// Disagreements of the emulated descriptors and accumulator layout with CuTe's.
FMOE_EMU_EXPORT int emu_gmma_layout_mismatches() { return fmoe_emu::gmma_layout_mismatches(); }

/// Launch contract of kernels/gmma_test.cu: one block of one warpgroup.
FMOE_EMU_EXPORT int emu_gmma_test(const T* A, const T* B, float* C, int K, uint32_t* probe,
                                  const flashmoe::sm90::TensorMap* tma_a,
                                  const flashmoe::sm90::TensorMap* tma_b, int use_tma) {
  const bool ok = fmoe_emu::launch(
      1, dim3(1), dim3(128),
      [&](int) { flashmoe_gmma_test(A, B, C, K, probe, *tma_a, *tma_b, use_tma); },
      [](int) {
        emu_poison(smem, sizeof smem);
        fmoe_emu::sm90_block_start(smem, sizeof smem);
      });
  return ok ? 0 : 1;
}
