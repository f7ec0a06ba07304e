// Emulator build of kernels/ws_gemm_test.cu (the warp-specialised mainloop), unchanged
// source.
#include <flashmoe_emu/runtime.h>

#include "kernels/ws_gemm_test.cu"

#include <flashmoe_emu/entry.h>

// The kernel's `extern __shared__ char smem[]`: one copy per block, aligned as 128-byte
// swizzled operand tiles need.
alignas(1024) thread_local char smem[G::kSmemBytesWs];

FMOE_EMU_EXPORT int emu_ws_gemm_test_smem() { return flashmoe_ws_gemm_test_smem; }

/// Launch contract of kernels/ws_gemm_test.cu: `grid` blocks of 160 threads.
FMOE_EMU_EXPORT int emu_ws_gemm_test(int grid, const S* A, const int* a_index, const S* B,
                                     float* C, int M, int N, int K,
                                     const flashmoe::sm90::TensorMap* tma_b, int use_tma,
                                     flashmoe::abi::FaultRecord* record,
                                     unsigned long long timeout_ns) {
  const bool ok = fmoe_emu::launch(
      1, dim3(unsigned(grid)), dim3(unsigned(G::kWsThreads)),
      [&](int) {
        flashmoe_ws_gemm_test(A, a_index, B, C, M, N, K, *tma_b, use_tma, record, timeout_ns);
      },
      [](int) { emu_block_start(smem, sizeof smem); });
  return ok ? 0 : 1;
}
