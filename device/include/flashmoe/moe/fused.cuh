/**
 * @file fused.cuh
 * @brief The persistent fused MoE forward: gate, dispatch, expert FFN, combine, on one
 *        GPU or across GPUs (expert parallelism over NVSHMEM).
 *
 * Protocol, task formats and ordering rules: docs/design.md. Every block runs every
 * phase; phases are separated by grid barriers; the last phase is a task loop in
 * which blocks claim tile tasks and publish the tasks they unblock. With expert
 * parallelism the last block is the subscriber: it turns signals from peers into tasks.
 */
#pragma once

#include "../gemm/tile_gemm.cuh"
#include "../sync.cuh"
#if FLASHMOE_NVSHMEM
#include "../shmem.cuh"
#endif

namespace flashmoe {
namespace moe {

/// Routing rules (flashmoe_core.config documents each; the defaults are a softmax over
/// all experts, then top-k by probability).
template <bool kSigmoid_ = false, bool kSoftmaxAfterTopk_ = false, bool kRouterBias_ = false,
          bool kSelectionBias_ = false, int kGroups_ = 1, int kTopkGroups_ = 1,
          uint32_t kScaleBits_ = 0x3f800000u, bool kRoundLogits_ = false,
          bool kSlotMajor_ = false, bool kDropRenorm_ = false>
struct Route {
  static constexpr bool kSigmoid = kSigmoid_, kSoftmaxAfterTopk = kSoftmaxAfterTopk_;
  static constexpr bool kRouterBias = kRouterBias_, kSelectionBias = kSelectionBias_;
  static constexpr bool kRoundLogits = kRoundLogits_;
  /// Capacity: places claimed slot-major (every first choice before any second one);
  /// the combine renormalises the kept weights after the drop.
  static constexpr bool kSlotMajor = kSlotMajor_, kDropRenorm = kDropRenorm_;
  static constexpr int kGroups = kGroups_, kTopkGroups = kTopkGroups_;
  static constexpr uint32_t kScaleBits = kScaleBits_;  ///< routed scaling, float32 bits
  static_assert(!(kSigmoid && kSoftmaxAfterTopk), "softmax after top-k is a softmax");
  static_assert(kGroups >= 1 && kGroups <= 32, "1..32 expert groups (a register each)");
  static_assert(kTopkGroups >= 1 && kTopkGroups <= kGroups, "topk_group in 1..groups");
};

/// Gated-MLP variants: biases on the three projections, and the clamped SwiGLU's
/// constants (float32 bits; used when kAct is kSwigluClamped).
template <bool kBias_ = false, uint32_t kAlphaBits_ = 0x3fd9db23u,
          uint32_t kLimitBits_ = 0x40e00000u>
struct Mlp {
  static constexpr bool kBias = kBias_;
  static constexpr float kAlpha = cuda::std::bit_cast<float>(kAlphaBits_);
  static constexpr float kLimit = cuda::std::bit_cast<float>(kLimitBits_);
};

/// Shared experts: one MLP of width F_ over every token (0: none), its output scaled
/// per token by sigmoid(x . w_gate) when kGate_.
template <int F_ = 0, bool kGate_ = false>
struct Shared {
  static constexpr int F = F_;
  static constexpr bool kGate = kGate_;
  static_assert(F % 8 == 0 && (F > 0 || !kGate), "shared width a multiple of 8; a gate needs it");
};

/// Block size and tile-GEMM shared memory with (kWs) or without the warp-specialised
/// mainloop, whose members exist only in the builds that have it.
template <class G, bool kWs>
struct WsSizes {
  static constexpr int kThreads = G::kThreads;
  static constexpr int kSmem = G::kSmemBytes;
};
template <class G>
struct WsSizes<G, true> {
  static constexpr int kThreads = G::kWsThreads;
  static constexpr int kSmem = G::kSmemBytesWs;
};

/// Compile-time shape and numerics of one layer (the JIT's constants).
template <int kDtype_, int H_, int F_, int E_, int K_, bool kGated_, int kAct_, bool kRenorm_,
          int BM_, int BN_, int BK_, int kStages_, bool kEP_, class Route_ = Route<>,
          class Mlp_ = Mlp<>, class Shared_ = Shared<>>
struct Config {
  static constexpr int kDtype = kDtype_, H = H_, F = F_, E = E_, K = K_;
  static constexpr bool kGated = kGated_, kRenorm = kRenorm_, kEP = kEP_;
  static constexpr int kAct = kAct_;
  using R = Route_;
  using M = Mlp_;
  using SH = Shared_;
  static constexpr bool kShared = SH::F > 0;
  static_assert(kGated || (!M::kBias && kAct != gemm::kSwigluClamped),
                "MLP biases flags and the clamped SwiGLU are for the gated MLP");
  static_assert(E % R::kGroups == 0 && (R::kGroups == 1 || E / R::kGroups >= 2),
                "groups of at least two experts, equal and contiguous");
  using G = gemm::TileGemm<kDtype, BM_, BN_, BK_, kStages_>;
  static constexpr int kTile = BM_;  // rows per row tile / tokens per token tile
  static_assert(BM_ == BN_ && BM_ == G::kThreads,
                "square tiles of one row per thread (combine credits, token tiles)");
  using Elem = typename G::E;
  using S = typename G::Storage;
  static constexpr int kThreads = G::kThreads;
  static constexpr int kWarps = kThreads / 32;
  /// Warp-specialised (sm_90a, 16-bit: the builds whose weights come by TMA; FMOE_WS=0
  /// keeps them on the single-warpgroup mainloop): kThreads body threads, the consumer
  /// warpgroup of every GEMM, and a producer warp after them that fills the stages.
#ifndef FMOE_WS
#define FMOE_WS 1
#endif
  static constexpr bool kWs = G::kTmaB && FMOE_WS;
  /// The body's barriers (body_sync): its kThreads threads, or the whole block.
  static constexpr int kBody = kWs ? kThreads : 0;
  /// Threads per block (the launch's block size).
  static constexpr int kBlockThreads = WsSizes<G, kWs>::kThreads;
  static constexpr int kUpCols = kGated ? G::BN / 2 : G::BN;  // output columns of an up task
  static constexpr int kUpTiles = (F + kUpCols - 1) / kUpCols;
  static constexpr int kDownTiles = (H + G::BN - 1) / G::BN;
  static constexpr int kSharedUpTiles = (SH::F + kUpCols - 1) / kUpCols;
  /// Gate columns: the experts, then the shared experts' gate (its logit, column E).
  static constexpr int kGateCols = E + (SH::kGate ? 1 : 0);
  static constexpr int kGateTiles = (kGateCols + G::BN - 1) / G::BN;
  /// Every expert fits one gate tile: top-k runs in the gate's epilogue from shared
  /// memory, without writing logits or a grid barrier in between.
  static constexpr bool kFusedTopk = kGateTiles == 1;
  static constexpr int kEp = (kGateCols + 7) / 8 * 8;  // logits row stride
  static constexpr int kPerLane = (E + 31) / 32;     // logits per lane in top-k
  static_assert(H % 8 == 0 && F % 8 == 0, "hidden and ffn must be multiples of 8");
  static_assert(E >= 1 && E <= 1024, "1..1024 experts");
  // A token's choices live in its routing warp's registers; a caller-routed forward
  // counts one slot per lane (K <= 32). flashmoe_core.config.MAX_TOP_K is the same bound.
  static_assert(K >= 1 && K <= 16 && K <= E, "top_k in 1..min(16, experts)");
#if !FLASHMOE_NVSHMEM
  static_assert(!kEP, "expert parallelism needs a kernel built with NVSHMEM");
#endif
  /// Shared memory: the tile GEMM, then three tables over experts; expert parallelism
  /// adds two prefix arrays over peers (2 * (world + 1) ints, sized at launch).
  static constexpr int kSmemTables = 3 * (E + 1) * int(sizeof(int32_t));
  static constexpr int kSmemScratch = kTile * K * int(sizeof(int32_t));
  static_assert(kSmemScratch <= G::kSmemPipe, "list scratch must fit the GEMM pipeline area");
  /// The tile GEMM's shared memory (with the warp-specialised mainloop's state).
  static constexpr int kSmemGemm = WsSizes<G, kWs>::kSmem;
  static constexpr int kSmemBytes = kSmemGemm + kSmemTables;
};

using abi::TaskKind;
using abi::kCombine;
using abi::kDown;
using abi::kDownRemote;
using abi::kSend;
using abi::kSharedDown;
using abi::kSharedUp;
using abi::kUp;
using abi::kUpRemote;

FMOE_DEVICE uint32_t desc(uint32_t index, TaskKind kind) { return (index << 3) | kind; }

/// Index of the interval of a prefix array p[0..n] (p[0] = 0, ascending) holding v.
FMOE_DEVICE int find_interval(const int32_t* p, int n, int v) {
  int lo = 0, hi = n;  // largest i < n with p[i] <= v
  while (hi - lo > 1) {  // bounded: binary search, log2(n) steps
    const int mid = (lo + hi) >> 1;
    if (p[mid] <= v) lo = mid; else hi = mid;
  }
  return lo;
}

template <class C>
struct Kernel {
  using G = typename C::G;
  using S = typename C::S;
  using Elem = typename C::Elem;
  static constexpr int kTile = C::kTile;
  /// One PE: the block completing a (token tile, column) combines it in its down
  /// epilogue. With peers, results that peers return complete tiles in the subscriber,
  /// which publishes combine tasks instead (a fixed task count needs one rule).
  static constexpr bool kInlineCombine = !C::kEP;

  const abi::MoeLayout& L;
  const S* x;
  S* y;
  int T;         // tokens this launch
  int TT;        // token tiles
  int capacity;  // per (expert, source rank); -1 dropless
  char* smem;
  int32_t* s_eoff;   // [E + 1] first compact row of each expert (all experts)
  int32_t* s_rtoff;  // [El + 1] first row tile of each local expert
  int32_t* s_lexp;   // [El] global id of each local expert
  int32_t* s_src;    // [W + 1] expert parallelism: first remote tile id of each source
  int32_t* s_dst;    // [W + 1] expert parallelism: first send task of each peer
  WaitSite site;
  TaskRing ring;
  uint32_t tag;      // epoch + 1: marks this launch's ring slots and signals
  bool compute;      // false in comm-only mode: expert tiles skip their GEMMs

  // ---------------------------------------------------------------- tracing
  FMOE_DEVICE bool tracing() const { return L.trace != nullptr; }

  /// Record [start, now) of a task or phase; thread 0 only, no-op when tracing is off.
  FMOE_DEVICE void trace(uint64_t start, uint32_t what) const {
    if (L.trace == nullptr || threadIdx.x != 0) return;
    const uint32_t i = atomicAdd(&L.state[abi::kTraced], 1u);
    if (i < uint32_t(L.trace_capacity)) {
      L.trace[i] = abi::TraceRecord{start, global_timer_ns(), blockIdx.x, what};
    }
  }

  // ---------------------------------------------------------------- helpers
  /// Exclusive prefix sum over data[0..n) in shared memory; data[n] gets the total.
  FMOE_DEVICE static void block_scan(int32_t* data, int n) {
    __shared__ int32_t s_part[C::kThreads];
    const int chunk = (n + C::kThreads - 1) / C::kThreads;
    const int lo = min(n, int(threadIdx.x) * chunk), hi = min(lo + chunk, n);
    int sum = 0;
    for (int i = lo; i < hi; ++i) {
      const int v = data[i];
      data[i] = sum;
      sum += v;
    }
    s_part[threadIdx.x] = sum;
    body_sync<C::kBody>();
    if (threadIdx.x == 0) {
      int run = 0;
      for (int i = 0; i < C::kThreads; ++i) {
        const int v = s_part[i];
        s_part[i] = run;
        run += v;
      }
      data[n] = run;
    }
    body_sync<C::kBody>();
    for (int i = lo; i < hi; ++i) data[i] += s_part[threadIdx.x];
    body_sync<C::kBody>();
  }

  FMOE_DEVICE static int tiles_of(int rows) { return (rows + kTile - 1) / kTile; }

  /// Per-expert counts are kept per token tile, and per slot too when places are
  /// claimed slot-major: [K][TT][E], scanned in (slot, tile) order.
  static constexpr int kCountSlots = C::R::kSlotMajor ? C::K : 1;
  FMOE_DEVICE int count_tiles() const { return kCountSlots * TT; }
  FMOE_DEVICE int count_index(int tt, int j, int e) const {
    return ((C::R::kSlotMajor ? j * TT : 0) + tt) * C::E + e;
  }

  // ---------------------------------------------------------------- phase 0: gate
  FMOE_DEVICE void zero_counters() {
    const int gtid = blockIdx.x * C::kThreads + threadIdx.x;
    const int gsize = gridDim.x * C::kThreads;
    if (gtid == 0) {
      L.state[abi::kHead] = 0u;
      L.state[abi::kPublished] = 0u;
      L.state[abi::kTraced] = 0u;
    }
    // With top-k in the gate epilogue, each token tile's block zeroes its own counts.
    if constexpr (!C::kFusedTopk) {
      for (int i = gtid; i < count_tiles() * C::E; i += gsize) L.tile_counts[i] = 0;
    }
    for (int i = gtid; i < L.max_rowtiles; i += gsize) L.dep_rowtile[i] = 0u;
    for (int i = gtid; i < TT * C::kDownTiles; i += gsize) L.dep_combine[i] = 0u;
    if constexpr (C::kShared) {
      for (int i = gtid; i < TT; i += gsize) L.dep_shared[i] = 0u;
    }
    if constexpr (C::kEP) {
      const int remote_tiles = L.world * L.max_peer_tiles;
      for (int i = gtid; i < 2 * remote_tiles; i += gsize) L.dep_remote[i] = 0u;
      for (int i = gtid; i < 2 * L.world * L.max_local_experts; i += gsize) L.headers_out[i] = 0;
    }
  }

  /// One tile GEMM with B rows from b_row (the gate): on the producer warp (kWs) or the
  /// whole block.
  template <class ARow, class BRow>
  FMOE_DEVICE const float* gemm_rows(int K, ARow a_row, BRow b_row, int rows) {
    if constexpr (C::kWs) {
      return G::compute_tile_ws(smem, K, a_row, b_row, typename G::BTma{}, false, site, -1,
                                rows);
    } else {
      return G::compute_tile(smem, K, a_row, b_row, rows);
    }
  }
  /// One tile GEMM of a weight matrix: B by TMA as b says where the build loads so,
  /// else from b_row (the two describe the same rows).
  template <class ARow, class BRow>
  FMOE_DEVICE const float* gemm_weights(int K, ARow a_row, BRow b_row,
                                        const typename G::BTma& b, int rows) {
    if constexpr (C::kWs) {
      return G::compute_tile_ws(smem, K, a_row, b_row, b, true, site, b.task, rows);
    } else {
      return G::compute_tile_tma(smem, K, a_row, b_row, b, rows);
    }
  }

  /// Router logits of kTile tokens x BN gate columns (experts, then the shared gate);
  /// then either top-k for the tile's tokens straight from shared memory (kFusedTopk)
  /// or the logits to [T, Ep] float32. `routed`: the caller chose the experts, only the
  /// shared gate is wanted.
  FMOE_DEVICE void gate_tile(int tile, bool routed = false) {
    const int tt = tile / C::kGateTiles, et = tile % C::kGateTiles;
    const int t0 = tt * kTile, e0 = et * G::BN;
    if constexpr (C::kFusedTopk) {
      if (!routed) {
        for (int i = threadIdx.x; i < kCountSlots * C::E; i += C::kThreads) {
          L.tile_counts[count_index(tt, i / C::E, i % C::E)] = 0;
        }
      }
    }
    const S* router = static_cast<const S*>(L.router_t);
    const float* staged = gemm_rows(
        C::H,
        [&](int r) -> const S* { return t0 + r < T ? x + int64_t(t0 + r) * C::H : nullptr; },
        [&](int r) -> const S* {
          if (e0 + r < C::E) return router + int64_t(e0 + r) * C::H;
          return C::SH::kGate && e0 + r == C::E ? static_cast<const S*>(L.ws_gate) : nullptr;
        }, min(kTile, T - t0));
    if constexpr (C::kFusedTopk) {
      // compute_tile synchronised the block after zeroing the counts and staging.
      const int warp = int(threadIdx.x >> 5);
      for (int r = warp; r < kTile && t0 + r < T; r += C::kWarps) {
        const auto logit = [&](int e) { return staged[r * G::kStageLd + e]; };
        if (routed) {
          if ((threadIdx.x & 31) == 0) shared_gate(t0 + r, logit);
        } else {
          topk_token(t0 + r, logit);
        }
      }
    } else {
      G::for_each_row_chunk(staged, G::BN, [&](int r, int c, float(&v)[8]) {
        if (t0 + r >= T || e0 + c >= C::kEp) return;
        float4* dst = reinterpret_cast<float4*>(L.logits + int64_t(t0 + r) * C::kEp + e0 + c);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
      });
    }
    body_sync<C::kBody>();
  }

  // ---------------------------------------------------------------- phase 1: top-k
  /// Top-k of token t from the logits written by the gate tiles (phase 1).
  FMOE_DEVICE void topk_token(int t) {
    const float* row = L.logits + int64_t(t) * C::kEp;
    topk_token(t, [&](int e) { return load_cg(row + e); });
  }

  /// The shared experts' gate of token t from its gate column: sigmoid(x . w_gate).
  template <class Logit>
  FMOE_DEVICE void shared_gate(int t, Logit logit) const {
    if constexpr (C::SH::kGate) L.shared_scale[t] = 1.0f / (1.0f + expf(-logit(C::E)));
  }

  /// The group-limited rule: every key outside the kTopkGroups best groups of kGroups
  /// contiguous groups (a group's score: its two best keys) becomes -inf. Warp-uniform.
  FMOE_DEVICE static void mask_groups(float (&c)[C::kPerLane], int lane) {
    using R = typename C::R;
    constexpr int kSize = C::E / R::kGroups;
    constexpr float kNegInf = -cuda::std::numeric_limits<float>::infinity();
    float score[R::kGroups];
#pragma unroll
    for (int g = 0; g < R::kGroups; ++g) {
      float b1 = kNegInf, b2 = kNegInf;  // the two best keys of group g seen so far
#pragma unroll
      for (int i = 0; i < C::kPerLane; ++i) {
        const int e = lane + 32 * i;
        if (e < C::E && e / kSize == g) {
          b2 = fmaxf(b2, fminf(b1, c[i]));
          b1 = fmaxf(b1, c[i]);
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {  // merge the lanes' pairs: the best two of four
        const float o1 = __shfl_xor_sync(0xffffffffu, b1, o);
        const float o2 = __shfl_xor_sync(0xffffffffu, b2, o);
        b2 = fmaxf(fminf(b1, o1), fmaxf(b2, o2));
        b1 = fmaxf(b1, o1);
      }
      score[g] = b1 + b2;
    }
    uint32_t keep = 0u;
#pragma unroll
    for (int j = 0; j < R::kTopkGroups; ++j) {  // best groups, ties to the lower group
      int best = -1;
#pragma unroll
      for (int g = 0; g < R::kGroups; ++g) {
        if (!(keep >> g & 1u) && (best < 0 || score[g] > score[best])) best = g;
      }
      keep |= 1u << best;
    }
#pragma unroll
    for (int i = 0; i < C::kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < C::E && !(keep >> (e / kSize) & 1u)) c[i] = kNegInf;
    }
  }

  /// One warp: the token's scores from its logits logit(e) (softmax or sigmoid, after
  /// the router bias and rounding the rules ask for), top-k by the selection key (ties
  /// to the lower expert), combine weights, and the token tile's per-expert counts. A
  /// token with a logit that is not finite is marked instead (abi::RowMark): no expert,
  /// NaN weights, nothing counted, so it claims no capacity and its output row is NaN.
  template <class Logit>
  FMOE_DEVICE void topk_token(int t, Logit logit) {
    using R = typename C::R;
    using Ev = typename G::E;
    const int lane = threadIdx.x & 31;
    constexpr float kNegInf = -cuda::std::numeric_limits<float>::infinity();
    float z[C::kPerLane];  // logits
    float s[C::kPerLane];  // scores (what weights are made of)
    float c[C::kPerLane];  // selection keys (what the top-k ranks)
    float m = kNegInf;
    uint32_t bad = 0u;
    if (lane == 0) shared_gate(t, logit);
#pragma unroll
    for (int i = 0; i < C::kPerLane; ++i) {
      const int e = lane + 32 * i;
      float v = kNegInf;
      if (e < C::E) {
        v = logit(e);
        if constexpr (R::kRouterBias) v += L.router_bias[e];
        if constexpr (R::kRoundLogits) v = Ev::to_float(Ev::from_float(v));
        // Exponent bits all ones: NaN or an infinity (a bit test, safe under fast math).
        bad |= uint32_t((__float_as_uint(v) & 0x7f800000u) == 0x7f800000u);
      }
      z[i] = v;
      m = fmaxf(m, v);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    if (bad != 0u) {  // warp-uniform after the reduction
      if (lane == 0) {
#pragma unroll
        for (int j = 0; j < C::K; ++j) {
          L.topk_expert[t * C::K + j] = abi::kNoExpert;
          L.topk_weight[t * C::K + j] = cuda::std::numeric_limits<float>::quiet_NaN();
        }
      }
      return;
    }
    if constexpr (R::kSigmoid) {
#pragma unroll
      for (int i = 0; i < C::kPerLane; ++i) {
        s[i] = (lane + 32 * i < C::E) ? 1.0f / (1.0f + expf(-z[i])) : 0.0f;
      }
    } else {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < C::kPerLane; ++i) {
        s[i] = (lane + 32 * i < C::E) ? expf(z[i] - m) : 0.0f;
        sum += s[i];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
      for (int i = 0; i < C::kPerLane; ++i) s[i] = s[i] / sum;
    }
#pragma unroll
    for (int i = 0; i < C::kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e >= C::E) {
        c[i] = kNegInf;
      } else if constexpr (R::kSoftmaxAfterTopk) {
        c[i] = z[i];
      } else if constexpr (R::kSelectionBias) {
        c[i] = s[i] + L.selection_bias[e];
      } else {
        c[i] = s[i];
      }
    }
    if constexpr (R::kGroups > 1) mask_groups(c, lane);

    uint32_t taken = 0u;
    float p_sel[C::K];  // the chosen scores (logits with softmax after top-k)
    int e_sel[C::K];
#pragma unroll
    for (int j = 0; j < C::K; ++j) {
      float best = kNegInf, best_p = 0.0f;
      int best_e = 0x7fffffff;
#pragma unroll
      for (int i = 0; i < C::kPerLane; ++i) {
        const int e = lane + 32 * i;
        // Ascending e per lane: strict > keeps the lower expert on a tie.
        if (e < C::E && !(taken & (1u << i)) && c[i] > best) {
          best = c[i];
          best_e = e;
          best_p = R::kSoftmaxAfterTopk ? z[i] : s[i];
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
        const float op = __shfl_xor_sync(0xffffffffu, best_p, o);
        if (ob > best || (ob == best && oe < best_e)) {
          best = ob;
          best_e = oe;
          best_p = op;
        }
      }
      // Not reached with finite logits and a valid config; keeps memory safe.
      if (best_e >= C::E) best_e = j;
      if ((best_e & 31) == lane) taken |= 1u << (best_e >> 5);
      p_sel[j] = best_p;
      e_sel[j] = best_e;
    }
    if (lane == 0) {
      float w[C::K];
      float norm = 0.0f;
      if constexpr (R::kSoftmaxAfterTopk) {
#pragma unroll
        for (int j = 0; j < C::K; ++j) {  // p_sel[0] is the largest chosen logit
          w[j] = expf(p_sel[j] - p_sel[0]);
          norm += w[j];
        }
#pragma unroll
        for (int j = 0; j < C::K; ++j) w[j] = w[j] / norm;
      } else {
#pragma unroll
        for (int j = 0; j < C::K; ++j) norm += p_sel[j];
#pragma unroll
        for (int j = 0; j < C::K; ++j) w[j] = C::kRenorm ? p_sel[j] / norm : p_sel[j];
      }
      const int tt = t / kTile;
      constexpr float kScale = cuda::std::bit_cast<float>(R::kScaleBits);
#pragma unroll
      for (int j = 0; j < C::K; ++j) {
        L.topk_expert[t * C::K + j] = e_sel[j];
        L.topk_weight[t * C::K + j] = R::kScaleBits == 0x3f800000u ? w[j] : w[j] * kScale;
        atomicAdd(&L.tile_counts[count_index(tt, j, e_sel[j])], 1);
      }
    }
  }

  // ---------------------------------------------------------------- phase 2: scan
  /// One warp per expert: per-tile counts become per-tile bases (token order; slot
  /// then token order when slot-major), 32 token tiles at a time with a warp scan.
  FMOE_DEVICE void scan_expert(int e) {
    const int lane = threadIdx.x & 31;
    const int n = count_tiles();
    int run = 0;
    for (int t0 = 0; t0 < n; t0 += 32) {
      const int tt = t0 + lane;
      int32_t* p = &L.tile_counts[tt * C::E + e];
      const int c = tt < n ? load_cg(p) : 0;
      int incl = c;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      if (tt < n) *p = run + incl - c;
      run += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) {
      L.expert_total[e] = run;
      L.expert_kept[e] = capacity < 0 ? run : min(run, capacity);
    }
  }

  // ---------------------------------------------------------------- phase 3: lists
  FMOE_DEVICE bool is_local(int e) const {
    return !C::kEP || load_cg(&L.expert_owner[e]) == L.rank;
  }

  /// Every block: compact-row offsets over all experts, the local expert table and the
  /// row-tile offsets over local experts. Returns the number of local row tiles.
  FMOE_DEVICE int expert_offsets() {
    const int el = L.local_experts;
    for (int e = threadIdx.x; e < C::E; e += C::kThreads) {
      s_eoff[e] = load_cg(&L.expert_kept[e]);
      if constexpr (C::kEP) {
        if (load_cg(&L.expert_owner[e]) == L.rank) s_lexp[load_cg(&L.expert_local[e])] = e;
      } else {
        s_lexp[e] = e;
      }
    }
    body_sync<C::kBody>();
    for (int le = threadIdx.x; le < el; le += C::kThreads) s_rtoff[le] = tiles_of(s_eoff[s_lexp[le]]);
    body_sync<C::kBody>();
    block_scan(s_eoff, C::E);
    block_scan(s_rtoff, el);
    return s_rtoff[el];
  }

  /// One token tile: each assignment's place is its tile base plus its rank among the
  /// tile's earlier assignments to the same expert (token order, then slot order; or
  /// among the same slot's earlier tokens when slot-major).
  FMOE_DEVICE bool fill_lists(int tt) {
    __shared__ int s_kept;
    int32_t* s_ex = reinterpret_cast<int32_t*>(smem);
    const int t0 = tt * kTile;
    const int n = min(kTile, T - t0) * C::K;
    if (threadIdx.x == 0) s_kept = 0;
    for (int i = threadIdx.x; i < n; i += C::kThreads) {
      s_ex[i] = load_cg(&L.topk_expert[t0 * C::K + i]);
    }
    body_sync<C::kBody>();
    int kept_here = 0;
    for (int i = threadIdx.x; i < n; i += C::kThreads) {
      const int e = s_ex[i];
      if (e < 0) {  // a marked token: no expert, nothing counted (topk_token)
        L.token_rows[t0 * C::K + i] = abi::kRowMarked;
        continue;
      }
      int rank = 0;
      constexpr int kStep = C::R::kSlotMajor ? C::K : 1;
      for (int q = C::R::kSlotMajor ? i % C::K : 0; q < i; q += kStep) rank += s_ex[q] == e;
      const int pos = load_cg(&L.tile_counts[count_index(tt, i % C::K, e)]) + rank;
      const bool keep = pos < load_cg(&L.expert_kept[e]);
      const int row = s_eoff[e] + pos;
      const int t = t0 + i / C::K;
      L.token_rows[t0 * C::K + i] = keep ? row : int(abi::kRowDropped);
      if (keep) {
        L.row_token[row] = t;
        ++kept_here;
      }
    }
    atomicAdd(&s_kept, kept_here);
    body_sync<C::kBody>();
    bool ok = true;
    // The shared experts' down tasks credit every token of the tile too.
    const int target = s_kept + (C::kShared ? min(kTile, T - t0) : 0);
    if (threadIdx.x == 0) L.tile_kept[tt] = target;
    if (target == 0) {  // nothing will complete this tile's combines: do them now
      if constexpr (kInlineCombine) {
        // Zeros (NaN for marked tokens) from this block's own token_rows, ordered by
        // the barrier above.
        for (int c = 0; c < C::kDownTiles; ++c) combine_task(tt * C::kDownTiles + c);
      } else if (threadIdx.x == 0) {
        __threadfence();
        ok = ring.publish(C::kDownTiles, [&](int i) {
          return desc(uint32_t(tt * C::kDownTiles + i), kCombine);
        }, site);
      }
    }
    return !block_fault_raised<C::kBody>(site, !ok);
  }

  // ---------------------------------------------------------------- expert tiles
  /// The gated MLP's intermediate from its two pre-activations: act(g) * u, or the
  /// clamped SwiGLU min(g, L) * sigmoid(a min(g, L)) * (clip(u, -L, L) + 1).
  FMOE_DEVICE static float gated_act(float g, float u) {
    if constexpr (C::kAct == gemm::kSwigluClamped) {
      constexpr float kL = C::M::kLimit;
      const float gc = fminf(g, kL);
      const float uc = fminf(fmaxf(u, -kL), kL);
      return gc / (1.0f + expf(-C::M::kAlpha * gc)) * (uc + 1.0f);
    } else {
      return gemm::activate<C::kAct>(g) * u;
    }
  }

  /// Where one row tile's rows come from and go to.
  struct RowTile {
    int le;           // local expert (index into this rank's weights)
    int rows;         // valid rows (1..kTile)
    int a_row0;       // first input row (compact row, or receive-buffer row)
    int out_row0;     // first output row in the up/down buffers
  };

  /// Local row tile rt: rows of one of this rank's experts from its own tokens.
  FMOE_DEVICE RowTile local_tile(int rt) const {
    const int le = find_interval(s_rtoff, L.local_experts, rt);
    const int e = s_lexp[le];
    const int r = rt - s_rtoff[le];
    const int kept = s_eoff[e + 1] - s_eoff[e];
    const int row0 = s_eoff[e] + r * kTile;
    return RowTile{le, min(kTile, kept - r * kTile), row0, row0};
  }

  /// One MLP's weights as the up and down tasks read them: an expert's, or the shared
  /// experts' (kF: its intermediate width).
  struct MlpWeights {
    const S* w_up;    // [kF, H] vanilla W1^T, gated Wg^T
    const S* w_up2;   // [kF, H] gated Wu^T (vanilla: w_up)
    const S* b_up;    // vanilla b1 [kF]; gated with biases bg then bu [2 kF]; else null
    const S* w_down;  // [H, kF]
    const S* b_down;  // [H] (vanilla, or gated with biases); else null
    // The same matrices as tensor maps (TMA builds; abi::TensorMapSlot) and the index
    // of this MLP along their third dimension.
    const void* map_up;
    const void* map_up2;
    const void* map_down;
    int map_e;
  };

  /// Tensor map `slot` of the layer's weights (null without them: not a TMA build).
  FMOE_DEVICE const void* tensor_map(abi::TensorMapSlot slot) const {
    return L.tensor_maps == nullptr ? nullptr
                                    : static_cast<const char*>(L.tensor_maps) + 128 * int(slot);
  }

  /// Local expert le's weights.
  FMOE_DEVICE MlpWeights expert_weights(int le) const {
    constexpr int64_t kW = int64_t(C::F) * C::H;
    const S* w_up = static_cast<const S*>(L.w_up) + le * kW;
    const bool up_bias = !C::kGated || C::M::kBias;
    return MlpWeights{
        w_up, C::kGated ? static_cast<const S*>(L.w_up2) + le * kW : w_up,
        up_bias ? static_cast<const S*>(L.b_up) + int64_t(le) * C::F * (C::kGated ? 2 : 1)
                : nullptr,
        static_cast<const S*>(L.w_down) + le * kW,
        up_bias ? static_cast<const S*>(L.b_down) + int64_t(le) * C::H : nullptr,
        tensor_map(abi::kMapUp), tensor_map(C::kGated ? abi::kMapUp2 : abi::kMapUp),
        tensor_map(abi::kMapDown), le};
  }

  /// The shared experts' weights (one MLP of width C::SH::F).
  FMOE_DEVICE MlpWeights shared_weights() const {
    const S* w_up = static_cast<const S*>(L.ws_up);
    return MlpWeights{w_up, C::kGated ? static_cast<const S*>(L.ws_up2) : w_up,
                      static_cast<const S*>(L.bs_up), static_cast<const S*>(L.ws_down),
                      static_cast<const S*>(L.bs_down), tensor_map(abi::kMapSharedUp),
                      tensor_map(C::kGated ? abi::kMapSharedUp2 : abi::kMapSharedUp),
                      tensor_map(abi::kMapSharedDown), 0};
  }

  /**
   * Up projection of one kUpCols-column slice of an MLP of width kF: out = act(A W1^T +
   * b1) or act(A Wg^T) * (A Wu^T), A rows a_row(r), output rows out + r * kF. A non-null
   * `pre` (saving for the backward) also gets the pre-activations: rows pre + r * kF
   * (vanilla, A W1^T + b1) or pre + r * 2kF (gated, A Wg^T then A Wu^T).
   */
  template <int kF, class ARow>
  FMOE_DEVICE void up_compute(const RowTile& tile, int col, ARow a_row, S* out,
                              const MlpWeights& w, S* pre = nullptr) {
    if (!compute) return;
    const int n0 = col * C::kUpCols;
    // Gated: B rows [0, kUpCols) are Wg rows, [kUpCols, BN) the matching Wu rows (by
    // TMA: one box of each).
    const typename G::BTma b{w.map_up, w.map_up2, C::kGated ? 2 : 1, n0, w.map_e, &site, -1};
    const float* staged = gemm_weights(
        C::H, [&](int r) -> const S* { return r < tile.rows ? a_row(r) : nullptr; },
        [&](int r) -> const S* {
          const int half = r / C::kUpCols, n = n0 + r % C::kUpCols;
          return n < kF ? (half ? w.w_up2 : w.w_up) + int64_t(n) * C::H : nullptr;
        }, b, tile.rows);
    const S* b_up = w.b_up;
    G::for_each_row_chunk(staged, C::kUpCols, [&](int r, int c, float(&v)[8]) {
      const int n = n0 + c;
      if (r >= tile.rows || n >= kF) return;
      if constexpr (C::kGated) {
        const float* u = staged + r * G::kStageLd + c + C::kUpCols;
        float bg[8] = {0, 0, 0, 0, 0, 0, 0, 0}, bu[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if constexpr (C::M::kBias) {
          gemm::load8<Elem>(b_up + n, bg);
          gemm::load8<Elem>(b_up + kF + n, bu);
        }
        if (pre != nullptr) {  // uniform: saving for the backward or not
          float gg[8], uu[8];
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            gg[j] = v[j] + bg[j];
            uu[j] = u[j] + bu[j];
          }
          gemm::store8<Elem>(pre + int64_t(r) * 2 * kF + n, gg);
          gemm::store8<Elem>(pre + int64_t(r) * 2 * kF + kF + n, uu);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = gated_act(v[j] + bg[j], u[j] + bu[j]);
      } else {
        float b[8];
        gemm::load8<Elem>(b_up + n, b);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] += b[j];
        if (pre != nullptr) gemm::store8<Elem>(pre + int64_t(r) * kF + n, v);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = gemm::activate<C::kAct>(v[j]);
      }
      gemm::store8<Elem>(out + int64_t(r) * kF + n, v);
    });
    body_sync<C::kBody>();
  }

  /// Down projection of one BN-column slice of an MLP of width kF: out = Z W2^T + b2
  /// (rows z + r * kF).
  template <int kF>
  FMOE_DEVICE void down_compute(const RowTile& tile, int col, const S* z, S* out,
                                const MlpWeights& w) {
    if (!compute) return;
    const int n0 = col * G::BN;
    const S* w_down = w.w_down;
    const typename G::BTma b{w.map_down, w.map_down, 1, n0, w.map_e, &site, -1};
    const float* staged = gemm_weights(
        kF,
        [&](int r) -> const S* { return r < tile.rows ? z + int64_t(r) * kF : nullptr; },
        [&](int r) -> const S* {
          return n0 + r < C::H ? w_down + int64_t(n0 + r) * kF : nullptr;
        }, b, tile.rows);
    constexpr bool kDownBias = !C::kGated || C::M::kBias;
    const S* b_down = w.b_down;
    G::for_each_row_chunk(staged, G::BN, [&](int r, int c, float(&v)[8]) {
      const int n = n0 + c;
      if (r >= tile.rows || n >= C::H) return;
      if constexpr (kDownBias) {
        float b[8];
        gemm::load8<Elem>(b_down + n, b);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] += b[j];
      }
      gemm::store8<Elem>(out + int64_t(r) * C::H + n, v);
    });
    body_sync<C::kBody>();
  }

  /// Credit `len` finished rows of token tile tt in column c; whether this credit
  /// completed the (tile, column). Called by one thread after its release fence.
  FMOE_DEVICE bool credit(int tt, int len, int c) {
    const uint32_t target = uint32_t(load_cg(&L.tile_kept[tt]));
    return atomicAdd(&L.dep_combine[tt * C::kDownTiles + c], uint32_t(len)) + uint32_t(len) ==
           target;
  }

  /// Credit `len` finished rows of token tile tt in columns [col_lo, col_hi); the
  /// credit that completes a (tile, column) publishes its combine task (expert
  /// parallelism: results returned by peers). Called by one thread after its release
  /// fence.
  FMOE_DEVICE bool credit_run(int tt, int len, int col_lo, int col_hi) {
    bool ok = true;
    for (int c = col_lo; c < col_hi; ++c) {
      const bool done = credit(tt, len, c);
      if (done) {
        ok &= ring.publish(1, [&](int) {
          return desc(uint32_t(tt * C::kDownTiles + c), kCombine);
        }, site);
      }
    }
    return ok;
  }

  /**
   * Credit combine tasks for finished result rows [row0, row0 + rows) of this rank's
   * compact rows, columns [col_lo, col_hi), from one thread (the subscriber's threads
   * each handle their own tiles). Rows are in token order, so each token tile's rows
   * form one run.
   */
  FMOE_DEVICE bool credit_rows(int row0, int rows, int col_lo, int col_hi) {
    bool ok = true;
    int r = 0;
    while (r < rows) {  // bounded: r grows by at least one each turn, up to kTile
      const int tt = load_cg(&L.row_token[row0 + r]) / kTile;
      int len = 1;
      while (r + len < rows && load_cg(&L.row_token[row0 + r + len]) / kTile == tt) ++len;  // bounded: <= rows
      ok &= credit_run(tt, len, col_lo, col_hi);
      r += len;
    }
    return ok;
  }

  /**
   * credit_rows for the whole block after a row tile's down slice (every thread
   * calls it; the result is per thread, for __syncthreads_and): one thread per row
   * finds the token tiles, the first thread of each run credits it. One PE: the
   * block then combines every (token tile, column) its credits completed, in the
   * down epilogue while the rows are fresh in L2 (no combine task, no ring slot);
   * the result is the same whichever block completes it.
   */
  FMOE_DEVICE bool credit_rows_block(int row0, int rows, int col) {
    static_assert(C::kThreads == kTile, "one thread per row of a row tile");
    __shared__ int32_t s_tt[kTile];
    __shared__ int32_t s_ready[kTile];  // token tiles whose column this block completed
    __shared__ int s_nready;
    const int r = threadIdx.x;
    if (r == 0) s_nready = 0;
    if (r < rows) s_tt[r] = load_cg(&L.row_token[row0 + r]) / kTile;
    body_sync<C::kBody>();
    bool ok = true;
    if (r < rows && (r == 0 || s_tt[r - 1] != s_tt[r])) {
      int len = 1;
      while (r + len < rows && s_tt[r + len] == s_tt[r]) ++len;  // bounded: <= rows
      __threadfence();  // release (after the block barrier): the rows before the credit
      if constexpr (kInlineCombine) {
        if (credit(s_tt[r], len, col)) {
          __threadfence();  // acquire: the other blocks' rows of this tile
          s_ready[atomicAdd(&s_nready, 1)] = s_tt[r];
        }
      } else {
        ok = credit_run(s_tt[r], len, col, col + 1);
      }
    }
    if constexpr (kInlineCombine) {
      body_sync<C::kBody>();
      const int ready = s_nready;
      for (int i = 0; i < ready; ++i) combine_task(s_ready[i] * C::kDownTiles + col);
    }
    return ok;
  }

  // ---------------------------------------------------------------- local tasks
  FMOE_DEVICE bool up_task(int index) {
    const int rt = index / C::kUpTiles, col = index % C::kUpTiles;
    const RowTile tile = local_tile(rt);
    constexpr int kPreCols = C::kGated ? 2 * C::F : C::F;
    S* pre = L.pre == nullptr ? nullptr
                              : static_cast<S*>(L.pre) + int64_t(tile.out_row0) * kPreCols;
    up_compute<C::F>(tile, col, [&](int r) {
      return x + int64_t(load_cg(&L.row_token[tile.a_row0 + r])) * C::H;
    }, static_cast<S*>(L.z) + int64_t(tile.out_row0) * C::F, expert_weights(tile.le), pre);
    bool ok = true;
    if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(&L.dep_rowtile[rt], 1u) + 1u == uint32_t(C::kUpTiles)) {
        ok = ring.publish(C::kDownTiles, [&](int i) {
          return desc(uint32_t(rt * C::kDownTiles + i), kDown);
        }, site);
      }
    }
    return ok;
  }

  FMOE_DEVICE bool down_task(int index) {
    const int rt = index / C::kDownTiles, col = index % C::kDownTiles;
    const RowTile tile = local_tile(rt);
    down_compute<C::F>(tile, col, static_cast<const S*>(L.z) + int64_t(tile.a_row0) * C::F,
                       static_cast<S*>(L.y_expert) + int64_t(tile.out_row0) * C::H,
                       expert_weights(tile.le));
    return credit_rows_block(tile.out_row0, tile.rows, col);
  }

  // ---------------------------------------------------------------- shared experts
  /// Token tile tt as a row tile of the shared MLP (every token, in order).
  FMOE_DEVICE RowTile shared_tile(int tt) const {
    return RowTile{-1, min(kTile, T - tt * kTile), tt * kTile, tt * kTile};
  }

  /// Up slice of the shared MLP for one token tile; the tile's last slice publishes
  /// its down tasks.
  FMOE_DEVICE bool shared_up_task(int index) {
    const int tt = index / C::kSharedUpTiles, col = index % C::kSharedUpTiles;
    const RowTile tile = shared_tile(tt);
    constexpr int kPreCols = C::kGated ? 2 * C::SH::F : C::SH::F;
    S* pre = L.pre_s == nullptr ? nullptr
                                : static_cast<S*>(L.pre_s) + int64_t(tile.out_row0) * kPreCols;
    up_compute<C::SH::F>(tile, col, [&](int r) { return x + int64_t(tile.a_row0 + r) * C::H; },
                         static_cast<S*>(L.zs) + int64_t(tile.out_row0) * C::SH::F,
                         shared_weights(), pre);
    bool ok = true;
    if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(&L.dep_shared[tt], 1u) + 1u == uint32_t(C::kSharedUpTiles)) {
        ok = ring.publish(C::kDownTiles, [&](int i) {
          return desc(uint32_t(tt * C::kDownTiles + i), kSharedDown);
        }, site);
      }
    }
    return ok;
  }

  /// Down slice of the shared MLP for one token tile: its rows credit the tile's
  /// combine like routed rows (one PE: the completing block combines it at once).
  FMOE_DEVICE bool shared_down_task(int index) {
    __shared__ int s_done;
    const int tt = index / C::kDownTiles, col = index % C::kDownTiles;
    const RowTile tile = shared_tile(tt);
    down_compute<C::SH::F>(tile, col,
                           static_cast<const S*>(L.zs) + int64_t(tile.a_row0) * C::SH::F,
                           static_cast<S*>(L.ys) + int64_t(tile.out_row0) * C::H,
                           shared_weights());
    bool ok = true;
    if (threadIdx.x == 0) {
      __threadfence();  // release, after down_compute's barrier: the shared rows
      s_done = 0;
      if constexpr (kInlineCombine) {
        if (credit(tt, tile.rows, col)) {
          __threadfence();  // acquire: the tile's rows from other blocks
          s_done = 1;
        }
      } else {
        ok = credit_run(tt, tile.rows, col, col + 1);
      }
    }
    body_sync<C::kBody>();
    if (kInlineCombine && s_done) combine_task(tt * C::kDownTiles + col);
    return ok;
  }

  /// y[t, cols] = sum_j w[t, j] * Y[token_rows[t, j], cols], kept slots in slot order;
  /// NaN for a marked token.
  FMOE_DEVICE void combine_task(int index) {
    const int tt = index / C::kDownTiles, col = index % C::kDownTiles;
    const int t0 = tt * kTile, n0 = col * G::BN;
    const S* ye = static_cast<const S*>(L.y_expert);
    constexpr int kChunks = G::BN / 8;
    for (int v = threadIdx.x; v < kTile * kChunks; v += C::kThreads) {
      const int t = t0 + v / kChunks, n = n0 + (v % kChunks) * 8;
      if (t >= T || n >= C::H) continue;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      bool marked = false;
      float scale = 1.0f;  // renormalising after the drop: routed scaling / kept sum
      if constexpr (C::R::kDropRenorm) {
        float kept = 0.0f;
#pragma unroll
        for (int j = 0; j < C::K; ++j) {
          const bool k_j = load_cg(&L.token_rows[t * C::K + j]) >= 0;
          if (k_j) kept += load_cg(&L.topk_weight[t * C::K + j]);
        }
        scale = kept > 0.0f ? cuda::std::bit_cast<float>(C::R::kScaleBits) / kept : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < C::K; ++j) {
        const int row = load_cg(&L.token_rows[t * C::K + j]);
        if (row < 0) {
          marked |= row == abi::kRowMarked;
          continue;
        }
        const float w = load_cg(&L.topk_weight[t * C::K + j]) * scale;
        float val[8];
        gemm::load8<Elem, true>(ye + int64_t(row) * C::H + n, val);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = fmaf(w, val[q], acc[q]);
      }
      if constexpr (C::kShared) {  // after the slots: + g * ys (g = 1 without a gate)
        const float g = C::SH::kGate ? load_cg(&L.shared_scale[t]) : 1.0f;
        float val[8];
        gemm::load8<Elem, true>(static_cast<const S*>(L.ys) + int64_t(t) * C::H + n, val);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = fmaf(g, val[q], acc[q]);
      }
      if (marked) {
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = cuda::std::numeric_limits<float>::quiet_NaN();
      }
      gemm::store8<Elem>(y + int64_t(t) * C::H + n, acc);
    }
  }

#if FLASHMOE_NVSHMEM
  // ---------------------------------------------------------------- expert parallelism
  struct PeerTile {
    int peer;      // the other rank (source of a received tile, owner of a sent one)
    int index;     // position in that rank pair's stream (signal index)
    int le;        // expert's position among the owner's experts
    int rows;
    int src_row;   // first row in the source's compact rows
    int dst_row;   // first row in the source's slot of the owner's receive buffer
  };

  /// Tile i of a stream described by a header {rows, src_row0} per owner expert.
  FMOE_DEVICE PeerTile walk_header(const int32_t* header, int peer, int i) const {
    int dst = 0, left = i;
    for (int le = 0; le < L.max_local_experts; ++le) {
      const int n = load_cg(&header[2 * le]);
      const int t = tiles_of(n);
      if (left < t) {
        const int src0 = load_cg(&header[2 * le + 1]);
        return PeerTile{peer, i, le, min(kTile, n - left * kTile), src0 + left * kTile,
                        dst + left * kTile};
      }
      left -= t;
      dst += n;
    }
    return PeerTile{peer, i, 0, 0, 0, 0};  // not reached for a valid index
  }

  /// Received tile g (ids over all sources) as announced by its source's header.
  FMOE_DEVICE PeerTile recv_tile(int g) const {
    const int s = find_interval(s_src, L.world, g);
    return walk_header(L.headers + int64_t(s) * L.max_local_experts * 2, s, g - s_src[s]);
  }

  /// Send task j (ids over all peers) as announced by this rank's header to the owner.
  FMOE_DEVICE PeerTile send_tile(int j) const {
    const int p = find_interval(s_dst, L.world, j);
    return walk_header(L.headers_out + int64_t(p) * L.max_local_experts * 2, p, j - s_dst[p]);
  }

  FMOE_DEVICE int64_t slot_row(const PeerTile& t) const {
    return int64_t(t.peer) * L.slot_rows + t.dst_row;
  }

  /// Phase 3: this rank's header entries for every peer (grid-stride over experts).
  FMOE_DEVICE void write_headers() {
    for (int e = blockIdx.x * C::kThreads + threadIdx.x; e < C::E; e += gridDim.x * C::kThreads) {
      const int p = load_cg(&L.expert_owner[e]);
      int32_t* h = L.headers_out + (int64_t(p) * L.max_local_experts +
                                    load_cg(&L.expert_local[e])) * 2;
      h[0] = s_eoff[e + 1] - s_eoff[e];
      h[1] = s_eoff[e];
    }
  }

  /// Phase 3b: send headers (after the peer finished the previous launch), then wait for
  /// every peer's header and derive the per-peer tile prefixes. The phases name the
  /// waits in a fault record (the backward passes its own).
  FMOE_DEVICE bool exchange_headers(uint32_t epoch, int32_t done_phase = kPhasePeerDone,
                                    int32_t header_phase = kPhaseHeaders) {
    const int me = L.rank;
    if (blockIdx.x == 0) {
      for (int p = threadIdx.x; p < L.world; p += C::kThreads) {
        if (p == me) continue;
        // The peer may still read what we sent last launch: wait for its "done".
        if (epoch > 0u && !wait_signal(site, done_phase, -1, p, &L.done_sig[p], epoch)) {
          break;
        }
        const int64_t n = int64_t(L.max_local_experts) * 2;
        nvshmem_putmem_signal_nbi(L.headers + me * n, L.headers_out + p * n,
                                  size_t(n) * sizeof(int32_t), &L.header_sig[me], tag,
                                  NVSHMEM_SIGNAL_SET, p);
      }
    }
    if (threadIdx.x == 0) {
      for (int s = 0; s < L.world; ++s) {
        if (s == me) continue;
        if (!wait_signal(site, header_phase, -1, s, &L.header_sig[s], tag)) break;
      }
      __threadfence_system();  // acquire: the headers were written by other GPUs
    }
    if (block_fault_raised<C::kBody>(site)) return false;
    // Tiles per source (from its header to us) and per peer (from our header to it).
    for (int p = threadIdx.x; p < L.world; p += C::kThreads) {
      int in = 0, out = 0;
      if (p != me) {
        const int32_t* hin = L.headers + int64_t(p) * L.max_local_experts * 2;
        const int32_t* hout = L.headers_out + int64_t(p) * L.max_local_experts * 2;
        for (int le = 0; le < L.max_local_experts; ++le) {
          in += tiles_of(load_cg(&hin[2 * le]));
          out += tiles_of(load_cg(&hout[2 * le]));
        }
      }
      s_src[p] = in;
      s_dst[p] = out;
    }
    body_sync<C::kBody>();
    block_scan(s_src, L.world);
    block_scan(s_dst, L.world);
    return true;
  }

  /// Gather a tile's token rows into send_rows and put them into the owner's slot.
  FMOE_DEVICE void send_task(int j) {
    const PeerTile t = send_tile(j);
    S* stage = static_cast<S*>(L.send_rows) + int64_t(t.src_row) * C::H;
    constexpr int kPerVec = 16 / int(sizeof(S));  // elements per 16-byte vector
    constexpr int kRowVecs = C::H / kPerVec;
    for (int v = threadIdx.x; v < t.rows * kRowVecs; v += C::kThreads) {
      const int r = v / kRowVecs, c = (v % kRowVecs) * kPerVec;
      const S* src = x + int64_t(load_cg(&L.row_token[t.src_row + r])) * C::H + c;
      *reinterpret_cast<uint4*>(stage + int64_t(r) * C::H + c) =
          *reinterpret_cast<const uint4*>(src);
    }
    body_sync<C::kBody>();
    __threadfence();
    S* dst = static_cast<S*>(L.recv_rows) + (int64_t(L.rank) * L.slot_rows + t.dst_row) * C::H;
    put_signal(dst, stage, size_t(t.rows) * C::H * sizeof(S),
               &L.dispatch_sig[int64_t(L.rank) * L.max_peer_tiles + t.index], t.peer);
  }

  /// Rows to a peer and then its signal (= tag), by the body's threads together: the
  /// block-collective put, or in a warp-specialised block (whose producer warp cannot
  /// join a block collective) the warp-collective one by the body's first warp.
  FMOE_DEVICE void put_signal(S* dst, const S* src, size_t bytes, uint64_t* sig, int peer) {
    if constexpr (C::kBody == 0) {
      nvshmemx_putmem_signal_nbi_block(dst, src, bytes, sig, tag, NVSHMEM_SIGNAL_SET, peer);
    } else {
      if (threadIdx.x < 32) {
        nvshmemx_putmem_signal_nbi_warp(dst, src, bytes, sig, tag, NVSHMEM_SIGNAL_SET, peer);
      }
      body_sync<C::kBody>();
    }
  }

  FMOE_DEVICE bool up_remote_task(int index) {
    const int g = index / C::kUpTiles, col = index % C::kUpTiles;
    const PeerTile pt = recv_tile(g);
    const int64_t row0 = slot_row(pt);
    const RowTile tile{pt.le, pt.rows, 0, 0};
    const S* a = static_cast<const S*>(L.recv_rows) + row0 * C::H;
    constexpr int kPreCols = C::kGated ? 2 * C::F : C::F;
    S* pre = L.pre_remote == nullptr ? nullptr
                                     : static_cast<S*>(L.pre_remote) + row0 * kPreCols;
    up_compute<C::F>(tile, col, [&](int r) { return a + int64_t(r) * C::H; },
                     static_cast<S*>(L.z_remote) + row0 * C::F, expert_weights(tile.le), pre);
    if (col == 0 && L.recv_saved != nullptr) {
      // Saving: keep the received x rows for the backward. Done here, inside the launch,
      // because a peer may put its next launch's rows into recv_rows as soon as this
      // launch announces it is done, before any copy after the kernel could run.
      constexpr int kPerVec = 16 / int(sizeof(S));
      constexpr int kRowVecs = C::H / kPerVec;
      const uint4* src = reinterpret_cast<const uint4*>(a);
      uint4* dst = reinterpret_cast<uint4*>(static_cast<S*>(L.recv_saved) + row0 * C::H);
      for (int v = threadIdx.x; v < pt.rows * kRowVecs; v += C::kThreads) dst[v] = src[v];
    }
    bool ok = true;
    if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(&L.dep_remote[2 * g], 1u) + 1u == uint32_t(C::kUpTiles)) {
        ok = ring.publish(C::kDownTiles, [&](int i) {
          return desc(uint32_t(g * C::kDownTiles + i), kDownRemote);
        }, site);
      }
    }
    return ok;
  }

  /// Down slice of a received tile; the block finishing the tile's last slice puts
  /// the result rows back into the source's y_expert with the return signal.
  FMOE_DEVICE void down_remote_task(int index) {
    __shared__ int s_last;
    const int g = index / C::kDownTiles, col = index % C::kDownTiles;
    const PeerTile pt = recv_tile(g);
    const int64_t row0 = slot_row(pt);
    const RowTile tile{pt.le, pt.rows, 0, 0};
    S* out = static_cast<S*>(L.y_remote) + row0 * C::H;
    down_compute<C::F>(tile, col, static_cast<const S*>(L.z_remote) + row0 * C::F, out,
                       expert_weights(tile.le));
    if (threadIdx.x == 0) {
      __threadfence();
      s_last = atomicAdd(&L.dep_remote[2 * g + 1], 1u) + 1u == uint32_t(C::kDownTiles);
      __threadfence();
    }
    body_sync<C::kBody>();
    if (s_last) {
      // Every thread acquires before the put's copy reads rows other blocks wrote
      // (the copy's loads are plain, and only thread 0 observed the counter).
      __threadfence();
      S* dst = static_cast<S*>(L.y_expert) + int64_t(pt.src_row) * C::H;
      put_signal(dst, out, size_t(pt.rows) * C::H * sizeof(S),
                 &L.return_sig[int64_t(L.rank) * L.max_peer_tiles + pt.index], pt.peer);
    }
  }

  /// Subscriber event ev: tile ev dispatched to us (ev < n_recv), else the result of
  /// send tile ev - n_recv coming back.
  FMOE_DEVICE PeerTile event_tile(int ev, int n_recv) const {
    return ev < n_recv ? recv_tile(ev) : send_tile(ev - n_recv);
  }

  /**
   * The subscriber (last block): waits for every tile dispatched to this rank and
   * every result tile returned to it, and publishes the tasks they unblock. Each
   * thread watches a window of its events at once and handles them in the order they
   * land, so one late tile does not hold back the ones behind it.
   */
  FMOE_DEVICE bool subscribe() {
    constexpr int kWindow = 8;
    const int n_recv = s_src[L.world], n = n_recv + s_dst[L.world];
    bool ok = true;
    for (int base = threadIdx.x; ok && base < n; base += kWindow * C::kThreads) {
      PeerTile pt[kWindow];
      const uint64_t* sig[kWindow];
      uint32_t pending = 0u;
      for (int j = 0; j < kWindow && base + j * C::kThreads < n; ++j) {
        const int ev = base + j * C::kThreads;
        pt[j] = event_tile(ev, n_recv);
        sig[j] = (ev < n_recv ? L.dispatch_sig : L.return_sig) +
                 int64_t(pt[j].peer) * L.max_peer_tiles + pt[j].index;
        pending |= 1u << j;
      }
      while (ok && pending != 0u) {  // bounded: each turn handles an event or gives up
        const int first = __ffs(int(pending)) - 1;  // reported if nothing lands in time
        int ready = first;
        ok = bounded_wait(
            site, base + first * C::kThreads < n_recv ? kPhaseDispatchWait : kPhaseReturnWait,
            pt[first].index, pt[first].peer,
            [&] {
              for (uint32_t m = pending; m != 0u; m &= m - 1u) {
                const int j = __ffs(int(m)) - 1;
                if (load_volatile(sig[j]) == uint64_t(tag)) {
                  ready = j;
                  return true;
                }
              }
              return false;
            },
            [&](int64_t& seen, int64_t& expected) {
              seen = int64_t(load_volatile(sig[first]));
              expected = int64_t(tag);
            });
        if (!ok) break;
        __threadfence_system();  // acquire: the rows were written by another GPU
        pending &= ~(1u << ready);
        const int ev = base + ready * C::kThreads;
        if (ev < n_recv) {
          ok = ring.publish(C::kUpTiles, [&](int i) {
            return desc(uint32_t(ev * C::kUpTiles + i), kUpRemote);
          }, site);
        } else {
          ok = credit_rows(pt[ready].src_row, pt[ready].rows, 0, C::kDownTiles);
        }
      }
    }
    return body_sync_and<C::kBody>(ok);
  }

  /// Tell every peer this launch is over for us (after our puts completed).
  FMOE_DEVICE void announce_done() {
    nvshmem_quiet();
    for (int p = 0; p < L.world; ++p) {
      if (p != L.rank) nvshmemx_signal_op(&L.done_sig[L.rank], tag, NVSHMEM_SIGNAL_SET, p);
    }
    nvshmem_quiet();
  }
#endif  // FLASHMOE_NVSHMEM

  /// Leave a launch that ended normally, whatever the mode. With expert parallelism
  /// the last block out then tells every peer, after this PE's puts completed: a
  /// peer's next launch waits for that before it overwrites what we may still read.
  FMOE_DEVICE void finish() {
#if FLASHMOE_NVSHMEM
    if constexpr (C::kEP) {
      nvshmem_quiet();
      if (leave_launch<C::kBody>(L.state) && threadIdx.x == 0) announce_done();
      return;
    }
#endif
    leave_launch<C::kBody>(L.state);
  }

  // ---------------------------------------------------------------- the task loop
  struct Counts {
    uint32_t send, up, down, up_remote, down_remote, combine, shared_up = 0u, shared_down = 0u;
    FMOE_DEVICE uint32_t total() const {
      return send + up + down + up_remote + down_remote + combine + shared_up + shared_down;
    }
  };

  /// Claim tasks until none are left; false if a wait failed.
  FMOE_DEVICE bool task_loop(const Counts& n, bool combine_only) {
    __shared__ int64_t s_task;
    __shared__ uint64_t s_start;
    const uint32_t total = n.total();
    for (;;) {  // bounded: claimed indices only grow and stop at `total`
      if (threadIdx.x == 0) {
        const uint64_t claimed = tracing() ? global_timer_ns() : 0u;
        const uint32_t idx = atomicAdd(&L.state[abi::kHead], 1u);
        if (idx >= total) {
          s_task = -2;
        } else if (combine_only) {
          s_task = desc(idx, kCombine);
        } else if (idx < n.send) {
          s_task = desc(idx, kSend);
        } else if (idx < n.send + n.up) {
          s_task = desc(idx - n.send, kUp);
        } else if (idx < n.send + n.up + n.shared_up) {
          s_task = desc(idx - n.send - n.up, kSharedUp);
        } else {
          s_task = ring.take(idx - n.send - n.up - n.shared_up, site);
          if (tracing()) trace(claimed, abi::kTraceWait);
        }
        s_start = tracing() ? global_timer_ns() : 0u;
      }
      body_sync<C::kBody>();
      const int64_t task = s_task;
      const uint64_t started = s_start;
      body_sync<C::kBody>();
      if (task == -2) return true;
      if (task < 0) return false;
      const int index = int(task >> 3);
      bool ok = true;
      switch (uint32_t(task & 7)) {
        case kUp: ok = up_task(index); break;
        case kDown: ok = down_task(index); break;
        case kCombine: combine_task(index); break;
        case kSharedUp:
          if constexpr (C::kShared) ok = shared_up_task(index); else ok = false;
          break;
        case kSharedDown:
          if constexpr (C::kShared) ok = shared_down_task(index); else ok = false;
          break;
#if FLASHMOE_NVSHMEM
        case kSend: send_task(index); break;
        case kUpRemote: ok = up_remote_task(index); break;
        case kDownRemote: down_remote_task(index); break;
#endif
        default: ok = false; break;
      }
      // Publication can fail in one thread only; every thread must leave together.
      if (!body_sync_and<C::kBody>(ok)) return false;
      trace(started, uint32_t(task));
    }
  }
};

/**
 * The whole forward pass. `mode` (abi::Mode) stops early for component tests, or
 * runs only the combine on host-provided routing and expert outputs.
 */
template <class C>
FMOE_DEVICE void forward(const abi::MoeLayout* layout, const typename C::S* x, typename C::S* y,
                         int tokens, int capacity, int mode) {
  extern __shared__ __align__(1024) char smem[];  // wgmma's swizzled tiles
  __shared__ uint32_t s_epoch;
  const abi::MoeLayout& L = *layout;
  if (threadIdx.x == 0) {
    s_epoch = read_epoch(L.state);
    if constexpr (C::kWs) {
      C::G::init_ws(smem);
    } else {
      C::G::init_stage_barriers(smem);
    }
  }
  __syncthreads();  // the whole block, a producer warp too
  if constexpr (C::kWs) {
    if (int(threadIdx.x) >= C::kThreads) {  // the producer warp: the stages, nothing else
      C::G::produce_ws(smem, WaitSite{L.fault, L.timeout_ns, L.rank, s_epoch, L.state, L.world});
      return;
    }
  }
  // However the body leaves, the producer warp is told (it would time out otherwise).
  struct ProducerQuit {
    char* smem;
    FMOE_DEVICE ~ProducerQuit() {
      if constexpr (C::kWs) C::G::post_quit_ws(smem);
    }
  } const quit{smem};
  int32_t* tables = reinterpret_cast<int32_t*>(smem + C::kSmemGemm);
  int32_t* peer_tables = tables + 3 * (C::E + 1);
  Kernel<C> k{L, x, y, tokens, (tokens + C::kTile - 1) / C::kTile, capacity, smem,
              tables, tables + (C::E + 1), tables + 2 * (C::E + 1),
              peer_tables, peer_tables + (L.world + 1),
              WaitSite{L.fault, L.timeout_ns, L.rank, s_epoch, L.state, L.world},
              TaskRing{L.ring, L.state, L.ring_capacity, s_epoch + 1u}, s_epoch + 1u,
              mode != abi::kModeCommOnly};
  const int warps = gridDim.x * C::kWarps;
  const int gwarp = blockIdx.x * C::kWarps + int(threadIdx.x >> 5);
  if constexpr (C::G::kTmaB) {
    if (L.tensor_maps == nullptr) {  // the weights' tensor maps are this build's contract
      if (blockIdx.x == 0 && threadIdx.x == 0) {
        report_fault(k.site, abi::kBadLaunch, abi::kPhaseNoTensorMaps, -1, 0, 0, -1, 0);
      }
      return;
    }
  }

  if (mode == abi::kModeCombineOnly) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
      L.state[abi::kHead] = 0u;
      L.state[abi::kTraced] = 0u;
    }
    if (!grid_barrier<C::kBody>(L.state, 0, k.site, kPhaseBarrierGate)) return;
    typename Kernel<C>::Counts n{0, 0, 0, 0, 0, uint32_t(k.TT * C::kDownTiles)};
    if (!k.task_loop(n, true)) return;
    k.finish();
    return;
  }

  if (L.delay_ns != 0u && blockIdx.x == 0 && threadIdx.x == 0) sleep_for(L.delay_ns);
  int barrier = 0;  // grid barriers passed this launch (fewer with top-k in the gate)
  uint64_t t0 = k.tracing() ? global_timer_ns() : 0u;
  k.zero_counters();
  if (mode == abi::kModeRouted) {
    // The caller chose the experts and weights (topk_expert / topk_weight are filled):
    // no gate, only the per-tile counts the dispatch lists start from.
    if constexpr (C::kFusedTopk) {
      const int gtid = blockIdx.x * C::kThreads + threadIdx.x;
      for (int i = gtid; i < k.count_tiles() * C::E; i += gridDim.x * C::kThreads) {
        L.tile_counts[i] = 0;
      }
    }
    // The shared experts' gate still comes from its gate column (the same GEMM).
    if constexpr (C::SH::kGate) {
      for (int tile = blockIdx.x; tile < k.TT * C::kGateTiles; tile += gridDim.x) {
        k.gate_tile(tile, true);
      }
    }
    if (!grid_barrier<C::kBody>(L.state, barrier++, k.site, kPhaseBarrierGate)) return;
    const int lane = threadIdx.x & 31;
    for (int t = gwarp; t < tokens; t += warps) {
      if (lane < C::K) {
        const int e = load_cg(&L.topk_expert[t * C::K + lane]);
        atomicAdd(&L.tile_counts[k.count_index(t / C::kTile, lane, e)], 1);
      }
      if constexpr (C::SH::kGate && !C::kFusedTopk) {
        const float* row = L.logits + int64_t(t) * C::kEp;
        if (lane == 0) k.shared_gate(t, [&](int e) { return load_cg(row + e); });
      }
    }
  } else {
    for (int tile = blockIdx.x; tile < k.TT * C::kGateTiles; tile += gridDim.x) k.gate_tile(tile);
    if constexpr (!C::kFusedTopk) {
      if (!grid_barrier<C::kBody>(L.state, barrier++, k.site, kPhaseBarrierGate)) return;
      k.trace(t0, abi::kTraceGate);  // recorded after the barrier: the trace counter is zeroed
      t0 = k.tracing() ? global_timer_ns() : 0u;
      for (int t = gwarp; t < tokens; t += warps) k.topk_token(t);
    }
  }
  if (mode == abi::kModeGateOnly) {
    k.finish();
    return;
  }
  if (!grid_barrier<C::kBody>(L.state, barrier++, k.site, kPhaseBarrierTopk)) return;
  // Recorded after the barrier (the trace counter is zeroed in phase 0); with top-k
  // in the gate, this span is gate and top-k together.
  k.trace(t0, C::kFusedTopk ? abi::kTraceGate : abi::kTraceTopk);

  t0 = k.tracing() ? global_timer_ns() : 0u;
  for (int e = gwarp; e < C::E; e += warps) k.scan_expert(e);
  k.trace(t0, abi::kTraceScan);
  if (!grid_barrier<C::kBody>(L.state, barrier++, k.site, kPhaseBarrierScan)) return;

  t0 = k.tracing() ? global_timer_ns() : 0u;
  const int local_rowtiles = k.expert_offsets();
  for (int tt = blockIdx.x; tt < k.TT; tt += gridDim.x) {
    if (!k.fill_lists(tt)) return;
  }
#if FLASHMOE_NVSHMEM
  if constexpr (C::kEP) k.write_headers();
#endif
  k.trace(t0, abi::kTraceLists);
  if (mode == abi::kModeDispatchOnly) {
    k.finish();
    return;
  }
  if (!grid_barrier<C::kBody>(L.state, barrier++, k.site, kPhaseBarrierLists)) return;

  // One PE combines in the down epilogue (Kernel::kInlineCombine): no combine tasks.
  typename Kernel<C>::Counts n{0, uint32_t(local_rowtiles * C::kUpTiles),
                               uint32_t(local_rowtiles * C::kDownTiles), 0, 0,
                               Kernel<C>::kInlineCombine ? 0u : uint32_t(k.TT * C::kDownTiles),
                               uint32_t(k.TT * C::kSharedUpTiles),
                               C::kShared ? uint32_t(k.TT * C::kDownTiles) : 0u};
#if FLASHMOE_NVSHMEM
  if constexpr (C::kEP) {
    t0 = k.tracing() ? global_timer_ns() : 0u;
    if (!k.exchange_headers(s_epoch)) return;
    k.trace(t0, abi::kTraceHeaders);
    const uint32_t recv = uint32_t(k.s_src[L.world]);
    n.send = uint32_t(k.s_dst[L.world]);
    n.up_remote = recv * C::kUpTiles;
    n.down_remote = recv * C::kDownTiles;
    if (blockIdx.x == gridDim.x - 1) {  // the subscriber claims no tasks
      t0 = k.tracing() ? global_timer_ns() : 0u;
      if (!k.subscribe()) return;
      k.trace(t0, abi::kTraceSubscriber);
    } else if (!k.task_loop(n, false)) {
      return;
    }
    k.finish();
    return;
  }
#endif
  if (!k.task_loop(n, false)) return;
  k.finish();
}

}  // namespace moe
}  // namespace flashmoe
