/**
 * @file gmma_test.cu
 * @brief Kernel-level test of the sm_90a building blocks (gemm/sm90.cuh): one
 *        warpgroup computes C[64, N] = A[64, K] B[N, K]^T with wgmma.mma_async on
 *        shared-memory descriptors, handing each k-tile over with an mbarrier.
 *
 * Per k-tile of 64: every thread stores its share of both operand tiles into a CuTe
 * GMMA K-major layout (swizzle FMOE_SWIZZLE: 0 interleaved, 1 32-, 2 64-, 3 128-byte),
 * fences the async proxy and arrives on the barrier (thread 0 with a transaction
 * count it then completes, so the phase needs both); all wait on the phase's parity,
 * fence, issue four k16 wgmmas as one group, wait for it and meet before the tiles are
 * overwritten. With use_tma, thread 0 instead loads both tiles with TMA (tma_a: A as a
 * [64, K] map, tma_b: B as [N, K], boxes of one swizzle span by the tile's rows, in the
 * layout's swizzle) onto a barrier of one arrival and the tiles' bytes.
 * `probe` (9 words) records mbarrier answers of a fixed sequence, run by
 * thread 0 on a second barrier first (see tests/test_sm90.py for the expected ones),
 * and word 8 a k-tile barrier that never completed.
 *
 * Launch contract: grid 1, block 128; dynamic shared memory flashmoe_gmma_test_smem
 * bytes. Compile-time: FMOE_DTYPE (2 bfloat16, 3 float16), FMOE_N (64, 128, 256),
 * FMOE_SWIZZLE. sm_90a only.
 */
#include <flashmoe/gemm/sm90.cuh>

#if !defined(FMOE_DTYPE) || !defined(FMOE_N) || !defined(FMOE_SWIZZLE)
#error "FMOE_DTYPE, FMOE_N and FMOE_SWIZZLE must be defined"
#endif

namespace {
using namespace cute;
using Elem = flashmoe::gemm::Element<FMOE_DTYPE>;
using T = Elem::Storage;
constexpr int kN = FMOE_N;
constexpr int kBK = 64;

template <int kSwizzle>
struct AtomOf;
template <> struct AtomOf<0> { using type = GMMA::Layout_K_INTER_Atom<T>; };
template <> struct AtomOf<1> { using type = GMMA::Layout_K_SW32_Atom<T>; };
template <> struct AtomOf<2> { using type = GMMA::Layout_K_SW64_Atom<T>; };
template <> struct AtomOf<3> { using type = GMMA::Layout_K_SW128_Atom<T>; };
using Atom = typename AtomOf<FMOE_SWIZZLE>::type;
using LayoutA = decltype(tile_to_shape(Atom{}, Shape<_64, Int<kBK>>{}));
using LayoutB = decltype(tile_to_shape(Atom{}, Shape<Int<kN>, Int<kBK>>{}));
constexpr int kSmemA = int(cosize(LayoutA{})) * int(sizeof(T));
constexpr int kSmemB = int(cosize(LayoutB{})) * int(sizeof(T));
}  // namespace

// TMA mode: one box row per swizzle span, boxes side by side along K as the layout atoms
// tile a k-tile (interleaved tiles have no TMA mode here).
constexpr int kSpan = FMOE_SWIZZLE == 0 ? 128 : (16 << FMOE_SWIZZLE);
constexpr int kBoxK = kSpan / int(sizeof(T));
constexpr int kBoxes = kBK / kBoxK;

extern "C" __device__ const int flashmoe_gmma_test_smem = kSmemA + kSmemB;

extern "C" __global__ void __launch_bounds__(128)
flashmoe_gmma_test(const T* __restrict__ A, const T* __restrict__ B, float* __restrict__ C,
                   int K, uint32_t* __restrict__ probe,
                   const __grid_constant__ flashmoe::sm90::TensorMap tma_a,
                   const __grid_constant__ flashmoe::sm90::TensorMap tma_b, int use_tma) {
  namespace sm90 = flashmoe::sm90;
  extern __shared__ __align__(1024) char smem[];
  __shared__ __align__(8) uint64_t bar, full, probe_bar;
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem)), LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem + kSmemA)), LayoutB{});
  const int tid = int(threadIdx.x);

  if (tid == 0) {
    // Fixed sequence on a barrier of two arrivals (answers 1 = phase complete).
    sm90::mbarrier_init(&probe_bar, 2);
    probe[0] = sm90::mbarrier_try_wait_parity(&probe_bar, 0);  // phase 0 open
    probe[1] = sm90::mbarrier_try_wait_parity(&probe_bar, 1);  // "phase -1": complete
    sm90::mbarrier_arrive(&probe_bar);
    probe[2] = sm90::mbarrier_try_wait_parity(&probe_bar, 0);  // one arrival missing
    sm90::mbarrier_arrive_expect_tx(&probe_bar, 32);
    probe[3] = sm90::mbarrier_try_wait_parity(&probe_bar, 0);  // 32 bytes outstanding
    sm90::mbarrier_complete_tx(&probe_bar, 32);
    probe[4] = sm90::mbarrier_try_wait_parity(&probe_bar, 0);  // phase 0 done
    probe[5] = sm90::mbarrier_try_wait_parity(&probe_bar, 1);  // phase 1 open
    sm90::mbarrier_arrive(&probe_bar);
    sm90::mbarrier_arrive(&probe_bar);
    probe[6] = sm90::mbarrier_try_wait_parity(&probe_bar, 1);  // phase 1 done
    probe[7] = sm90::elect_one();
    sm90::mbarrier_init(&bar, 128);
    sm90::mbarrier_init(&full, 1);  // TMA mode: the producer's arrival plus the bytes
    sm90::fence_mbarrier_init();
  }
  __syncthreads();

  float d[kN / 2];
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) d[i] = 0.0f;
  for (int kt = 0; kt < K / kBK; ++kt) {
    const int k0 = kt * kBK;
    uint64_t* ready = use_tma ? &full : &bar;
    if (use_tma) {
      if (tid == 0) {  // the producer: both tiles' bytes on one phase
        sm90::mbarrier_arrive_expect_tx(&full, uint32_t((64 + kN) * kBK * sizeof(T)));
        for (int j = 0; j < kBoxes; ++j) {
          sm90::tma_load_2d(smem + j * 64 * kSpan, &tma_a, &full, k0 + j * kBoxK, 0);
          sm90::tma_load_2d(smem + kSmemA + j * kN * kSpan, &tma_b, &full, k0 + j * kBoxK, 0);
        }
      }
    } else {
      for (int i = tid; i < 64 * kBK; i += 128) {
        sA(i / kBK, i % kBK) = A[(i / kBK) * K + k0 + i % kBK];
      }
      for (int i = tid; i < kN * kBK; i += 128) {
        sB(i / kBK, i % kBK) = B[(i / kBK) * K + k0 + i % kBK];
      }
      sm90::fence_proxy_async();
      if (tid == 0) {
        sm90::mbarrier_arrive_expect_tx(&bar, 16);
        sm90::mbarrier_complete_tx(&bar, 16);
      } else {
        sm90::mbarrier_arrive(&bar);
      }
    }
    // A phase that never completes leaves probe[8] set, not a hung GPU.
    const uint64_t deadline = flashmoe::global_timer_ns() + 500000000ull;
    while (!sm90::mbarrier_try_wait_parity(ready, uint32_t(kt & 1))) {  // bounded: 0.5 s
      if (flashmoe::global_timer_ns() > deadline) {
        probe[8] = 1u;
        break;
      }
    }
    sm90::wgmma_fence();
    sm90::fence_operands(d);
#pragma unroll
    for (int kb = 0; kb < kBK / 16; ++kb) {
      const auto a = local_tile(sA, Shape<_64, _16>{}, make_coord(0, kb));
      const auto b = local_tile(sB, Shape<Int<kN>, _16>{}, make_coord(0, kb));
      const uint64_t da = sm90::descriptor(a), db = sm90::descriptor(b);
      sm90::wgmma<FMOE_DTYPE, kN>(d, da, db, kt > 0 || kb > 0);
    }
    sm90::wgmma_commit();
    sm90::wgmma_wait<0>();
    sm90::fence_operands(d);
    __syncthreads();  // every wgmma read this k-tile before the next one overwrites it
  }
#pragma unroll
  for (int i = 0; i < kN / 2; ++i) {
    int m, n;
    sm90::acc_coord(tid, i, m, n);
    C[m * kN + n] = d[i];
  }
}
