/**
 * @file tile_gemm.cuh
 * @brief One thread block computes one BM x BN tile of C = A * B^T on tensor cores.
 *
 * Both operands are K-major (rows of K contiguous elements). Rows are reached
 * through per-tile row-pointer tables in shared memory, which gives three things
 * for free: gathering token rows by index (dispatch without a copy), stacking rows
 * of two weight matrices into one B tile (the gated MLP's Wg and Wu side by side),
 * and zero rows past the end of a matrix (a null pointer).
 *
 * Data path (SM80 style, runs on Ampere and Hopper):
 *   global --cp.async (16 B, zero-fill predicated)--> swizzled shared memory,
 *   kStages-deep pipeline --ldmatrix--> registers --mma.sync (CuTe MMA atom)--> fp32.
 * The MMA atom and the copy path are chosen by Element<> and the layouts below; a
 * Hopper WGMMA/TMA path replaces this file's mainloop, not its interface.
 *
 * Shape rules: K is a multiple of 8 (whole 16-byte vectors), BM and BN multiples of
 * 32, BK 64 bytes or whole 128-byte shared-memory rows. Any M, N: tails read as zeros.
 *
 * Half tiles: a tile whose valid rows fit in its first BM / 2 (an expert's tail tile,
 * the last token tile) loads and multiplies only those, so routed rows cost compute in
 * 64-row steps, not 128. Each mainloop is a template on it (no branch in the loop).
 *
 * Weights by TMA (sm_90a, compute_tile_tma): a B tile that is rows of weight matrices
 * (an expert's, or the shared experts') arrives as TMA box loads from tensor maps the
 * host encoded, onto one mbarrier per stage, issued by one thread; the A rows (routed
 * tokens, gathered by index) still come by cp.async through the row table.
 */
#pragma once

#include "element.cuh"
#include "../wait.cuh"

// The mainloop: Hopper's wgmma where it can run (sm_90a builds), else mma.sync.
// FMOE_MAINLOOP (80 or 90) forces one: the CPU emulator has no arch and runs either.
#if defined(FMOE_MAINLOOP)
#define FMOE_SM90_MAINLOOP (FMOE_MAINLOOP == 90)
#elif defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FMOE_SM90_MAINLOOP 1
#else
#define FMOE_SM90_MAINLOOP 0
#endif
#if FMOE_SM90_MAINLOOP
#include "sm90.cuh"
#endif

namespace flashmoe {
namespace gemm {

/// A valid global address for predicated-off copies (they read nothing from it).
__device__ uint4 g_zero_source;

/// cp.async of one 16-byte vector; with pred false it writes zeros and reads nothing.
FMOE_DEVICE void cp_async_16(void* smem, const void* gmem, bool pred) {
  const void* src = pred ? gmem : static_cast<const void*>(&g_zero_source);
#if FMOE_HOST_EMU
  fmoe_emu::cp_async(smem, src, pred ? 16 : 0);
#else
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src),
               "r"(pred ? 16 : 0));
#endif
}
#if FMOE_HOST_EMU
FMOE_DEVICE void cp_async_commit() { fmoe_emu::cp_async_commit(); }
template <int N>
FMOE_DEVICE void cp_async_wait() { fmoe_emu::cp_async_wait(N); }
#else
FMOE_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
FMOE_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

/// Whether this build multiplies kDtype on wgmma (sm_90a mainloop, 16-bit operands):
/// the builds that take a tile's Hopper form (specs.py: TileConfig).
template <int kDtype>
constexpr bool kWgmmaDtype = FMOE_SM90_MAINLOOP && sizeof(typename Element<kDtype>::Operand) == 2;

template <int kDtype, int BM_, int BN_, int BK_, int kStages_>
struct TileGemm {
  using E = Element<kDtype>;
  using Storage = typename E::Storage;
  using T = typename E::Operand;
  static constexpr int BM = BM_, BN = BN_, BK = BK_, kStages = kStages_;
  static constexpr int kThreads = 128;
  static constexpr int kBytes = sizeof(T);
  static constexpr int kVec = 16 / kBytes;     // elements per 16-byte vector
  /// Bytes of K per swizzle span: 128, or 64 for a BK of 64 bytes (twice the stages in
  /// the same shared memory).
  static constexpr int kSpanBytes = BK * kBytes == 64 ? 64 : 128;
  static constexpr int kAtomK = kSpanBytes / kBytes;  // elements per span row
  static_assert(sizeof(Storage) == sizeof(T), "storage and operand types must match in size");
  static_assert(BK % kAtomK == 0, "BK must be 64 bytes or whole 128-byte shared-memory rows");
  static_assert(BM % 32 == 0 && BN % 32 == 0, "BM and BN must be multiples of 32");
  static_assert(kStages >= 2, "the pipeline needs at least two stages");
  /// The wgmma mainloop (16-bit operands, two m64 halves of a 128-row tile): the same
  /// cp.async pipeline fills the same swizzled stages (CuTe's GMMA K-major SW128 / SW64
  /// atom is this layout), one warpgroup reads them through descriptors.
  static constexpr bool kWgmma = FMOE_SM90_MAINLOOP && kBytes == 2 && BM == 128 &&
                                 (BN == 64 || BN == 128 || BN == 256) && BK % 16 == 0;

  // 128- (64-) byte swizzle: 8 rows of a span, its 16-byte chunks XOR-permuted by row,
  // so that cp.async writes and ldmatrix / wgmma reads are free of bank conflicts.
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<(kSpanBytes == 128 ? 3 : 2), (kBytes == 2 ? 3 : 2), 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kAtomK>>,
                   cute::Stride<cute::Int<kAtomK>, cute::_1>>{}));
  using LayoutA = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<BM>, cute::Int<BK>, cute::Int<kStages>>{}));
  using LayoutB = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<BN>, cute::Int<BK>, cute::Int<kStages>>{}));

  // 2x2 warps; the 32x32 permutation tile lets one ldmatrix.x4 feed each operand.
  using Mma = cute::TiledMMA<cute::MMA_Atom<typename E::MmaAtom>,
                             cute::Layout<cute::Shape<cute::_2, cute::_2, cute::_1>>,
                             cute::Tile<cute::_32, cute::_32, cute::Int<E::kMmaK>>>;
  using S2RAtom = cute::Copy_Atom<FMOE_ARCH_ATOM(SM75_U32x4_LDSM_N), T>;
  static_assert(cute::size(Mma{}) == kThreads, "the tiled MMA must use 128 threads");

  /// Rows of a half tile (a tile with at most this many valid rows).
  static constexpr int kHalfRows = BM / 2;

  static constexpr int kSmemA = BM * BK * kStages * kBytes;
  static constexpr int kSmemB = BN * BK * kStages * kBytes;
  static constexpr int kSmemPipe = kSmemA + kSmemB;
  static constexpr int kSmemRowTables = (BM + BN) * int(sizeof(const Storage*));
  /// Weights by TMA (compute_tile_tma): the wgmma mainloop's builds.
  static constexpr bool kTmaB = kWgmma;
  /// One mbarrier per stage (its B tile landed), then the word of their next parities.
  static constexpr int kSmemBarriers = kStages * 8 + 8;
  /// Shared memory one tile needs (pipeline, row tables, stage barriers); the output
  /// staging reuses the pipeline area.
  static constexpr int kSmemBytes = kSmemPipe + kSmemRowTables + kSmemBarriers;
  /// A box's inner extent in elements: one swizzle span of K.
  static constexpr int kBoxK = kAtomK;

  /**
   * Where a B tile comes from by TMA: `parts` (1 or 2) boxes of BN / parts rows side by
   * side, part p from tensor map map<p> (a flashmoe::sm90::TensorMap in global memory)
   * at rows n0.. of its dimension 1 and index e of its dimension 2; K in swizzle spans
   * of dimension 0. Rows and columns past the tensor's end load as zeros. A load that
   * never lands is reported to `site` as kPhaseTmaWait with `task`.
   */
  struct BTma {
    const void* map0;  // (named, not an array: a runtime index would put it in local memory)
    const void* map1;
    int parts;
    int n0;
    int e;
    const WaitSite* site;
    int task;
  };

  /// The stage barriers and their parity word, after the row tables.
  FMOE_DEVICE static uint64_t* stage_barriers(char* smem) {
    return reinterpret_cast<uint64_t*>(smem + kSmemPipe + kSmemRowTables);
  }
  FMOE_DEVICE static uint32_t* stage_parities(char* smem) {
    return reinterpret_cast<uint32_t*>(stage_barriers(smem) + kStages);
  }

  /// Once per block before its first compute_tile_tma, by one thread, then a barrier:
  /// the stage barriers (one arrival, the loading thread's, plus the bytes) and their
  /// parities. Nothing else may write that shared memory afterwards.
  FMOE_DEVICE static void init_stage_barriers(char* smem) {
#if FMOE_SM90_MAINLOOP
    if constexpr (kTmaB) {
      for (int s = 0; s < kStages; ++s) sm90::mbarrier_init(stage_barriers(smem) + s, 1u);
      *stage_parities(smem) = 0u;
      sm90::fence_mbarrier_init();
    }
#else
    (void)smem;
#endif
  }

  using Acc = decltype(cute::partition_fragment_C(Mma{}, cute::Shape<cute::Int<BM>, cute::Int<BN>>{}));

  /// Row-pointer tables, at the end of the tile's shared memory.
  FMOE_DEVICE static const Storage** rows_a(char* smem) {
    return reinterpret_cast<const Storage**>(smem + kSmemPipe);
  }
  FMOE_DEVICE static const Storage** rows_b(char* smem) { return rows_a(smem) + BM; }

  /// Element coordinates (m, n) of each accumulator entry of this thread.
  FMOE_DEVICE static auto acc_coords() {
    Mma mma;
    auto thr = mma.get_slice(threadIdx.x);
    return thr.partition_C(cute::make_identity_tensor(cute::Shape<cute::Int<BM>, cute::Int<BN>>{}));
  }

  /// One k-tile of both operands into stage `stage`; a half tile (full false) loads
  /// only the first kHalfRows A rows.
  FMOE_DEVICE static void load_stage(char* smem, int k_tile, int stage, int K, bool full) {
    using namespace cute;
    Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem)), LayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem + kSmemA)), LayoutB{});
    load_rows<BM>(sA, rows_a(smem), k_tile, stage, K, full);
    load_rows<BN>(sB, rows_b(smem), k_tile, stage, K, true);
  }

  /// One k-tile of kRows table rows (all = false: the first half only, the rest keep
  /// what they held) into stage `stage` of a swizzled operand buffer.
  template <int kRows, class SmemTensor>
  FMOE_DEVICE static void load_rows(SmemTensor& s, const Storage* const* rows, int k_tile,
                                    int stage, int K, bool all) {
    constexpr int kVecsPerRow = BK / kVec;
    constexpr int kIters = kRows * kVecsPerRow / kThreads;
    constexpr int kRowStep = kThreads / kVecsPerRow;  // rows between a thread's vectors
    // Iteration i covers whole rows, in order: the first half of them, the first rows.
    // Rows kRowStep apart are whole 8-row swizzle atoms apart (the atoms tile M first):
    // the same swizzle, kRowStep * kAtomK elements further on.
    static_assert(kThreads % kVecsPerRow == 0 && kIters % 2 == 0 && kRowStep % 8 == 0,
                  "half tiles by iteration; a thread's rows in one swizzle phase");
    // A thread's vectors: rows r0 + i kRowStep at column c, in every k-tile; the address
    // math is done once, and each vector adds constants.
    const int r0 = int(threadIdx.x) / kVecsPerRow;
    const int kc = k_tile * BK + (int(threadIdx.x) % kVecsPerRow) * kVec;
    const bool in_k = kc < K;
    T* dst = cute::raw_pointer_cast(&s(r0, kc - k_tile * BK, stage));
    CUTE_UNROLL
    for (int i = 0; i < kIters; ++i) {
      if (i >= kIters / 2 && !all) break;  // block-uniform
      const Storage* row = rows[r0 + i * kRowStep];
      const bool p = in_k && row != nullptr;
      cp_async_16(dst + i * kRowStep * kAtomK, p ? row + kc : nullptr, p);
    }
  }

  template <class Frag>
  FMOE_DEVICE static void round_tf32_frag(Frag&& f) {
    CUTE_UNROLL
    for (int i = 0; i < cute::size(f); ++i) {
      uint32_t& bits = reinterpret_cast<uint32_t&>(f(i));
      bits = tf32_rna_bits(__uint_as_float(bits));
    }
  }

  /// hi <- tf32(x), lo <- tf32(x - hi): x = hi + lo to ~22 bits (3xTF32).
  template <class Frag, class FragLo>
  FMOE_DEVICE static void split_tf32_frag(Frag&& hi, FragLo&& lo) {
    CUTE_UNROLL
    for (int i = 0; i < cute::size(hi); ++i) {
      uint32_t& h = reinterpret_cast<uint32_t&>(hi(i));
      const float x = __uint_as_float(h);
      const uint32_t big = tf32_rna_bits(x);
      reinterpret_cast<uint32_t&>(lo(i)) = tf32_rna_bits(x - __uint_as_float(big));
      h = big;
    }
  }

  /// The first half of mode 1 of a (V, M) or (V, M, N) fragment or partition: its
  /// m-blocks of 32 rows below BM / 2.
  template <class Tensor>
  FMOE_DEVICE static auto first_half(Tensor&& t) {
    using namespace cute;
    constexpr int kM = decltype(size<1>(t))::value;
    static_assert(kM * 32 == BM, "m-blocks of 32 rows: the first half is rows < BM / 2");
    if constexpr (decltype(rank(t))::value == 2) {
      return local_tile(t, Shape<Int<decltype(size<0>(t))::value>, Int<kM / 2>>{},
                        make_coord(0, 0));
    } else {
      return local_tile(t, Shape<Int<decltype(size<0>(t))::value>, Int<kM / 2>,
                                 Int<decltype(size<2>(t))::value>>{},
                        make_coord(0, 0, 0));
    }
  }

  /// acc += a b, over the first half's m-blocks only in a half tile (kFull false; its
  /// other accumulators stay as they were).
  template <bool kFull, class FragA, class FragB>
  FMOE_DEVICE static void mma_rows(FragA&& a, FragB&& b, Acc& acc) {
    Mma mma;
    if constexpr (kFull) {
      cute::gemm(mma, a, b, acc);
    } else {
      auto acc_half = first_half(acc);
      cute::gemm(mma, first_half(a), b, acc_half);
    }
  }

  /**
   * acc += A_tile * B_tile^T over K. The caller filled rows_a/rows_b (null rows are
   * zeros) and synchronised the block; kFull false: a half tile (A rows from kHalfRows
   * on are neither loaded nor multiplied). Leaves the pipeline drained and the block
   * synchronised, so shared memory may be reused at once.
   */
  template <bool kFull>
  FMOE_DEVICE static void mainloop(Acc& acc, char* smem, int K) {
    using namespace cute;
    Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem)), LayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem + kSmemA)), LayoutB{});

    Mma mma;
    auto thr_mma = mma.get_slice(threadIdx.x);
    Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
    Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));  // (MMA, MMA_N, MMA_K)
    auto s2r_a = make_tiled_copy_A(S2RAtom{}, mma);
    auto s2r_b = make_tiled_copy_B(S2RAtom{}, mma);
    auto thr_a = s2r_a.get_slice(threadIdx.x);
    auto thr_b = s2r_b.get_slice(threadIdx.x);
    Tensor tXsA = thr_a.partition_S(sA);   // (CPY, MMA_M, MMA_K, STAGE)
    Tensor tXrA = thr_a.retile_D(tCrA);    // (CPY, MMA_M, MMA_K)
    Tensor tXsB = thr_b.partition_S(sB);
    Tensor tXrB = thr_b.retile_D(tCrB);
    constexpr int kBlocks = decltype(size<2>(tCrA))::value;  // MMA k-steps per BK
    // A's fragments of k-step kb from stage st (a half tile's first half only).
    auto copy_a = [&](int kb, int st) {
      if constexpr (kFull) {
        copy(s2r_a, tXsA(_, _, kb, st), tXrA(_, _, kb));
      } else {
        auto dst = first_half(tXrA(_, _, kb));
        copy(s2r_a, first_half(tXsA(_, _, kb, st)), dst);
      }
    };

    const int num_k = (K + BK - 1) / BK;
    CUTE_UNROLL
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < num_k) load_stage(smem, s, s, K, kFull);
      cp_async_commit();
    }
    int next_k = kStages - 1;
    int read_stage = 0;              // next stage to consume (advanced when refilling)
    int write_stage = kStages - 1;   // stage the next cp.async batch fills
    int cur_stage = 0;               // stage the fragment copies read now

    cp_async_wait<kStages - 2>();
    __syncthreads();
    copy_a(0, cur_stage);
    copy(s2r_b, tXsB(_, _, 0, cur_stage), tXrB(_, _, 0));

    [[maybe_unused]] auto tCrA_lo = make_fragment_like(tCrA);
    [[maybe_unused]] auto tCrB_lo = make_fragment_like(tCrB);

    CUTE_NO_UNROLL
    for (int kt = 0; kt < num_k; ++kt) {
      CUTE_UNROLL
      for (int kb = 0; kb < kBlocks; ++kb) {
        if (kb == kBlocks - 1) {
          // Move to the next stage: it must have landed, and every thread must be done
          // reading the stage that the next cp.async batch overwrites.
          cur_stage = read_stage;
          cp_async_wait<kStages - 2>();
          __syncthreads();
        }
        const int kb_next = (kb + 1) % kBlocks;
        copy_a(kb_next, cur_stage);
        copy(s2r_b, tXsB(_, _, kb_next, cur_stage), tXrB(_, _, kb_next));
        if (kb == 0) {
          if (next_k < num_k) load_stage(smem, next_k, write_stage, K, kFull);
          cp_async_commit();
          ++next_k;
          write_stage = read_stage;
          read_stage = (read_stage + 1 == kStages) ? 0 : read_stage + 1;
        }
        if constexpr (kDtype == kFloat32) {
          split_tf32_frag(tCrA(_, _, kb), tCrA_lo(_, _, kb));
          split_tf32_frag(tCrB(_, _, kb), tCrB_lo(_, _, kb));
          mma_rows<kFull>(tCrA_lo(_, _, kb), tCrB(_, _, kb), acc);
          mma_rows<kFull>(tCrA(_, _, kb), tCrB_lo(_, _, kb), acc);
        } else if constexpr (kDtype == kTFloat32) {
          round_tf32_frag(tCrA(_, _, kb));
          round_tf32_frag(tCrB(_, _, kb));
        }
        mma_rows<kFull>(tCrA(_, _, kb), tCrB(_, _, kb), acc);
      }
    }
    cp_async_wait<0>();
    __syncthreads();
  }

#if FMOE_SM90_MAINLOOP
  /// The GMMA layout atom of the stages: CuTe's K-major atom of the span's swizzle.
  using GmmaAtom = cute::conditional_t<kSpanBytes == 128, cute::GMMA::Layout_K_SW128_Atom<T>,
                                       cute::GMMA::Layout_K_SW64_Atom<T>>;

  /// Byte offsets of a k16 step's sub-tile in the swizzled stages from stage 0's first:
  /// whole stages, m64 halves of 64 span rows (A), 32-byte steps within a span of K,
  /// spans of every row further on (CuTe's tile_to_shape order).
  FMOE_DEVICE static uint32_t a_offset(int stage, int h, int kb) {
    constexpr int kSteps = kAtomK / 16;  // k16 steps per span
    return uint32_t(stage * (BM * BK * kBytes) + h * (64 * kSpanBytes) +
                    (kb / kSteps) * (BM * kSpanBytes) + (kb % kSteps) * 32);
  }
  FMOE_DEVICE static uint32_t b_offset(int stage, int kb) {
    constexpr int kSteps = kAtomK / 16;
    return uint32_t(stage * (BN * BK * kBytes) + (kb / kSteps) * (BN * kSpanBytes) +
                    (kb % kSteps) * 32);
  }

  /// The descriptor of a sub-tile `bytes` past the one `base` describes: the same
  /// layout, its start address field (16-byte units, the low 14 bits; shared memory
  /// stays below 256 KiB, so no carry) moved on. Emulator builds check it against
  /// CuTe's descriptor of `tile`, the sub-tile it stands for.
  template <class Tile>
  FMOE_DEVICE static uint64_t desc_at(uint64_t base, uint32_t bytes, const Tile& tile) {
    // Only the low word changes (32-bit math: no carry chain into the high word).
    const uint64_t d = (base & 0xffffffff00000000ull) | uint32_t(uint32_t(base) + (bytes >> 4));
#if FMOE_HOST_EMU
    if (d != sm90::descriptor(tile)) {
      fmoe_emu::fatal("a wgmma descriptor moved on by a byte offset differs from CuTe's "
                      "descriptor of the same sub-tile");
    }
#else
    (void)tile;
#endif
    return d;
  }

  /// This thread's accumulators of the wgmma mainloop: [m64 half][BN / 2].
  using AccSm90 = float[BM / 64][BN / 2];

  /// What every wgmma mainloop starts from: the stages as CuTe GMMA tensors
  /// ([rows, k, stage], A then B), stage 0's first k16 descriptors (an m64 half of A,
  /// all of B; desc_at moves them on), and zeroed accumulators.
  FMOE_DEVICE static auto gmma_a(char* smem) {
    using namespace cute;
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem)),
                       tile_to_shape(GmmaAtom{}, Shape<Int<BM>, Int<BK>, Int<kStages>>{}));
  }
  FMOE_DEVICE static auto gmma_b(char* smem) {
    using namespace cute;
    return make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem + kSmemA)),
                       tile_to_shape(GmmaAtom{}, Shape<Int<BN>, Int<BK>, Int<kStages>>{}));
  }
  template <class TA>
  FMOE_DEVICE static uint64_t base_desc_a(const TA& gA) {
    using namespace cute;
    return sm90::descriptor(local_tile(gA(_, _, 0), Shape<_64, _16>{}, make_coord(0, 0)));
  }
  template <class TB>
  FMOE_DEVICE static uint64_t base_desc_b(const TB& gB) {
    using namespace cute;
    return sm90::descriptor(local_tile(gB(_, _, 0), Shape<Int<BN>, _16>{}, make_coord(0, 0)));
  }
  FMOE_DEVICE static void zero_acc(AccSm90& acc) {
    CUTE_UNROLL
    for (int h = 0; h < BM / 64; ++h) {
      CUTE_UNROLL
      for (int i = 0; i < BN / 2; ++i) acc[h][i] = 0.0f;
    }
  }

  /// One k-tile's wgmmas on stage `stage` (landed, the block met) as one committed
  /// group: BK / 16 k16 steps of kHalves m64 halves. Returns with this group in flight
  /// and the previous one retired.
  template <int kHalves, class TA, class TB>
  FMOE_DEVICE static void wgmma_k_tile(AccSm90& acc, const TA& gA, const TB& gB, uint64_t da0,
                                       uint64_t db0, int stage) {
    using namespace cute;
    sm90::wgmma_fence();
    CUTE_UNROLL
    for (int h = 0; h < BM / 64; ++h) sm90::fence_operands(acc[h]);
    CUTE_UNROLL
    for (int kb = 0; kb < BK / 16; ++kb) {
      const uint64_t db = desc_at(db0, b_offset(stage, kb),
          local_tile(gB(_, _, stage), Shape<Int<BN>, _16>{}, make_coord(0, kb)));
      CUTE_UNROLL
      for (int h = 0; h < kHalves; ++h) {
        const uint64_t da = desc_at(da0, a_offset(stage, h, kb),
            local_tile(gA(_, _, stage), Shape<_64, _16>{}, make_coord(h, kb)));
        sm90::wgmma<kDtype, BN>(acc[h], da, db, true);
      }
    }
    sm90::wgmma_commit();
    // This k-tile's group stays in flight; the previous one is retired, so its stage
    // may be refilled once every thread knows it.
    sm90::wgmma_wait<1>();
    CUTE_UNROLL
    for (int h = 0; h < BM / 64; ++h) sm90::fence_operands(acc[h]);
  }

  /**
   * acc += A_tile * B_tile^T over K with wgmma (kWgmma builds): per k-tile, once its
   * stage landed and the block met, one group of BK / 16 x 2 wgmmas reads the stage and
   * stays in flight while the previous k-tile's group is retired, the block meets
   * again, and the loads refill that group's stage (kStages - 1 k-tiles ahead). A half
   * tile (kFull false) loads and multiplies only the first m64 half. A template, not a
   * flag: a wgmma under a branch inside the loop makes ptxas serialise every wgmma.
   */
  template <bool kFull>
  FMOE_DEVICE static void mainloop_sm90(AccSm90& acc, char* smem, int K) {
    constexpr int kHalves = kFull ? BM / 64 : BM / 128;  // m64 halves multiplied
    using namespace cute;
    const auto gA = gmma_a(smem);
    const auto gB = gmma_b(smem);
    const uint64_t da0 = base_desc_a(gA), db0 = base_desc_b(gB);
    zero_acc(acc);
    const int num_k = (K + BK - 1) / BK;
    CUTE_UNROLL
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < num_k) load_stage(smem, s, s, K, kFull);
      cp_async_commit();
    }
    CUTE_NO_UNROLL
    for (int kt = 0; kt < num_k; ++kt) {
      const int stage = kt % kStages;
      cp_async_wait<kStages - 2>();
      // Each thread orders its own landed copies (generic proxy) before any wgmma's
      // async-proxy reads, then the block meets: the writer-side fence of the PTX model.
      sm90::fence_proxy_async();
      __syncthreads();  // the stage landed for every thread
      wgmma_k_tile<kHalves>(acc, gA, gB, da0, db0, stage);
      __syncthreads();
      const int next = kt + kStages - 1;
      if (next < num_k) load_stage(smem, next, next % kStages, K, kFull);
      cp_async_commit();
    }
    sm90::wgmma_wait<0>();
    CUTE_UNROLL
    for (int h = 0; h < BM / 64; ++h) sm90::fence_operands(acc[h]);
    cp_async_wait<0>();
    __syncthreads();
  }

  /// One thread: the B tile of k-tile k_tile into stage `stage` by TMA, its bytes
  /// declared on the stage's barrier first.
  FMOE_DEVICE static void load_stage_b_tma(char* smem, const BTma& b, int k_tile, int stage) {
    uint64_t* bar = stage_barriers(smem) + stage;
    sm90::mbarrier_arrive_expect_tx(bar, uint32_t(BN * BK * kBytes));
    // The stage's B buffer: 8-row swizzle atoms of a span down the rows, then spans of K.
    char* dst = smem + kSmemA + stage * (BN * BK * kBytes);
    const int k0 = k_tile * BK;
    CUTE_UNROLL
    for (int kb = 0; kb < BK / kBoxK; ++kb) {
      sm90::tma_load_3d(dst + kb * BN * kSpanBytes, static_cast<const sm90::TensorMap*>(b.map0),
                        bar, k0 + kb * kBoxK, b.n0, b.e);
      if (b.parts == 2) {  // the second half of the tile's rows
        sm90::tma_load_3d(dst + (kb * BN + BN / 2) * kSpanBytes,
                          static_cast<const sm90::TensorMap*>(b.map1), bar, k0 + kb * kBoxK,
                          b.n0, b.e);
      }
    }
  }

  /// Wait for the phase of this parity of `bar`; false after timeout_ns without it. A
  /// plain deadline bounds the spin: a stage's loads take microseconds and depend on no
  /// other block, so no progress stamps (and no call: a call would save the live
  /// accumulators to local memory).
  FMOE_DEVICE static bool wait_barrier(uint64_t* bar, uint32_t parity, uint64_t timeout_ns,
                                       const uint32_t* gone = nullptr) {
    if (__builtin_expect(sm90::mbarrier_try_wait_parity(bar, parity), 1)) return true;
    // (Another block's fault does not stop these loads landing: no need to watch it.
    // `gone`: a flag that, once set, means nobody will complete the phase.)
    const uint64_t start = global_timer_ns();
    while (!sm90::mbarrier_try_wait_parity(bar, parity)) {  // bounded: timeout_ns
      if (global_timer_ns() - start > timeout_ns) return false;
      if (gone != nullptr && flag_set(gone)) return false;
    }
    return true;
  }

  /// Wait for stage `stage`'s B tile (the barrier phase of this parity).
  FMOE_DEVICE static bool wait_stage_b(char* smem, uint32_t stage, uint32_t parity,
                                       const WaitSite& site) {
    return wait_barrier(stage_barriers(smem) + stage, parity, site.timeout_ns);
  }

  /**
   * mainloop_sm90 with the B tiles by TMA (b): per k-tile, once the thread's A copies
   * landed (cp.async) and its B tile's barrier phase completed, the block meets and one
   * group of wgmmas reads the stage; the stage is refilled (A by every thread, B by
   * thread 0) once the previous group retired and the block met again. The stage
   * parities carry over between calls in shared memory.
   */
  template <bool kFull>
  FMOE_DEVICE static void mainloop_sm90_tma(AccSm90& acc, char* smem, int K, const BTma& b) {
    constexpr int kHalves = kFull ? BM / 64 : BM / 128;
    using namespace cute;
    const auto gA = gmma_a(smem);
    const auto gB = gmma_b(smem);
    const uint64_t da0 = base_desc_a(gA), db0 = base_desc_b(gB);
    zero_acc(acc);
    const bool loader = threadIdx.x == 0;
    uint32_t parities = *stage_parities(smem);  // block-uniform
    const int num_k = (K + BK - 1) / BK;
    // This thread's A vectors (as load_rows): rows r0 + i kRowStep at column c0 of every
    // k-tile, their row pointers read from the table once, kept in registers.
    constexpr int kVecsPerRow = BK / kVec;
    constexpr int kIters = (kFull ? BM : kHalfRows) * kVecsPerRow / kThreads;
    constexpr int kRowStep = kThreads / kVecsPerRow;
    static_assert(kThreads % kVecsPerRow == 0 && kRowStep % 8 == 0,
                  "a thread's rows in one swizzle phase");
    const int r0 = int(threadIdx.x) / kVecsPerRow, c0 = (int(threadIdx.x) % kVecsPerRow) * kVec;
    const Storage* a_rows[kIters];
    CUTE_UNROLL
    for (int i = 0; i < kIters; ++i) a_rows[i] = rows_a(smem)[r0 + i * kRowStep];
    Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem)), LayoutA{});
    T* const a_dst = raw_pointer_cast(&sA(r0, c0, 0));
    auto load = [&](int k_tile, int stage) {
      const int kc = k_tile * BK + c0;
      const bool in_k = kc < K;
      T* dst = a_dst + stage * (BM * BK);
      CUTE_UNROLL
      for (int i = 0; i < kIters; ++i) {
        const bool p = in_k && a_rows[i] != nullptr;
        cp_async_16(dst + i * kRowStep * kAtomK, p ? a_rows[i] + kc : nullptr, p);
      }
      if (loader) load_stage_b_tma(smem, b, k_tile, stage);
    };
    CUTE_UNROLL
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < num_k) load(s, s);
      cp_async_commit();
    }
    bool landed = true;
    int lost = -1;  // the k-tile whose B tile never landed
    CUTE_NO_UNROLL
    for (int kt = 0; kt < num_k; ++kt) {
      const int stage = kt % kStages;
      cp_async_wait<kStages - 2>();
      // As mainloop_sm90: the thread's landed A copies (generic proxy) are ordered
      // before the wgmmas' async-proxy reads; the barrier's phase orders B's.
      sm90::fence_proxy_async();
      // A load that never lands: the loop runs out on poison (no further waits), the
      // fault is recorded after it and the caller's launch fails.
      if (landed && !wait_stage_b(smem, stage, (parities >> stage) & 1u, *b.site)) {
        landed = false;
        lost = kt;
      }
      parities ^= 1u << stage;
      __syncthreads();  // the stage landed for every thread
      wgmma_k_tile<kHalves>(acc, gA, gB, da0, db0, stage);
      __syncthreads();  // the previous group's stage is free in every thread
      const int next = kt + kStages - 1;
      if (next < num_k) load(next, next % kStages);
      cp_async_commit();
    }
    sm90::wgmma_wait<0>();
    CUTE_UNROLL
    for (int h = 0; h < BM / 64; ++h) sm90::fence_operands(acc[h]);
    cp_async_wait<0>();
    __syncthreads();
    if (loader) *stage_parities(smem) = parities;  // read again after the next barrier
    if (!landed) {
      report_fault(*b.site, abi::kTimeout, abi::kPhaseTmaWait, b.task, lost, num_k, -1,
                   b.site->timeout_ns);
    }
  }

  // ------------------------------------------------------------ warp-specialised
  // A warp-specialised block: the consumer warpgroup (threads 0 .. kThreads - 1) issues
  // the wgmmas and runs everything else of the kernel; one producer warp (the next 32
  // threads) fills the stages. Per stage a full barrier (the producer's cp.async
  // arrivals, lane 0's arrival with the TMA bytes) and an empty barrier (every consumer
  // thread once its wgmmas on the stage retired); the consumers post each tile to the
  // producer as a job on a third barrier. Stages and parities run on across tiles.

  static constexpr int kWsThreads = kThreads + 32;
  /// The consumers' named barrier (they are the kernel's body: its barrier).
  static constexpr int kConsumerBarrier = kBodyBarrier;
  /// Arrivals per full phase: 32 producer lanes' cp.async arrive-on, and lane 0's.
  static constexpr uint32_t kFullArrivals = 33;

  /// One tile for the producer: its A rows from rows_a, B rows from rows_b or (map0 set)
  /// by TMA as BTma describes them.
  struct WsJob {
    const void* map0;
    const void* map1;
    int parts, n0, e;
    int K;
    int full;  ///< 0: a half tile (A rows below kHalfRows only)
    int quit;  ///< 1: no more tiles; the producer returns
    int task;
  };
  struct WsState {
    uint64_t empty[kStages];
    uint64_t job;
    uint32_t stage, phase;  ///< the consumers' next stage and its full-barrier parity
    uint32_t gone;          ///< 1: the producer gave up (the consumers' waits stop)
    uint32_t pad;
    WsJob j;
  };
  static_assert(kSmemBytes % 8 == 0, "the warp-specialised state is 8-byte aligned");
  /// Shared memory of a warp-specialised tile: kSmemBytes, then the WsState.
  static constexpr int kSmemBytesWs = kSmemBytes + int(sizeof(WsState));
  FMOE_DEVICE static WsState* ws_state(char* smem) {
    return reinterpret_cast<WsState*>(smem + kSmemBytes);
  }

  /// Once per block, by one thread, before the block's first __syncthreads: the full,
  /// empty and job barriers and the consumers' stage.
  FMOE_DEVICE static void init_ws(char* smem) {
    WsState* ws = ws_state(smem);
    for (int s = 0; s < kStages; ++s) {
      sm90::mbarrier_init(stage_barriers(smem) + s, kFullArrivals);
      sm90::mbarrier_init(&ws->empty[s], uint32_t(kThreads));
    }
    sm90::mbarrier_init(&ws->job, 1u);
    ws->stage = 0u;
    ws->phase = 0u;
    ws->gone = 0u;
    sm90::fence_mbarrier_init();
  }

  /**
   * The producer warp (all 32 lanes): for each job the consumers post, its k-tiles into
   * the stages as they come free: lane 0 declares and issues the B boxes (TMA jobs) or
   * arrives, every lane issues its A rows (and B rows, no TMA) by cp.async and arrives
   * on the stage's full barrier once they land. Returns true at a quit job, false after
   * site.timeout_ns waiting for a free stage, or for a job without the kernel's progress
   * (reported: kPhaseStageFree), or at another block's fault.
   */
  FMOE_DEVICE static bool produce_ws(char* smem, const WaitSite& site) {
    using namespace cute;
    WsState* ws = ws_state(smem);
    Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem)), LayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<T*>(smem + kSmemA)), LayoutB{});
    const int lane = int(threadIdx.x) - kThreads;
    constexpr int kVecsPerRow = BK / kVec;
    uint32_t stage = 0, phase = 1;  // a fresh barrier's phase "-1" counts as complete
    uint32_t job_phase = 0;
    // The body may work for long between tiles (grid barriers, remote waits): the wait
    // for a job gives up only without progress, or at another block's fault, and allows
    // twice the body's time, so that a stalled body reports its own wait (the cause)
    // and posts the quit as it leaves; this one reports only a body that does neither.
    WaitSite idle = site;
    idle.timeout_ns = 2 * site.timeout_ns;
    for (int tiles = 0;; ++tiles) {  // bounded: every wait is, and the consumers end with a quit
      const bool posted = bounded_wait(
          idle, abi::kPhaseStageFree, -1, -1,
          [&] { return sm90::mbarrier_try_wait_parity(&ws->job, job_phase); },
          [&](int64_t& seen, int64_t& expected) {
            seen = tiles;
            expected = tiles + 1;
          });
      if (!posted) return give_up_ws(ws);
      job_phase ^= 1u;
      const WsJob j = ws->j;
      if (j.quit) return true;
      const bool tma = j.map0 != nullptr;
      // This lane's rows: lane + 32 i (a half tile: those below kHalfRows).
      const Storage* a_rows[BM / 32];
      const Storage* b_rows[BN / 32];
      CUTE_UNROLL
      for (int i = 0; i < BM / 32; ++i) a_rows[i] = rows_a(smem)[lane + 32 * i];
      CUTE_UNROLL
      for (int i = 0; i < BN / 32; ++i) b_rows[i] = tma ? nullptr : rows_b(smem)[lane + 32 * i];
      const int a_count = j.full ? BM / 32 : kHalfRows / 32;
      const BTma b{j.map0, j.map1, j.parts, j.n0, j.e, &site, j.task};
      const int num_k = (j.K + BK - 1) / BK;
      for (int kt = 0; kt < num_k; ++kt) {
        if (!wait_barrier(&ws->empty[stage], phase, site.timeout_ns, &ws->gone)) {
          if (!flag_set(&ws->gone)) {
            report_fault(site, abi::kTimeout, abi::kPhaseStageFree, j.task, kt, num_k, -1,
                         site.timeout_ns);
          }
          return give_up_ws(ws);
        }
        uint64_t* full = stage_barriers(smem) + stage;
        if (lane == 0) {
          if (tma) {
            // The stage's last generic writes (other lanes' cp.async of an earlier job, the
            // consumers' staging) came to this thread through the barriers: fence them
            // before the async proxy writes over them.
            sm90::fence_proxy_async();
            load_stage_b_tma(smem, b, kt, int(stage));
          } else {
            sm90::mbarrier_arrive(full);
          }
        }
        CUTE_UNROLL
        for (int i = 0; i < BM / 32; ++i) {
          if (i >= a_count) break;  // warp-uniform
          CUTE_UNROLL
          for (int c = 0; c < kVecsPerRow; ++c) {
            const int kc = kt * BK + c * kVec;
            const bool p = kc < j.K && a_rows[i] != nullptr;
            cp_async_16(raw_pointer_cast(&sA(lane + 32 * i, c * kVec, int(stage))),
                        p ? a_rows[i] + kc : nullptr, p);
          }
        }
        if (!tma) {
          CUTE_UNROLL
          for (int i = 0; i < BN / 32; ++i) {
            CUTE_UNROLL
            for (int c = 0; c < kVecsPerRow; ++c) {
              const int kc = kt * BK + c * kVec;
              const bool p = kc < j.K && b_rows[i] != nullptr;
              cp_async_16(raw_pointer_cast(&sB(lane + 32 * i, c * kVec, int(stage))),
                          p ? b_rows[i] + kc : nullptr, p);
            }
          }
        }
        sm90::cp_async_mbarrier_arrive_noinc(full);
        if (++stage == uint32_t(kStages)) {
          stage = 0;
          phase ^= 1u;
        }
      }
    }
  }

  /// The producer leaves without finishing: its consumers must not wait for it.
  FMOE_DEVICE static bool give_up_ws(WsState* ws) {
    set_flag(&ws->gone);
    return false;
  }

  /// Consumers: the producer has no more tiles (post once, before the consumers end).
  FMOE_DEVICE static void post_quit_ws(char* smem) {
    WsState* ws = ws_state(smem);
    named_sync(kConsumerBarrier, kThreads);
    if (threadIdx.x == 0) {
      ws->j.quit = 1;
      sm90::mbarrier_arrive(&ws->job);
    }
  }

  /// The consumers' side of one tile: per k-tile wait for the stage's full phase, fence
  /// the async proxy (the producer's cp.async rows are generic-proxy writes this thread
  /// acquired), issue its wgmmas, and once the previous k-tile's group retired free that
  /// stage. A stage that never fills: the loop stops there and false returns.
  template <bool kFull>
  FMOE_DEVICE static bool consume_ws(AccSm90& acc, char* smem, int K, const WaitSite& site,
                                     int task) {
    constexpr int kHalves = kFull ? BM / 64 : BM / 128;
    using namespace cute;
    const auto gA = gmma_a(smem);
    const auto gB = gmma_b(smem);
    const uint64_t da0 = base_desc_a(gA), db0 = base_desc_b(gB);
    zero_acc(acc);
    WsState* ws = ws_state(smem);
    uint32_t stage = ws->stage, phase = ws->phase;
    const int num_k = (K + BK - 1) / BK;
    const uint64_t timeout_ns = site.timeout_ns;  // in a register, not read in the loop
    bool landed = true;
    int lost = -1;
    int prev = -1;
    CUTE_NO_UNROLL
    for (int kt = 0; kt < num_k; ++kt) {
      if (!wait_barrier(stage_barriers(smem) + stage, phase, timeout_ns, &ws->gone)) {
        landed = false;  // the pipeline is abandoned: nothing more is read or freed
        lost = kt;
        break;
      }
      sm90::fence_proxy_async();
      wgmma_k_tile<kHalves>(acc, gA, gB, da0, db0, int(stage));
      if (prev >= 0) sm90::mbarrier_arrive(&ws->empty[prev]);
      prev = int(stage);
      if (++stage == uint32_t(kStages)) {
        stage = 0;
        phase ^= 1u;
      }
    }
    sm90::wgmma_wait<0>();
    CUTE_UNROLL
    for (int h = 0; h < BM / 64; ++h) sm90::fence_operands(acc[h]);
    if (prev >= 0 && landed) sm90::mbarrier_arrive(&ws->empty[prev]);
    named_sync(kConsumerBarrier, kThreads);  // every consumer read ws->stage
    if (threadIdx.x == 0) {
      ws->stage = stage;
      ws->phase = phase;
      // A stage that never filled leaves the barriers out of step: the producer and
      // the later tiles' waits stop at once (the caller leaves at the fault).
      if (!landed) set_flag(&ws->gone);
    }
    if (!landed) {
      report_fault(site, abi::kTimeout, abi::kPhaseTmaWait, task, lost, num_k, -1,
                   site.timeout_ns);
    }
    return landed;
  }

  /**
   * compute_tile for the consumer warpgroup of a warp-specialised block: the row
   * tables from a_row / b_row (b_row unused with b_tma: B by TMA as b says), the tile posted
   * to the producer warp, the product staged as compute_tile stages it (row stride
   * kStageLd), the consumers synchronised (named barrier; the producer runs on).
   */
  template <class ARow, class BRow>
  FMOE_DEVICE static const float* compute_tile_ws(char* smem, int K, ARow a_row, BRow b_row,
                                                  const BTma& b, bool b_tma,
                                                  const WaitSite& site, int task,
                                                  int rows = BM) {
    const Storage** ra = rows_a(smem);
    const Storage** rb = rows_b(smem);
    for (int r = threadIdx.x; r < BM; r += kThreads) ra[r] = a_row(r);
    if (!b_tma) {
      for (int r = threadIdx.x; r < BN; r += kThreads) rb[r] = b_row(r);
    }
    // This thread's earlier accesses of the stages (the last tile's staging and
    // epilogue) are ordered before the producer's TMA writes that refill them.
    sm90::fence_proxy_async();
    named_sync(kConsumerBarrier, kThreads);
    const bool full = rows > kHalfRows;
    if (threadIdx.x == 0) {
      WsState* ws = ws_state(smem);
      ws->j = WsJob{b_tma ? b.map0 : nullptr, b.map1, b.parts, b.n0, b.e, K, full ? 1 : 0, 0,
                    task};
      sm90::mbarrier_arrive(&ws->job);
    }
    AccSm90 acc;
    if (full) {
      consume_ws<true>(acc, smem, K, site, task);
    } else {
      consume_ws<false>(acc, smem, K, site, task);
    }
    const float* staged = stage_acc_sm90(acc, smem);
    named_sync(kConsumerBarrier, kThreads);
    return staged;
  }

  /// The wgmma accumulators as a row-major BM x BN float tile in shared memory.
  FMOE_DEVICE static float* stage_acc_sm90(const AccSm90& acc, char* smem) {
    float* staged = reinterpret_cast<float*>(smem);
    CUTE_UNROLL
    for (int h = 0; h < BM / 64; ++h) {
      CUTE_UNROLL
      for (int i = 0; i < BN / 2; ++i) {
        int m, n;
        sm90::acc_coord(int(threadIdx.x), i, m, n);
        staged[(64 * h + m) * kStageLd + n] = acc[h][i];
      }
    }
    return staged;
  }
#endif

  /**
   * The whole tile: fill the row tables from a_row(r) / b_row(r) (null: a zero row),
   * run the mainloop over K, stage the float32 result in shared memory and return it
   * (row stride kStageLd), with the block synchronised. `rows` (block-uniform): the
   * A rows the caller reads back (the others may hold anything); at most kHalfRows
   * makes a half tile where the mainloop has them.
   */
  template <class ARow, class BRow>
  FMOE_DEVICE static const float* compute_tile(char* smem, int K, ARow a_row, BRow b_row,
                                               int rows = BM) {
    const Storage** ra = rows_a(smem);
    const Storage** rb = rows_b(smem);
    for (int r = threadIdx.x; r < BM; r += kThreads) ra[r] = a_row(r);
    for (int r = threadIdx.x; r < BN; r += kThreads) rb[r] = b_row(r);
    __syncthreads();
    const float* staged;
#if FMOE_SM90_MAINLOOP
    if constexpr (kWgmma) {
      AccSm90 acc;
      if (rows > kHalfRows) {
        mainloop_sm90<true>(acc, smem, K);
      } else {
        mainloop_sm90<false>(acc, smem, K);
      }
      staged = stage_acc_sm90(acc, smem);
    } else
#endif
    {
      Acc acc;
      cute::clear(acc);
      if (rows > kHalfRows) {
        mainloop<true>(acc, smem, K);
      } else {
        mainloop<false>(acc, smem, K);
      }
      staged = stage_acc(acc, smem);
    }
    __syncthreads();
    return staged;
  }

  /**
   * compute_tile with the B rows by TMA from `b` where the build loads weights so
   * (kTmaB; init_stage_barriers ran), else from b_row exactly as compute_tile: the
   * two must describe the same rows.
   */
  template <class ARow, class BRow>
  FMOE_DEVICE static const float* compute_tile_tma(char* smem, int K, ARow a_row, BRow b_row,
                                                   const BTma& b, int rows = BM) {
#if FMOE_SM90_MAINLOOP
    if constexpr (kTmaB) {
      const Storage** ra = rows_a(smem);
      for (int r = threadIdx.x; r < BM; r += kThreads) ra[r] = a_row(r);
      // Each thread's earlier accesses of the stages (the last tile's staging and
      // epilogue) are ordered before the TMA writes that refill them.
      sm90::fence_proxy_async();
      __syncthreads();
      AccSm90 acc;
      if (rows > kHalfRows) {
        mainloop_sm90_tma<true>(acc, smem, K, b);
      } else {
        mainloop_sm90_tma<false>(acc, smem, K, b);
      }
      const float* staged = stage_acc_sm90(acc, smem);
      __syncthreads();
      return staged;
    } else {
      return compute_tile(smem, K, a_row, b_row, rows);
    }
#else
    (void)b;
    return compute_tile(smem, K, a_row, b_row, rows);
#endif
  }

  // ------------------------------------------------------------------ epilogue
  /// Floats per staged accumulator row (padding keeps rows in different banks).
  static constexpr int kStageLd = BN + 4;
  static constexpr int kSmemStage = BM * kStageLd * int(sizeof(float));
  static_assert(kSmemStage <= kSmemPipe, "the staged tile must fit in the pipeline's smem");

  /**
   * Write the float32 accumulators to shared memory as a row-major BM x BN tile
   * (row stride kStageLd). Call after mainloop; synchronise before reading it.
   */
  FMOE_DEVICE static float* stage_acc(const Acc& acc, char* smem) {
    float* staged = reinterpret_cast<float*>(smem);
    auto coords = acc_coords();
    CUTE_UNROLL
    for (int i = 0; i < cute::size(acc); ++i) {
      staged[cute::get<0>(coords(i)) * kStageLd + cute::get<1>(coords(i))] = acc(i);
    }
    return staged;
  }

  /**
   * Row-wise epilogue over a staged tile, 8 columns per step: f(r, c, v) receives 8
   * floats of row r from column c and writes them wherever they go. Columns c +
   * 0..7 are < n_cols; f decides what to do with rows and columns past the valid
   * ones. One loop, not unrolled per element, so heavy activations stay compact.
   */
  template <class F>
  FMOE_DEVICE static void for_each_row_chunk(const float* staged, int n_cols, F f) {
    const int chunks = n_cols / 8;
    for (int v = threadIdx.x; v < BM * chunks; v += kThreads) {
      const int r = v / chunks, c = (v % chunks) * 8;
      float vals[8];
      const float4 lo = *reinterpret_cast<const float4*>(staged + r * kStageLd + c);
      const float4 hi = *reinterpret_cast<const float4*>(staged + r * kStageLd + c + 4);
      vals[0] = lo.x; vals[1] = lo.y; vals[2] = lo.z; vals[3] = lo.w;
      vals[4] = hi.x; vals[5] = hi.y; vals[6] = hi.z; vals[7] = hi.w;
      f(r, c, vals);
    }
  }
};

}  // namespace gemm
}  // namespace flashmoe
