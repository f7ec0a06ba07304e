// Emulator build of kernels/tile_gemm.cu (the stand-alone tile GEMM), unchanged source.
#include <flashmoe_emu/runtime.h>

#include "kernels/tile_gemm.cu"

#include <flashmoe_emu/entry.h>

// The kernel's `extern __shared__ char smem[]`: one copy per block.
alignas(1024) thread_local char smem[G::kSmemBytes];

FMOE_EMU_EXPORT int emu_tile_gemm_smem() { return flashmoe_tile_gemm_smem; }

/// Launch contract of kernels/tile_gemm.cu: grid (ceil(M / BM), ceil(N / tile_n)).
FMOE_EMU_EXPORT int emu_tile_gemm(const S* A, const int* a_index, const S* B, const S* bias, S* C,
                                  int M, int N, int K, int act, int gated) {
  const int tile_n = gated ? G::BN / 2 : G::BN;
  const dim3 grid(unsigned((M + G::BM - 1) / G::BM), unsigned((N + tile_n - 1) / tile_n));
  const bool ok = fmoe_emu::launch(
      1, grid, dim3(128),
      [&](int) { flashmoe_tile_gemm(A, a_index, B, bias, C, M, N, K, act, gated); },
      [](int) { emu_block_start(smem, sizeof smem); });
  return ok ? 0 : 1;
}
