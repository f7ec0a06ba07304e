/**
 * @file tile_gemm.cu
 * @brief Stand-alone tile GEMM over whole matrices: the expert FFN's building block,
 *        exercised on its own by the kernel tests and the unfused baseline.
 *
 * C[M, N] = act(A[M, K] B[N, K]^T + bias[N])            (gated = 0)
 * C[M, N] = act(A Bg^T) * (A Bu^T),  B = [Bg; Bu] (2N x K)  (gated = 1)
 * A rows may be gathered: row m of the product is A[a_index[m]] when a_index is set.
 * Accumulation in float32; the result is rounded to the storage type.
 *
 * Launch contract: block 128 threads; grid (ceil(M / BM), ceil(N / tile_n)) with
 * tile_n = BN (or BN / 2 when gated); dynamic shared memory flashmoe_tile_gemm_smem
 * bytes (opt-in above 48 KiB). Compile-time: FMOE_DTYPE, FMOE_BM, FMOE_BN, FMOE_BK,
 * FMOE_STAGES.
 */
#include <flashmoe/gemm/tile_gemm.cuh>

#ifndef FMOE_DTYPE
#error "FMOE_DTYPE must be defined (0 float32, 1 tfloat32, 2 bfloat16, 3 float16)"
#endif

using G = flashmoe::gemm::TileGemm<FMOE_DTYPE, FMOE_BM, FMOE_BN, FMOE_BK, FMOE_STAGES>;
using S = G::Storage;
using Elem = G::E;

/// Dynamic shared memory the kernel needs, read by the host from the module.
extern "C" __device__ const int flashmoe_tile_gemm_smem = G::kSmemBytes;

extern "C" __global__ void __launch_bounds__(128)
flashmoe_tile_gemm(const S* __restrict__ A, const int* __restrict__ a_index,
                   const S* __restrict__ B, const S* __restrict__ bias, S* __restrict__ C,
                   int M, int N, int K, int act, int gated) {
  using namespace cute;
  extern __shared__ __align__(1024) char smem[];  // wgmma's swizzled tiles
  const int tile_n = gated ? G::BN / 2 : G::BN;
  const int m0 = blockIdx.x * G::BM;
  const int n0 = blockIdx.y * tile_n;

  const float* staged = G::compute_tile(
      smem, K,
      [&](int r) -> const S* {
        const int m = m0 + r;
        return m < M ? A + int64_t(a_index ? a_index[m] : m) * K : nullptr;
      },
      [&](int r) -> const S* {
        const int half = r / tile_n;  // gated: 0 = Bg rows, 1 = Bu rows
        const int n = n0 + r % tile_n;
        return n < N ? B + (int64_t(half) * N + n) * K : nullptr;
      }, min(G::BM, M - m0));

  // Epilogue: bias, activation (and gate), rounding and 16-byte stores, row by row.
  G::for_each_row_chunk(staged, tile_n, [&](int r, int c, float (&v)[8]) {
    const int m = m0 + r, n = n0 + c;
    if (m >= M || n >= N) return;
    if (gated) {
      const float* u = staged + r * G::kStageLd + c + tile_n;
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = flashmoe::gemm::activate_dyn(act, v[j]) * u[j];
    } else {
      float b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      if (bias != nullptr) flashmoe::gemm::load8<Elem>(bias + n, b);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = flashmoe::gemm::activate_dyn(act, v[j] + b[j]);
    }
    flashmoe::gemm::store8<Elem>(C + int64_t(m) * N + n, v);
  });
}
