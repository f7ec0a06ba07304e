/**
 * @file fused.cuh
 * @brief The persistent fused MoE forward: gate, dispatch, expert FFN, combine.
 *
 * Protocol, task formats and ordering rules: docs/design.md. Every block runs every
 * phase; phases are separated by grid barriers; the last phase is a task loop in
 * which blocks claim tile tasks and publish the tasks they unblock.
 */
#pragma once

#include "../gemm/tile_gemm.cuh"
#include "../sync.cuh"

namespace flashmoe {
namespace moe {

/// Compile-time shape and numerics of one layer (the JIT's constants).
template <int kDtype_, int H_, int F_, int E_, int K_, bool kGated_, int kAct_, bool kRenorm_,
          int BK_, int kStages_>
struct Config {
  static constexpr int kDtype = kDtype_, H = H_, F = F_, E = E_, K = K_;
  static constexpr bool kGated = kGated_, kRenorm = kRenorm_;
  static constexpr int kAct = kAct_;
  static constexpr int kTile = 128;  // rows per row tile / tokens per token tile
  using G = gemm::TileGemm<kDtype, 128, 128, BK_, kStages_>;
  using Elem = typename G::E;
  using S = typename G::Storage;
  static constexpr int kThreads = G::kThreads;
  static constexpr int kWarps = kThreads / 32;
  static constexpr int kUpCols = kGated ? 64 : 128;  // output columns of one up task
  static constexpr int kUpTiles = (F + kUpCols - 1) / kUpCols;
  static constexpr int kDownTiles = (H + 127) / 128;
  static constexpr int kGateTiles = (E + 127) / 128;
  static constexpr int kEp = (E + 7) / 8 * 8;        // logits row stride
  static constexpr int kPerLane = (E + 31) / 32;     // logits per lane in top-k
  static_assert(H % 8 == 0 && F % 8 == 0, "hidden and ffn must be multiples of 8");
  static_assert(E >= 1 && E <= 1024, "1..1024 experts");
  static_assert(K >= 1 && K <= 8 && K <= E, "top_k in 1..min(8, experts)");
  /// Shared memory: the tile GEMM, then two prefix arrays over experts.
  static constexpr int kSmemOffsets = 2 * (E + 1) * int(sizeof(int32_t));
  static constexpr int kSmemScratch = kTile * K * int(sizeof(int32_t));
  static_assert(kSmemScratch <= G::kSmemBytes, "list scratch must fit the GEMM area");
  static constexpr int kSmemBytes = G::kSmemBytes + kSmemOffsets;
};

/// Task kinds of ring descriptors (index << 2 | kind); up tasks are never in the ring.
enum TaskKind : uint32_t { kUp = 0, kDown = 1, kCombine = 2 };

template <class C>
struct Kernel {
  using G = typename C::G;
  using S = typename C::S;
  using Elem = typename C::Elem;
  static constexpr int kTile = C::kTile;

  const abi::MoeLayout& L;
  const S* x;
  S* y;
  int T;         // tokens this launch
  int TT;        // token tiles
  int capacity;  // per (expert, source rank); -1 dropless
  char* smem;
  int32_t* s_eoff;   // [E + 1] first compact row of each expert
  int32_t* s_rtoff;  // [E + 1] first row tile of each expert
  WaitSite site;
  TaskRing ring;

  // ---------------------------------------------------------------- phase 0: gate
  FMOE_DEVICE void zero_counters() {
    const int gtid = blockIdx.x * C::kThreads + threadIdx.x;
    const int gsize = gridDim.x * C::kThreads;
    if (gtid == 0) {
      L.state[abi::kHead] = 0u;
      L.state[abi::kPublished] = 0u;
    }
    for (int i = gtid; i < TT * C::E; i += gsize) L.tile_counts[i] = 0;
    for (int i = gtid; i < L.max_rowtiles; i += gsize) L.dep_rowtile[i] = 0u;
    for (int i = gtid; i < TT * C::kDownTiles; i += gsize) L.dep_combine[i] = 0u;
  }

  /// Router logits of 128 tokens x 128 experts: [T, Ep] float32.
  FMOE_DEVICE void gate_tile(int tile) {
    const int tt = tile / C::kGateTiles, et = tile % C::kGateTiles;
    const int t0 = tt * kTile, e0 = et * 128;
    const S** ra = G::rows_a(smem);
    const S** rb = G::rows_b(smem);
    const S* router = static_cast<const S*>(L.router_t);
    for (int r = threadIdx.x; r < G::BM; r += C::kThreads) {
      ra[r] = t0 + r < T ? x + int64_t(t0 + r) * C::H : nullptr;
      rb[r] = e0 + r < C::E ? router + int64_t(e0 + r) * C::H : nullptr;
    }
    __syncthreads();
    typename G::Acc acc;
    cute::clear(acc);
    G::mainloop(acc, smem, C::H);
    const float* staged = G::stage_acc(acc, smem);
    __syncthreads();
    G::for_each_row_chunk(staged, 128, [&](int r, int c, float(&v)[8]) {
      if (t0 + r >= T || e0 + c >= C::kEp) return;
      float4* dst = reinterpret_cast<float4*>(L.logits + int64_t(t0 + r) * C::kEp + e0 + c);
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    });
    __syncthreads();
  }

  // ---------------------------------------------------------------- phase 1: top-k
  /// One warp: softmax over the token's logits, top-k (ties to the lower expert),
  /// combine weights, and the token tile's per-expert counts.
  FMOE_DEVICE void topk_token(int t) {
    const int lane = threadIdx.x & 31;
    const float* row = L.logits + int64_t(t) * C::kEp;
    float v[C::kPerLane];
    float m = -cuda::std::numeric_limits<float>::infinity();
#pragma unroll
    for (int i = 0; i < C::kPerLane; ++i) {
      const int e = lane + 32 * i;
      v[i] = e < C::E ? load_cg(row + e) : -cuda::std::numeric_limits<float>::infinity();
      m = fmaxf(m, v[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < C::kPerLane; ++i) {
      v[i] = (lane + 32 * i < C::E) ? expf(v[i] - m) : 0.0f;
      sum += v[i];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
    for (int i = 0; i < C::kPerLane; ++i) v[i] = v[i] / sum;

    uint32_t taken = 0u;
    float p_sel[C::K];
    int e_sel[C::K];
#pragma unroll
    for (int j = 0; j < C::K; ++j) {
      float best = -1.0f;
      int best_e = 0x7fffffff;
#pragma unroll
      for (int i = 0; i < C::kPerLane; ++i) {
        const int e = lane + 32 * i;
        // Ascending e per lane: strict > keeps the lower expert on a tie.
        if (e < C::E && !(taken & (1u << i)) && v[i] > best) {
          best = v[i];
          best_e = e;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffffu, best, o);
        const int oe = __shfl_xor_sync(0xffffffffu, best_e, o);
        if (ob > best || (ob == best && oe < best_e)) {
          best = ob;
          best_e = oe;
        }
      }
      if (best_e >= C::E) best_e = j;  // only NaN logits left: any valid id keeps memory safe
      if ((best_e & 31) == lane) taken |= 1u << (best_e >> 5);
      p_sel[j] = best;
      e_sel[j] = best_e;
    }
    if (lane == 0) {
      float norm = 0.0f;
#pragma unroll
      for (int j = 0; j < C::K; ++j) norm += p_sel[j];
      const int tt = t / kTile;
#pragma unroll
      for (int j = 0; j < C::K; ++j) {
        L.topk_expert[t * C::K + j] = e_sel[j];
        L.topk_weight[t * C::K + j] = C::kRenorm ? p_sel[j] / norm : p_sel[j];
        atomicAdd(&L.tile_counts[tt * C::E + e_sel[j]], 1);
      }
    }
  }

  // ---------------------------------------------------------------- phase 2: scan
  /// One thread per expert: per-tile counts become per-tile bases (token order).
  FMOE_DEVICE void scan_expert(int e) {
    int run = 0;
    for (int tt = 0; tt < TT; ++tt) {
      int32_t* p = &L.tile_counts[tt * C::E + e];
      const int c = load_cg(p);
      *p = run;
      run += c;
    }
    L.expert_total[e] = run;
    L.expert_kept[e] = capacity < 0 ? run : min(run, capacity);
  }

  // ---------------------------------------------------------------- phase 3: lists
  /// Exclusive prefix sums over experts of kept rows and row tiles, in every block.
  /// Returns the total number of row tiles.
  FMOE_DEVICE int expert_offsets() {
    __shared__ int32_t s_part[2][C::kThreads];
    constexpr int kChunk = (C::E + C::kThreads - 1) / C::kThreads;
    const int lo = threadIdx.x * kChunk;
    int rows = 0, tiles = 0;
    for (int e = lo; e < min(lo + kChunk, C::E); ++e) {
      const int kept = load_cg(&L.expert_kept[e]);
      s_eoff[e] = rows;
      s_rtoff[e] = tiles;
      rows += kept;
      tiles += (kept + kTile - 1) / kTile;
    }
    s_part[0][threadIdx.x] = rows;
    s_part[1][threadIdx.x] = tiles;
    __syncthreads();
    if (threadIdx.x == 0) {
      int a = 0, b = 0;
      for (int i = 0; i < C::kThreads; ++i) {
        const int ra = s_part[0][i], rb = s_part[1][i];
        s_part[0][i] = a;
        s_part[1][i] = b;
        a += ra;
        b += rb;
      }
      s_eoff[C::E] = a;
      s_rtoff[C::E] = b;
    }
    __syncthreads();
    for (int e = lo; e < min(lo + kChunk, C::E); ++e) {
      s_eoff[e] += s_part[0][threadIdx.x];
      s_rtoff[e] += s_part[1][threadIdx.x];
    }
    __syncthreads();
    return s_rtoff[C::E];
  }

  /// One token tile: each assignment's slot is its tile base plus its rank among the
  /// tile's earlier assignments to the same expert (token order, then slot order).
  FMOE_DEVICE bool fill_lists(int tt) {
    __shared__ int s_kept;
    int32_t* s_ex = reinterpret_cast<int32_t*>(smem);
    const int t0 = tt * kTile;
    const int n = min(kTile, T - t0) * C::K;
    if (threadIdx.x == 0) s_kept = 0;
    for (int i = threadIdx.x; i < n; i += C::kThreads) {
      s_ex[i] = load_cg(&L.topk_expert[t0 * C::K + i]);
    }
    __syncthreads();
    int kept_here = 0;
    for (int i = threadIdx.x; i < n; i += C::kThreads) {
      const int e = s_ex[i];
      int rank = 0;
      for (int q = 0; q < i; ++q) rank += s_ex[q] == e;
      const int pos = load_cg(&L.tile_counts[tt * C::E + e]) + rank;
      const bool keep = pos < load_cg(&L.expert_kept[e]);
      const int row = s_eoff[e] + pos;
      const int t = t0 + i / C::K;
      L.token_rows[t0 * C::K + i] = keep ? row : -1;
      if (keep) {
        L.row_token[row] = t;
        ++kept_here;
      }
    }
    atomicAdd(&s_kept, kept_here);
    __syncthreads();
    bool ok = true;
    if (threadIdx.x == 0) {
      L.tile_kept[tt] = s_kept;
      if (s_kept == 0) {  // nothing will complete this tile's combines: publish them now
        __threadfence();
        ok = ring.publish(C::kDownTiles, [&](int i) {
          return (uint32_t(tt * C::kDownTiles + i) << 2) | kCombine;
        }, site);
      }
    }
    __syncthreads();
    return ok && !fault_raised(site);
  }

  // ---------------------------------------------------------------- phase 4: tasks
  struct RowTile {
    int expert;  // global id
    int row0;    // first compact row
    int rows;    // valid rows (1..128)
  };

  FMOE_DEVICE RowTile row_tile(int rt) const {
    int lo = 0, hi = C::E;  // largest e with s_rtoff[e] <= rt
    while (hi - lo > 1) {  // bounded: binary search, log2(E) steps
      const int mid = (lo + hi) >> 1;
      if (s_rtoff[mid] <= rt) lo = mid; else hi = mid;
    }
    const int r = rt - s_rtoff[lo];
    const int kept = s_eoff[lo + 1] - s_eoff[lo];
    return RowTile{lo, s_eoff[lo] + r * kTile, min(kTile, kept - r * kTile)};
  }

  /// Z[rows, cols] = act(X W1^T + b1) or act(X Wg^T) * (X Wu^T).
  FMOE_DEVICE bool up_task(int index) {
    const int rt = index / C::kUpTiles, col = index % C::kUpTiles;
    const RowTile tile = row_tile(rt);
    const int le = tile.expert - L.first_expert;
    const int n0 = col * C::kUpCols;
    const S** ra = G::rows_a(smem);
    const S** rb = G::rows_b(smem);
    // Gated: B rows [0, 64) are Wg rows, [64, 128) the matching Wu rows.
    const S* w_up = static_cast<const S*>(L.w_up) + int64_t(le) * C::F * C::H;
    const S* w_up2 = C::kGated ? static_cast<const S*>(L.w_up2) + int64_t(le) * C::F * C::H
                               : w_up;
    for (int r = threadIdx.x; r < G::BM; r += C::kThreads) {
      ra[r] = r < tile.rows ? x + int64_t(load_cg(&L.row_token[tile.row0 + r])) * C::H : nullptr;
      const int half = r / C::kUpCols, n = n0 + r % C::kUpCols;
      rb[r] = n < C::F ? (half ? w_up2 : w_up) + int64_t(n) * C::H : nullptr;
    }
    __syncthreads();
    typename G::Acc acc;
    cute::clear(acc);
    G::mainloop(acc, smem, C::H);
    const float* staged = G::stage_acc(acc, smem);
    __syncthreads();
    S* z = static_cast<S*>(L.z);
    const S* b_up = C::kGated ? nullptr : static_cast<const S*>(L.b_up) + int64_t(le) * C::F;
    G::for_each_row_chunk(staged, C::kUpCols, [&](int r, int c, float(&v)[8]) {
      const int n = n0 + c;
      if (r >= tile.rows || n >= C::F) return;
      if constexpr (C::kGated) {
        const float* u = staged + r * G::kStageLd + c + C::kUpCols;
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = gemm::activate<C::kAct>(v[j]) * u[j];
      } else {
        float b[8];
        gemm::load8<Elem>(b_up + n, b);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = gemm::activate<C::kAct>(v[j] + b[j]);
      }
      gemm::store8<Elem>(z + int64_t(tile.row0 + r) * C::F + n, v);
    });
    __syncthreads();
    bool ok = true;
    if (threadIdx.x == 0) {
      __threadfence();
      const uint32_t done = atomicAdd(&L.dep_rowtile[rt], 1u) + 1u;
      if (done == uint32_t(C::kUpTiles)) {
        ok = ring.publish(C::kDownTiles, [&](int i) {
          return (uint32_t(rt * C::kDownTiles + i) << 2) | kDown;
        }, site);
      }
    }
    return ok;
  }

  /// Y[rows, cols] = Z W2^T + b2, then credit the combine tasks of the rows' token tiles.
  FMOE_DEVICE bool down_task(int index) {
    __shared__ int32_t s_tt[kTile];
    const int rt = index / C::kDownTiles, col = index % C::kDownTiles;
    const RowTile tile = row_tile(rt);
    const int le = tile.expert - L.first_expert;
    const int n0 = col * 128;
    const S** ra = G::rows_a(smem);
    const S** rb = G::rows_b(smem);
    const S* z = static_cast<const S*>(L.z);
    const S* w_down = static_cast<const S*>(L.w_down) + int64_t(le) * C::H * C::F;
    for (int r = threadIdx.x; r < G::BM; r += C::kThreads) {
      ra[r] = r < tile.rows ? z + int64_t(tile.row0 + r) * C::F : nullptr;
      rb[r] = n0 + r < C::H ? w_down + int64_t(n0 + r) * C::F : nullptr;
      s_tt[r] = r < tile.rows ? load_cg(&L.row_token[tile.row0 + r]) / kTile : -1;
    }
    __syncthreads();
    typename G::Acc acc;
    cute::clear(acc);
    G::mainloop(acc, smem, C::F);
    const float* staged = G::stage_acc(acc, smem);
    __syncthreads();
    S* ye = static_cast<S*>(L.y_expert);
    const S* b_down = C::kGated ? nullptr : static_cast<const S*>(L.b_down) + int64_t(le) * C::H;
    G::for_each_row_chunk(staged, 128, [&](int r, int c, float(&v)[8]) {
      const int n = n0 + c;
      if (r >= tile.rows || n >= C::H) return;
      if constexpr (!C::kGated) {
        float b[8];
        gemm::load8<Elem>(b_down + n, b);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] += b[j];
      }
      gemm::store8<Elem>(ye + int64_t(tile.row0 + r) * C::H + n, v);
    });
    __syncthreads();
    // Rows are in token order, so each token tile's rows form one run.
    bool ok = true;
    const int r = threadIdx.x;
    if (r < tile.rows && (r == 0 || s_tt[r - 1] != s_tt[r])) {
      const int tt = s_tt[r];
      int len = 1;
      while (r + len < tile.rows && s_tt[r + len] == tt) ++len;  // bounded: <= 128 rows
      __threadfence();
      uint32_t* dep = &L.dep_combine[tt * C::kDownTiles + col];
      const uint32_t done = atomicAdd(dep, uint32_t(len)) + uint32_t(len);
      if (done == uint32_t(load_cg(&L.tile_kept[tt]))) {
        ok = ring.publish(1, [&](int) {
          return (uint32_t(tt * C::kDownTiles + col) << 2) | kCombine;
        }, site);
      }
    }
    return ok;
  }

  /// y[t, cols] = sum_j w[t, j] * Y[token_rows[t, j], cols], kept slots in slot order.
  FMOE_DEVICE void combine_task(int index) {
    const int tt = index / C::kDownTiles, col = index % C::kDownTiles;
    const int t0 = tt * kTile, n0 = col * 128;
    const S* ye = static_cast<const S*>(L.y_expert);
    constexpr int kChunks = 128 / 8;
    for (int v = threadIdx.x; v < kTile * kChunks; v += C::kThreads) {
      const int t = t0 + v / kChunks, n = n0 + (v % kChunks) * 8;
      if (t >= T || n >= C::H) continue;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
#pragma unroll
      for (int j = 0; j < C::K; ++j) {
        const int row = load_cg(&L.token_rows[t * C::K + j]);
        if (row < 0) continue;
        const float w = load_cg(&L.topk_weight[t * C::K + j]);
        float val[8];
        gemm::load8<Elem, true>(ye + int64_t(row) * C::H + n, val);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[q] = fmaf(w, val[q], acc[q]);
      }
      gemm::store8<Elem>(y + int64_t(t) * C::H + n, acc);
    }
  }

  /// Claim tasks until none are left; false if a wait failed.
  FMOE_DEVICE bool task_loop(int n_rowtiles, bool combine_only) {
    __shared__ int64_t s_task;
    const uint32_t n_up = combine_only ? 0u : uint32_t(n_rowtiles * C::kUpTiles);
    const uint32_t n_down = combine_only ? 0u : uint32_t(n_rowtiles * C::kDownTiles);
    const uint32_t n_comb = uint32_t(TT * C::kDownTiles);
    const uint32_t total = n_up + n_down + n_comb;
    for (;;) {  // bounded: claimed indices only grow and stop at `total`
      if (threadIdx.x == 0) {
        const uint32_t idx = atomicAdd(&L.state[abi::kHead], 1u);
        if (idx >= total) {
          s_task = -2;
        } else if (combine_only) {
          s_task = (int64_t(idx) << 2) | kCombine;
        } else if (idx < n_up) {
          s_task = (int64_t(idx) << 2) | kUp;
        } else {
          s_task = ring.take(idx - n_up, site);
        }
      }
      __syncthreads();
      const int64_t task = s_task;
      __syncthreads();
      if (task == -2) return true;
      if (task < 0) return false;
      const int index = int(task >> 2);
      bool ok = true;
      switch (uint32_t(task & 3)) {
        case kUp: ok = up_task(index); break;
        case kDown: ok = down_task(index); break;
        default: combine_task(index); break;
      }
      // Publication can fail in one thread only; every thread must leave together.
      if (!__syncthreads_and(ok)) return false;
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
  extern __shared__ __align__(128) char smem[];
  __shared__ uint32_t s_epoch;
  const abi::MoeLayout& L = *layout;
  if (threadIdx.x == 0) s_epoch = read_epoch(L.state);
  __syncthreads();
  Kernel<C> k{L, x, y, tokens, (tokens + C::kTile - 1) / C::kTile, capacity, smem,
              reinterpret_cast<int32_t*>(smem + C::G::kSmemBytes),
              reinterpret_cast<int32_t*>(smem + C::G::kSmemBytes) + (C::E + 1),
              WaitSite{L.fault, L.timeout_ns, L.rank, s_epoch},
              TaskRing{L.ring, L.state, L.ring_capacity, s_epoch + 1u}};
  const int warps = gridDim.x * C::kWarps;
  const int gwarp = blockIdx.x * C::kWarps + int(threadIdx.x >> 5);

  if (mode == abi::kModeCombineOnly) {
    if (threadIdx.x == 0 && blockIdx.x == 0) {
      L.state[abi::kHead] = 0u;
    }
    if (!grid_barrier(L.state, 0, k.site, kPhaseBarrierGate)) return;
    if (!k.task_loop(0, true)) return;
    leave_launch(L.state);
    return;
  }

  k.zero_counters();
  for (int tile = blockIdx.x; tile < k.TT * C::kGateTiles; tile += gridDim.x) k.gate_tile(tile);
  if (!grid_barrier(L.state, 0, k.site, kPhaseBarrierGate)) return;

  for (int t = gwarp; t < tokens; t += warps) k.topk_token(t);
  if (mode == abi::kModeGateOnly) {
    leave_launch(L.state);
    return;
  }
  if (!grid_barrier(L.state, 1, k.site, kPhaseBarrierTopk)) return;

  for (int e = blockIdx.x * C::kThreads + threadIdx.x; e < C::E; e += gridDim.x * C::kThreads)
    k.scan_expert(e);
  if (!grid_barrier(L.state, 2, k.site, kPhaseBarrierScan)) return;

  const int n_rowtiles = k.expert_offsets();
  for (int tt = blockIdx.x; tt < k.TT; tt += gridDim.x) {
    if (!k.fill_lists(tt)) return;
  }
  if (mode == abi::kModeDispatchOnly) {
    leave_launch(L.state);
    return;
  }
  if (!grid_barrier(L.state, 3, k.site, kPhaseBarrierLists)) return;

  if (!k.task_loop(n_rowtiles, false)) return;
  leave_launch(L.state);
}

}  // namespace moe
}  // namespace flashmoe
