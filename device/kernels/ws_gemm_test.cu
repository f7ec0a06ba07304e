/**
 * @file ws_gemm_test.cu
 * @brief Kernel-level test of the warp-specialised sm_90a mainloop
 *        (TileGemm::compute_tile_ws / produce_ws): C = A[a_index] B^T in float32.
 *
 * A persistent grid: block b takes the 128 x 128 tiles b, b + grid, ... (m-tiles
 * first), so the producer warp gets several jobs and the stages and parities run on
 * across tiles. A rows are gathered through a_index (no index: row m), B rows come by
 * cp.async through the row table or, with use_tma, by TMA from tma_b (a 3-D map
 * {K, N, 1}, a box of one swizzle span by 128 rows: 128 bytes and 128-byte swizzle, or
 * 64 and 64 for a BK of 32). A tile with at most 64 valid rows is a half tile. Waits
 * give up after timeout_ns into `record`.
 *
 * Launch contract: grid <= tiles, block 160 (a consumer warpgroup, then the producer
 * warp); dynamic shared memory flashmoe_ws_gemm_test_smem bytes. Compile-time:
 * FMOE_DTYPE (2 bfloat16, 3 float16), FMOE_STAGES, FMOE_BK (64 or 32; default 64).
 * sm_90a only (FMOE_MAINLOOP=90 in emulator builds).
 */
#include <flashmoe/gemm/tile_gemm.cuh>

#if !defined(FMOE_DTYPE) || !defined(FMOE_STAGES)
#error "FMOE_DTYPE and FMOE_STAGES must be defined"
#endif
#ifndef FMOE_BK
#define FMOE_BK 64
#endif
#if !FMOE_SM90_MAINLOOP
#error "the warp-specialised mainloop is sm_90a's (emulator builds: FMOE_MAINLOOP=90)"
#endif

using G = flashmoe::gemm::TileGemm<FMOE_DTYPE, 128, 128, FMOE_BK, FMOE_STAGES>;
using S = G::Storage;
static_assert(G::kWgmma && G::kTmaB, "16-bit operands on wgmma");

extern "C" __device__ const int flashmoe_ws_gemm_test_smem = G::kSmemBytesWs;

extern "C" __global__ void __launch_bounds__(G::kWsThreads)
flashmoe_ws_gemm_test(const S* __restrict__ A, const int* __restrict__ a_index,
                      const S* __restrict__ B, float* __restrict__ C, int M, int N, int K,
                      const __grid_constant__ flashmoe::sm90::TensorMap tma_b, int use_tma,
                      flashmoe::abi::FaultRecord* record, unsigned long long timeout_ns) {
  extern __shared__ __align__(1024) char smem[];
  const flashmoe::WaitSite site{record, timeout_ns, 0, 0u, nullptr, 1};
  if (threadIdx.x == 0) G::init_ws(smem);
  __syncthreads();  // the only whole-block barrier: the roles part here
  if (int(threadIdx.x) >= G::kThreads) {
    G::produce_ws(smem, site);
    return;
  }
  const int m_tiles = (M + G::BM - 1) / G::BM;
  const int tiles = m_tiles * ((N + G::BN - 1) / G::BN);
  for (int t = blockIdx.x; t < tiles; t += gridDim.x) {
    const int m0 = (t % m_tiles) * G::BM, n0 = (t / m_tiles) * G::BN;
    const G::BTma b{&tma_b, nullptr, 1, n0, 0, &site, t};
    const float* staged = G::compute_tile_ws(
        smem, K,
        [&](int r) -> const S* {
          const int m = m0 + r;
          return m < M ? A + int64_t(a_index ? a_index[m] : m) * K : nullptr;
        },
        [&](int r) -> const S* {
          const int n = n0 + r;
          return n < N ? B + int64_t(n) * K : nullptr;
        },
        b, use_tma != 0, site, t, min(G::BM, M - m0));
    for (int v = threadIdx.x; v < G::BM * G::BN; v += G::kThreads) {
      const int r = v / G::BN, c = v % G::BN;
      if (m0 + r < M && n0 + c < N) C[int64_t(m0 + r) * N + n0 + c] = staged[r * G::kStageLd + c];
    }
  }
  G::post_quit_ws(smem);
}
