/**
 * @file backward.cuh
 * @brief The persistent fused MoE backward: dx and the gradients of the router and every
 *        expert weight, from a saved forward, in one launch on tensor cores.
 *
 * Phases, task formats and numerics: docs/design.md ("Backward"). It reuses the
 * forward's machinery: the saved routing and compact rows (a forward MoeLayout whose
 * per-call buffers belong to a save slot), the tile GEMM, the task ring, grid barriers,
 * bounded waits and the fault record. Every sum has a fixed order and no float atomics
 * are used, so the result is bitwise repeatable; each gradient element is written by the
 * one task that owns its tile (read-modify-write when accumulating).
 *
 * Expert parallelism (kEP): along the forward's routes. Each rank computes the router
 * part and the w*dy rows of all its assignments, sends the rows of remote experts to
 * their owners (send tasks, the forward's tile streams), and the owner runs dH and dX
 * on them and puts the float32 dX rows back into the source's dxe. Weight gradients
 * stay with the owner, over every source's rows in source order, so they equal the
 * one-GPU ones bit for bit; the router gradient is each rank's partial over its tokens.
 */
#pragma once

#include "fused.cuh"

namespace flashmoe {
namespace moe {

using abi::BwdTaskKind;
using abi::kBwdDB1;
using abi::kBwdDB2;
using abi::kBwdDH;
using abi::kBwdDR;
using abi::kBwdDW1;
using abi::kBwdDW2;
using abi::kBwdDX;
using abi::kBwdDXSum;
using abi::kBwdDHRemote;
using abi::kBwdDXRemote;
using abi::kBwdSend;
using abi::kBwdSharedDB;
using abi::kBwdSharedDH;
using abi::kBwdSharedDW;
using abi::kBwdSharedDX;

FMOE_DEVICE uint32_t bdesc(uint32_t index, BwdTaskKind kind) { return (index << 4) | kind; }

/// Derivative of an activation at a float32 pre-activation (relu'(0) = 0).
template <int kAct>
FMOE_DEVICE float activate_grad(float x) {
  if constexpr (kAct == gemm::kRelu) {
    return x > 0.0f ? 1.0f : 0.0f;
  } else if constexpr (kAct == gemm::kGelu) {
    // Phi(x) + x phi(x), Phi in the erfc form for the same reason as the forward's gelu.
    const float cdf = 0.5f * erfcf(-x * 0.70710678118654752f);
    return cdf + x * (0.39894228040143268f * expf(-0.5f * x * x));
  } else if constexpr (kAct == gemm::kSilu) {
    const float s = 1.0f / (1.0f + expf(-x));  // exp overflow for x << 0 gives s = 0: right
    return s * (1.0f + x * (1.0f - s));
  } else {
    return 1.0f;
  }
}

/// Where the gradients go (float32, the user's MoEWeights layouts; abi::BwdGrad order).
/// Vanilla: up = dW1 [El, H, F], up2 = db1 [El, F], down = dW2 [El, F, H], down_b = db2
/// [El, H]. Gated: up = dWg, up2 = dWu [El, H, F], down = dW2; with biases up_b = dbg,
/// up2_b = dbu [El, F] and down_b = db2 (else null). router = [H, E]; router_b = [E]
/// with a router bias (else null). Shared experts: s_* likewise (null without).
struct GradOut {
  float* router;
  float* router_b;
  float* up;
  float* up2;
  float* up_b;
  float* up2_b;
  float* down;
  float* down_b;
  // The shared MLP's (replicated: no expert dimension), in the same roles; s_gate [H].
  float* s_up;
  float* s_up2;
  float* s_up_b;
  float* s_up2_b;
  float* s_down;
  float* s_down_b;
  float* s_gate;
};

template <class C>
struct Backward {
  using G = typename C::G;
  using S = typename C::S;
  using Elem = typename C::Elem;
  static constexpr int kTile = C::kTile;
  static constexpr int H = C::H, F = C::F, E = C::E, K = C::K;
  static constexpr int kEp = C::kEp;
  static constexpr int kPF = C::kGated ? 2 * F : F;             // pre-activation / dA width
  static constexpr int kFT = (F + kTile - 1) / kTile;            // dH column tiles
  static constexpr int kHT = C::kDownTiles;                      // H column tiles
  static constexpr int kPT = (kPF + kTile - 1) / kTile;          // dW1 column tiles (PF)
  static constexpr int kEpT = (kEp + kTile - 1) / kTile;         // router-gradient tiles
  /// Up-projection and down biases have gradients (db1 over F; gated: dbg | dbu over 2F).
  static constexpr bool kUpBiasGrad = !C::kGated || C::M::kBias;
  static constexpr int kB1T = C::kGated ? kPT : kFT;              // db1 tasks per expert
  /// Shared experts: one MLP kSF wide over every token (0: none); its pre-activations
  /// are kSPF wide.
  static constexpr int kSF = C::SH::F;
  static constexpr int kSPF = C::kGated ? 2 * kSF : kSF;
  static constexpr int kSFT = (kSF + kTile - 1) / kTile;          // shared dH column tiles
  static constexpr int kSPT = (kSPF + kTile - 1) / kTile;         // shared dW1 column tiles
  static constexpr int kTLd = kTile + 8;                         // transpose tile row stride
  static_assert(kTile * kTLd * int(sizeof(S)) <= G::kSmemBytes,
                "the transpose tile must fit the GEMM's shared memory");
  /// Shared memory: the tile GEMM, then four tables over experts; expert parallelism
  /// adds the forward's two prefix arrays over peers (2 * (world + 1) ints, at launch).
  static constexpr int kSmemTables = 4 * (E + 1) * int(sizeof(int32_t));
  static constexpr int kSmemBytes = G::kSmemBytes + kSmemTables;

  const abi::MoeLayout& L;          // the saved forward (its slot's routing and rows)
  const abi::MoeBackwardLayout& B;
  const S* x;
  const S* dy;
  S* dx;
  GradOut out;
  int T;           // tokens of the saved forward
  int TT;          // token tiles
  bool accumulate;
  bool given;      // the forward ran on the caller's routing: d_weights, no router gradient
  char* smem;
  int32_t* s_eoff;   // [E + 1] first compact row of each expert
  int32_t* s_rp;     // [El + 1] first column of each local expert in the [*, RP] buffers
                     // (its rows from every source, rounded up to 8)
  int32_t* s_rtoff;  // [El + 1] first row tile of each local expert
  int32_t* s_lexp;   // [El] global id of each local expert
  WaitSite site;
  TaskRing ring;
  Kernel<C>* fk = nullptr;  // expert parallelism: the forward's protocol helpers

  FMOE_DEVICE Backward(const abi::MoeLayout& l, const abi::MoeBackwardLayout& b, const S* x_,
                       const S* dy_, S* dx_, GradOut g, int tokens, bool acc, char* sm,
                       int32_t* tables, uint32_t epoch, bool given_)
      : L(l), B(b), x(x_), dy(dy_), dx(dx_), out(g), T(tokens),
        TT((tokens + kTile - 1) / kTile), accumulate(acc), given(given_), smem(sm), s_eoff(tables),
        s_rp(tables + (E + 1)), s_rtoff(tables + 2 * (E + 1)), s_lexp(tables + 3 * (E + 1)),
        site{l.fault, l.timeout_ns, l.rank, epoch, l.state, l.world},
        ring{b.ring, l.state, b.ring_capacity, epoch + 1u, abi::kPhaseBwdRingSlot,
             abi::kPhaseBwdRingFull} {}

  FMOE_DEVICE static int tiles_of(int rows) { return (rows + kTile - 1) / kTile; }
  FMOE_DEVICE int rp() const { return B.rp_capacity; }  // row stride of the [*, RP] buffers
  FMOE_DEVICE int tp() const { return B.tp_capacity; }  // row stride of the [*, TP] buffers

  // ---------------------------------------------------------------- tables
  /// Every block: compact-row and padded-column offsets over experts, row-tile offsets
  /// over local experts (the saved forward's expert_kept). Returns the local row tiles.
  FMOE_DEVICE int expert_offsets() {
    const int el = L.local_experts;
    for (int e = threadIdx.x; e < E; e += C::kThreads) {
      s_eoff[e] = L.expert_kept[e];
      if constexpr (C::kEP) {
        if (L.expert_owner[e] == L.rank) s_lexp[L.expert_local[e]] = e;
      } else {
        s_lexp[e] = e;
      }
    }
    __syncthreads();
    for (int le = threadIdx.x; le < el; le += C::kThreads) {
      s_rtoff[le] = tiles_of(s_eoff[s_lexp[le]]);
    }
    __syncthreads();
    Kernel<C>::block_scan(s_eoff, E);
    Kernel<C>::block_scan(s_rtoff, el);
    return s_rtoff[el];
  }

  /// Rows of local expert le that source s assigned (this rank: its compact rows;
  /// a peer: its header, after the exchange).
  FMOE_DEVICE int rows_from(int s, int le) const {
    if (!C::kEP || s == L.rank) return s_eoff[s_lexp[le] + 1] - s_eoff[s_lexp[le]];
    return load_cg(&L.headers[(int64_t(s) * L.max_local_experts + le) * 2]);
  }

  /// Column of source s's first row of local expert le: sources in rank order, so the
  /// rows of an expert are in the one-GPU order (tokens rank-major).
  FMOE_DEVICE int source_col(int s, int le) const {
    int col = s_rp[le];
    for (int q = 0; q < s; ++q) col += rows_from(q, le);  // bounded: world PEs
    return col;
  }

  FMOE_DEVICE int rows_total(int le) const {
    int n = 0;
    for (int q = 0; q < (C::kEP ? L.world : 1); ++q) n += rows_from(q, le);  // bounded: world
    return n;
  }

  /// s_rp: each local expert's columns (every source's rows, padded to 8 at its end).
  FMOE_DEVICE void column_offsets() {
    const int el = L.local_experts;
    for (int le = threadIdx.x; le < el; le += C::kThreads) s_rp[le] = (rows_total(le) + 7) & ~7;
    __syncthreads();
    Kernel<C>::block_scan(s_rp, el);
  }

  /// Columns a tile of `rows` rows starting at column c0 of local expert le writes: its
  /// rows, and the zero padding after them when it ends the expert's columns.
  FMOE_DEVICE int write_rows(int le, int c0, int rows) const {
    const int end = c0 + rows;
    return end == s_rp[le] + rows_total(le) ? s_rp[le + 1] - c0 : rows;
  }

  struct RowTile {
    int le;     // local expert
    int rows;   // valid rows (1..kTile)
    int row0;   // first compact row
    int col0;   // its column in the [*, RP] buffers
  };

  FMOE_DEVICE RowTile local_tile(int rt) const {
    const int le = find_interval(s_rtoff, L.local_experts, rt);
    const int e = s_lexp[le];
    const int r = rt - s_rtoff[le];
    const int kept = s_eoff[e + 1] - s_eoff[e];
    const int c0 = (C::kEP ? source_col(L.rank, le) : s_rp[le]) + r * kTile;
    return RowTile{le, min(kTile, kept - r * kTile), s_eoff[e] + r * kTile, c0};
  }

  FMOE_DEVICE int expert_rowtiles(int le) const { return s_rtoff[le + 1] - s_rtoff[le]; }

  // ---------------------------------------------------------------- phase 0: gate
  FMOE_DEVICE void zero_counters() {
    const int gtid = blockIdx.x * C::kThreads + threadIdx.x;
    const int gsize = gridDim.x * C::kThreads;
    if (gtid == 0) {
      L.state[abi::kHead] = 0u;
      L.state[abi::kPublished] = 0u;
      L.state[abi::kTraced] = 0u;
    }
    for (int i = gtid; i < L.max_rowtiles; i += gsize) B.dep_dx[i] = 0u;
    for (int i = gtid; i < L.local_experts; i += gsize) B.dep_expert[i] = 0u;
    for (int i = gtid; i < TT * kHT; i += gsize) B.dep_dxsum[i] = 0u;
    if constexpr (C::kShared) {
      for (int i = gtid; i <= TT; i += gsize) B.dep_sh[i] = 0u;
    }
    if constexpr (C::kEP) {
      for (int i = gtid; i < 2 * L.world * L.max_peer_tiles; i += gsize) B.dep_remote[i] = 0u;
    }
  }

  /// The forward's router logits again (same GEMM, same bits); with every expert in one
  /// gate tile, the per-token pass runs from shared memory at once.
  FMOE_DEVICE void gate_tile(int tile) {
    const int tt = tile / C::kGateTiles, et = tile % C::kGateTiles;
    const int t0 = tt * kTile, e0 = et * G::BN;
    const S* router = static_cast<const S*>(L.router_t);
    const float* staged = G::compute_tile(
        smem, H,
        [&](int r) -> const S* { return t0 + r < T ? x + int64_t(t0 + r) * H : nullptr; },
        [&](int r) -> const S* { return e0 + r < E ? router + int64_t(e0 + r) * H : nullptr; },
        min(kTile, T - t0));
    if constexpr (C::kFusedTopk) {
      const int warp = int(threadIdx.x >> 5);
      for (int r = warp; r < kTile && t0 + r < T; r += C::kWarps) {
        token_pass(t0 + r, [&](int e) { return staged[r * G::kStageLd + e]; });
      }
    } else {
      G::for_each_row_chunk(staged, G::BN, [&](int r, int c, float(&v)[8]) {
        if (t0 + r >= T || e0 + c >= kEp) return;
        float4* dst = reinterpret_cast<float4*>(L.logits + int64_t(t0 + r) * kEp + e0 + c);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
      });
    }
    __syncthreads();
  }

  // ---------------------------------------------------------------- phase 1: tokens
  FMOE_DEVICE void token_pass(int t) {
    const float* row = L.logits + int64_t(t) * kEp;
    token_pass(t, [&](int e) { return load_cg(row + e); });
  }

  /**
   * One warp per token t: the forward's logits and scores again (its operations in its
   * order: router bias, rounding, softmax or sigmoid), then per slot j the combine
   * weight c_j the forward used (topk_weight; renormalised over the kept slots when
   * renormalising after the drop), the combine-weight gradient g_j = <dy_t,
   * y_expert[row]> (float32, lanes then a butterfly: a fixed order; 0 for a dropped
   * slot) and dye[row] = c_j dy_t. Then the router, with s the routed scaling, q_j the
   * chosen scores, u_j = c_j / s and gu = sum_j g_j u_j:
   *   renormalised: dq_j = s (g_j - gu) / N, N = sum of q over the slots normalised
   *   (all k, or the kept ones after the drop; dropped ones then get 0); else
   *   dq_j = s g_j; softmax dz = p (dp - <dp, p>), sigmoid dz = dp p (1 - p);
   *   softmax after top-k: dz[e_j] = c_j (g_j - gu), other experts 0.
   * A marked token (a non-finite logit) gets NaN in every dz. Stored in the storage type.
   */
  template <class Logit>
  FMOE_DEVICE void token_pass(int t, Logit logit) {
    using R = typename C::R;
    constexpr bool kOne = R::kScaleBits == 0x3f800000u;
    constexpr float kScale = cuda::std::bit_cast<float>(R::kScaleBits);
    const int lane = threadIdx.x & 31;
    constexpr float kNegInf = -cuda::std::numeric_limits<float>::infinity();
    float v[C::kPerLane];  // scores (logits with softmax after top-k)
    float m = kNegInf;
    uint32_t bad = 0u;
#pragma unroll
    for (int i = 0; i < C::kPerLane; ++i) {
      const int e = lane + 32 * i;
      float z = kNegInf;
      if (e < E) {
        z = logit(e);
        if constexpr (R::kRouterBias) z += L.router_bias[e];
        if constexpr (R::kRoundLogits) z = Elem::to_float(Elem::from_float(z));
        bad |= uint32_t((__float_as_uint(z) & 0x7f800000u) == 0x7f800000u);
      }
      v[i] = z;
      m = fmaxf(m, z);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) bad |= __shfl_xor_sync(0xffffffffu, bad, o);
    if constexpr (R::kSigmoid) {
#pragma unroll
      for (int i = 0; i < C::kPerLane; ++i) {
        v[i] = (lane + 32 * i < E) ? 1.0f / (1.0f + expf(-v[i])) : 0.0f;
      }
    } else if constexpr (!R::kSoftmaxAfterTopk) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < C::kPerLane; ++i) {
        v[i] = (lane + 32 * i < E) ? expf(v[i] - m) : 0.0f;
        sum += v[i];
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
      for (int i = 0; i < C::kPerLane; ++i) v[i] = v[i] / sum;
    }

    const S* dyt = dy + int64_t(t) * H;
    float g[K], c[K], ps[K];
    int es[K], rows[K];
    float drop_scale = 1.0f;  // renormalising after the drop: the forward combine's scale
    if constexpr (R::kDropRenorm) {
      float kept = 0.0f;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        if (L.token_rows[t * K + j] >= 0) kept += L.topk_weight[t * K + j];
      }
      drop_scale = kept > 0.0f ? kScale / kept : 0.0f;
    }
#pragma unroll
    for (int j = 0; j < K; ++j) {
      es[j] = L.topk_expert[t * K + j];
      rows[j] = L.token_rows[t * K + j];
      // After the drop, a dropped slot weighs nothing (its logit reaches no kept weight).
      c[j] = !R::kDropRenorm ? L.topk_weight[t * K + j]
             : rows[j] >= 0  ? L.topk_weight[t * K + j] * drop_scale
                             : 0.0f;
      float mine = 0.0f;
#pragma unroll
      for (int i = 0; i < C::kPerLane; ++i) {
        if (i == (es[j] >> 5)) mine = v[i];
      }
      ps[j] = __shfl_sync(0xffffffffu, mine, es[j] & 31);
      float acc = 0.0f;
      if (rows[j] >= 0) {  // warp-uniform
        const S* ye = static_cast<const S*>(L.y_expert) + int64_t(rows[j]) * H;
        S* de = static_cast<S*>(B.dye) + int64_t(rows[j]) * H;
        for (int col = lane * 8; col < H; col += 256) {
          float a[8], b[8];
          gemm::load8<Elem>(dyt + col, a);
          gemm::load8<Elem, true>(ye + col, b);
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            acc = fmaf(a[q], b[q], acc);
            a[q] *= c[j];
          }
          gemm::store8<Elem>(de + col, a);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      }
      g[j] = acc;
    }
    float gu = 0.0f;  // sum_j g_j u_j, u_j = c_j / s
#pragma unroll
    for (int j = 0; j < K; ++j) gu = fmaf(g[j], c[j], gu);
    if constexpr (!kOne) gu = gu / kScale;
    float ds[K];  // dL/dq_j (softmax after top-k: dL/dz at e_j)
    float dot = 0.0f;
    if (given) {  // warp-uniform: dL/dw of the caller's weights; the router gets nothing
      // Renormalised after the drop, c_i = kept_i s w_i / W: dw_i = kept_i (s/W)(g_i - gu).
      if (lane == 0) {
#pragma unroll
        for (int j = 0; j < K; ++j) {
          B.d_weights[t * K + j] =
              !R::kDropRenorm ? g[j] : rows[j] >= 0 ? drop_scale * (g[j] - gu) : 0.0f;
        }
      }
#pragma unroll
      for (int j = 0; j < K; ++j) ds[j] = 0.0f;
    } else if constexpr (R::kSoftmaxAfterTopk) {
#pragma unroll
      for (int j = 0; j < K; ++j) ds[j] = c[j] * (g[j] - gu);
    } else {
      float total = 1.0f;  // N
      if constexpr (C::kRenorm || R::kDropRenorm) {
        total = 0.0f;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          if (!R::kDropRenorm || rows[j] >= 0) total += ps[j];
        }
      }
#pragma unroll
      for (int j = 0; j < K; ++j) {
        if constexpr (R::kDropRenorm) {
          ds[j] = rows[j] >= 0 && total > 0.0f ? kScale * (g[j] - gu) / total : 0.0f;
        } else if constexpr (C::kRenorm) {
          ds[j] = (kOne ? g[j] - gu : kScale * (g[j] - gu)) / total;
        } else {
          ds[j] = kOne ? g[j] : kScale * g[j];
        }
        dot = fmaf(ds[j], ps[j], dot);
      }
    }
    float dl = 0.0f;  // the shared experts' gate logit's gradient
    if constexpr (C::kShared) dl = shared_rows(t, dyt, marked(t));
    S* dzt = static_cast<S*>(B.dz) + int64_t(t) * kEp;
#pragma unroll
    for (int i = 0; i < C::kPerLane; ++i) {
      const int e = lane + 32 * i;
      if (e < kEp) {
        float dp = 0.0f;
#pragma unroll
        for (int j = 0; j < K; ++j) dp += es[j] == e ? ds[j] : 0.0f;
        float dz;
        if constexpr (R::kSoftmaxAfterTopk) {
          dz = dp;
        } else if constexpr (R::kSigmoid) {
          dz = dp * v[i] * (1.0f - v[i]);
        } else {
          dz = v[i] * (dp - dot);
        }
        if (e >= E) dz = C::SH::kGate && e == E ? dl : 0.0f;
        else if (given) dz = 0.0f;  // no router term, not even a NaN one
        else if (bad != 0u) dz = cuda::std::numeric_limits<float>::quiet_NaN();
        dzt[e] = Elem::from_float(dz);
      }
    }
    if constexpr (kEp > 32 * C::kPerLane) {  // the gate's column past the experts' lanes
      for (int e = 32 * C::kPerLane + lane; e < kEp; e += 32) {  // bounded: kEp columns
        dzt[e] = Elem::from_float(C::SH::kGate && e == E ? dl : 0.0f);
      }
    }
  }

  /// Whether token t is marked (rule 10: it reached no expert, the shared ones neither).
  FMOE_DEVICE bool marked(int t) const { return L.token_rows[t * K] == abi::kRowMarked; }

  /**
   * The shared MLP's part of token t (one warp): dys = g dy (g the saved gate, 1
   * without), zeros for a marked token; returns the gate logit's gradient
   * <dy, ys> g (1 - g) (0 without a gate or for a marked token).
   */
  FMOE_DEVICE float shared_rows(int t, const S* dyt, bool is_marked) {
    const int lane = threadIdx.x & 31;
    const float g = C::SH::kGate ? L.shared_scale[t] : 1.0f;
    const S* yst = static_cast<const S*>(L.ys) + int64_t(t) * H;
    S* dst = static_cast<S*>(B.dys) + int64_t(t) * H;
    float acc = 0.0f;
    for (int col = lane * 8; col < H; col += 256) {  // bounded: H / 256 chunks per lane
      float a[8];
      gemm::load8<Elem>(dyt + col, a);
      if constexpr (C::SH::kGate) {
        float b[8];
        gemm::load8<Elem, true>(yst + col, b);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc = fmaf(a[q], b[q], acc);
      }
#pragma unroll
      for (int q = 0; q < 8; ++q) a[q] = is_marked ? 0.0f : a[q] * g;
      gemm::store8<Elem>(dst + col, a);
    }
    if constexpr (!C::SH::kGate) return 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    return is_marked ? 0.0f : acc * g * (1.0f - g);
  }

  // ---------------------------------------------------------------- phase 2: transposes
  /**
   * Transpose `rows` (<= kTile) rows x `cols` (<= kTile, a multiple of 8) columns:
   * src_row(r) points at row r's first column; dst_col(c) + r receives element (r, c),
   * for r up to rows rounded to 8 (zeros past `rows`: the K padding of the weight
   * gradients; also a row whose src_row is null). Sources may come from other blocks
   * of this launch: read through L2.
   */
  template <class SrcRow, class DstCol>
  FMOE_DEVICE void transpose_tile(int rows, int cols, SrcRow src_row, DstCol dst_col) {
    transpose_tile(rows, (rows + 7) & ~7, cols, src_row, dst_col);
  }

  /// As above, writing `out_rows` (>= rows) destination elements per column: zeros past
  /// `rows`. Destinations that are not 16-byte aligned (expert parallelism: a source's
  /// rows start anywhere in its expert's columns) are stored element by element.
  template <class SrcRow, class DstCol>
  FMOE_DEVICE void transpose_tile(int rows, int out_rows, int cols, SrcRow src_row,
                                  DstCol dst_col) {
    constexpr int kVec = 16 / int(sizeof(S));
    constexpr int kRowVecs = kTile / kVec;
    S* tile = reinterpret_cast<S*>(smem);
    for (int v = threadIdx.x; v < kTile * kRowVecs; v += C::kThreads) {
      const int r = v / kRowVecs, c = (v % kRowVecs) * kVec;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r < rows && c < cols) {
        const S* src = src_row(r);
        if (src != nullptr) val = __ldcg(reinterpret_cast<const uint4*>(src + c));
      }
      *reinterpret_cast<uint4*>(tile + r * kTLd + c) = val;
    }
    __syncthreads();
    const bool aligned = (out_rows & 7) == 0 &&
                         (reinterpret_cast<cuda::std::uintptr_t>(dst_col(0)) & 15) == 0;
    if (aligned) {  // uniform: the same for every thread
      const int chunks = out_rows >> 3;
      for (int v = threadIdx.x; v < cols * chunks; v += C::kThreads) {
        const int c = v / chunks, r0 = (v % chunks) * 8;
        gemm::Elements8<S> e8;
#pragma unroll
        for (int q = 0; q < 8; ++q) e8.e[q] = tile[(r0 + q) * kTLd + c];
        const auto vec = cuda::std::bit_cast<gemm::Vectors8<S>>(e8);
        uint4* dst = reinterpret_cast<uint4*>(dst_col(c) + r0);
#pragma unroll
        for (int j = 0; j < gemm::Vectors8<S>::kCount; ++j) dst[j] = vec.v[j];
      }
    } else {
      for (int v = threadIdx.x; v < cols * out_rows; v += C::kThreads) {
        const int c = v / out_rows, r = v % out_rows;
        dst_col(c)[r] = tile[r * kTLd + c];
      }
    }
    __syncthreads();
  }

  /// Phase 2 (grid-stride over blocks): the K-major operands of the weight gradients.
  /// Per local row tile: dye^T, the gathered x^T and z^T into its columns of [*, RP];
  /// per received tile (expert parallelism): x^T and z^T of the rows the saved forward
  /// received (their dye^T comes with their dH); per token tile: x^T and dz^T into
  /// columns of [*, TP].
  FMOE_DEVICE void transposes(int n_rt, int n_recv) {
    // Per token tile: x^T, dz^T, and with shared experts dys^T, zs^T.
    constexpr int kPerRt = 2 * kHT + kFT, kPerRecv = kHT + kFT;
    constexpr int kPerTt = kHT + kEpT + (C::kShared ? kHT + kSFT : 0);
    const int local_jobs = n_rt * kPerRt, recv_jobs = n_recv * kPerRecv;
    const int jobs = local_jobs + recv_jobs + TT * kPerTt;
    const S* dye = static_cast<const S*>(B.dye);
    const S* z = static_cast<const S*>(L.z);
    const S* dz = static_cast<const S*>(B.dz);
    for (int j = blockIdx.x; j < jobs; j += gridDim.x) {
      if (j < local_jobs) {
        const RowTile tile = local_tile(j / kPerRt);
        const int q = j % kPerRt;
        const int out = write_rows(tile.le, tile.col0, tile.rows);
        if (q < kHT) {
          row_transpose(tile.rows, out, q * kTile, H, tile.col0, B.dye_t,
                        [&](int r) { return dye + int64_t(tile.row0 + r) * H; });
        } else if (q < 2 * kHT) {
          row_transpose(tile.rows, out, (q - kHT) * kTile, H, tile.col0, B.xg_t,
                        [&](int r) { return x + int64_t(L.row_token[tile.row0 + r]) * H; });
        } else {
          row_transpose(tile.rows, out, (q - 2 * kHT) * kTile, F, tile.col0, B.z_t,
                        [&](int r) { return z + int64_t(tile.row0 + r) * F; });
        }
      } else if (j < local_jobs + recv_jobs) {
#if FLASHMOE_NVSHMEM
        if constexpr (C::kEP) {
          const int g = (j - local_jobs) / kPerRecv, q = (j - local_jobs) % kPerRecv;
          const RemoteTile rt = remote_tile(g);
          const int out = write_rows(rt.pt.le, rt.col0, rt.pt.rows);
          if (q < kHT) {
            const S* xr = static_cast<const S*>(L.recv_saved) + rt.row0 * H;
            row_transpose(rt.pt.rows, out, q * kTile, H, rt.col0, B.xg_t,
                          [&](int r) { return xr + int64_t(r) * H; });
          } else {
            const S* zr = static_cast<const S*>(L.z_remote) + rt.row0 * F;
            row_transpose(rt.pt.rows, out, (q - kHT) * kTile, F, rt.col0, B.z_t,
                          [&](int r) { return zr + int64_t(r) * F; });
          }
        }
#endif
      } else {
        const int i = j - local_jobs - recv_jobs;
        const int t0 = (i / kPerTt) * kTile, q = i % kPerTt;
        const int rows = min(kTile, T - t0);
        // With shared experts a marked token's x column is zero: it reaches none of
        // their gradients, and the router's stay NaN through its dz row.
        const auto kept = [&](int r) { return !C::kShared || !marked(t0 + r); };
        if (q < kHT) {
          const int c0 = q * kTile;
          S* dst = static_cast<S*>(B.x_t);
          transpose_tile(
              rows, min(kTile, H - c0),
              [&](int r) { return kept(r) ? x + int64_t(t0 + r) * H + c0 : nullptr; },
              [&](int c) { return dst + int64_t(c0 + c) * tp() + t0; });
        } else if (q < kHT + kEpT) {
          const int c0 = (q - kHT) * kTile;
          S* dst = static_cast<S*>(B.dz_t);
          transpose_tile(
              rows, min(kTile, kEp - c0), [&](int r) { return dz + int64_t(t0 + r) * kEp + c0; },
              [&](int c) { return dst + int64_t(c0 + c) * tp() + t0; });
        } else if (q < 2 * kHT + kEpT) {
          const int c0 = (q - kHT - kEpT) * kTile;
          const S* src = static_cast<const S*>(B.dys);
          S* dst = static_cast<S*>(B.dys_t);
          transpose_tile(
              rows, min(kTile, H - c0), [&](int r) { return src + int64_t(t0 + r) * H + c0; },
              [&](int c) { return dst + int64_t(c0 + c) * tp() + t0; });
        } else {
          const int c0 = (q - 2 * kHT - kEpT) * kTile;
          const S* src = static_cast<const S*>(L.zs);
          S* dst = static_cast<S*>(B.zs_t);
          transpose_tile(
              rows, min(kTile, kSF - c0),
              [&](int r) { return kept(r) ? src + int64_t(t0 + r) * kSF + c0 : nullptr; },
              [&](int c) { return dst + int64_t(c0 + c) * tp() + t0; });
        }
      }
    }
  }

  /// Columns [c0, c0 + kTile) (of `width`) of `rows` rows row(r) into columns
  /// col0 + r of a [*, RP] buffer, `out` destination elements per column.
  template <class Row>
  FMOE_DEVICE void row_transpose(int rows, int out, int c0, int width, int col0, void* dst_t,
                                 Row row) {
    S* dst = static_cast<S*>(dst_t);
    transpose_tile(rows, out, min(kTile, width - c0), [&](int r) { return row(r) + c0; },
                   [&](int c) { return dst + int64_t(c0 + c) * rp() + col0; });
  }

  /// The weight-gradient tasks of local expert le: dW1 tiles, and db1 columns (vanilla;
  /// gated with biases: dbg | dbu). One thread, after its release fence.
  FMOE_DEVICE bool publish_expert(int le) {
    bool ok = ring.publish(kHT * kPT, [&](int i) {
      return bdesc(uint32_t(le * kHT * kPT + i), kBwdDW1);
    }, site);
    if constexpr (kUpBiasGrad) {
      ok = ok && ring.publish(kB1T, [&](int i) {
        return bdesc(uint32_t(le * kB1T + i), kBwdDB1);
      }, site);
    }
    if constexpr (C::kEP) {  // received dye^T lands with the dH tasks: dW2 and db2 wait too
      ok = ok && ring.publish(kFT * kHT, [&](int i) {
        return bdesc(uint32_t(le * kFT * kHT + i), kBwdDW2);
      }, site);
      if constexpr (kUpBiasGrad) {
        ok = ok && ring.publish(kHT, [&](int i) {
          return bdesc(uint32_t(le * kHT + i), kBwdDB2);
        }, site);
      }
    }
    return ok;
  }

  /// Tasks nothing would publish: dx of token tiles without a kept assignment, weight
  /// gradients of experts without rows (they are zero, or untouched when accumulating).
  FMOE_DEVICE bool publish_empty() {
    bool ok = true;
    if (threadIdx.x == 0) {
      for (int tt = blockIdx.x; ok && tt < TT; tt += gridDim.x) {
        if (L.tile_kept[tt] == 0) {
          ok = ring.publish(kHT, [&](int i) {
            return bdesc(uint32_t(tt * kHT + i), kBwdDXSum);
          }, site);
        }
      }
      for (int le = blockIdx.x; ok && le < L.local_experts; le += gridDim.x) {
        if (expert_dh_tasks(le) == 0u) ok = publish_expert(le);
      }
    }
    return !block_fault_raised(site, !ok);
  }

  // ---------------------------------------------------------------- tasks
  /// Store (or add) 8 float32 gradients at a 16-byte aligned address.
  FMOE_DEVICE void put8(float* p, const float (&v)[8]) const {
    float4* d = reinterpret_cast<float4*>(p);
    float4 lo = make_float4(v[0], v[1], v[2], v[3]), hi = make_float4(v[4], v[5], v[6], v[7]);
    if (accumulate) {
      const float4 a = d[0], b = d[1];
      lo.x += a.x; lo.y += a.y; lo.z += a.z; lo.w += a.w;
      hi.x += b.x; hi.y += b.y; hi.z += b.z; hi.w += b.w;
    }
    d[0] = lo;
    d[1] = hi;
  }

  /**
   * One kTile x kTile tile of a weight gradient, C = A B^T over k (a multiple of 8, the
   * expert's rows or the tokens, padded with zeros); epi(r, c, v) stores 8 columns. With
   * k = 0 the tile is zero: stored as such, or skipped when accumulating.
   */
  template <class ARow, class BRow, class Epi>
  FMOE_DEVICE void weight_tile(int k, ARow a_row, BRow b_row, Epi epi) {
    if (k == 0) {
      if (accumulate) return;
      for (int v = threadIdx.x; v < kTile * (kTile / 8); v += C::kThreads) {
        float zeros[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        epi(v / (kTile / 8), (v % (kTile / 8)) * 8, zeros);
      }
      __syncthreads();
      return;
    }
    const float* staged = G::compute_tile(smem, k, a_row, b_row);
    G::for_each_row_chunk(staged, kTile, epi);
    __syncthreads();
  }

  /// The gated intermediate's gradient dh back to its pre-activations g and u: act(g) u
  /// gives dg = dh u act'(g), du = dh act(g); the clamped SwiGLU h = gc sigmoid(a gc)
  /// (uc + 1), gc = min(g, L), uc = clip(u, -L, L), gives dg = dh (uc + 1) (s + a gc s
  /// (1 - s)) where g <= L (else 0) and du = dh gc s where -L <= u <= L (else 0), s =
  /// sigmoid(a gc): the clamps pass the gradient on at their bounds (torch.clamp's rule).
  FMOE_DEVICE static void gated_grad(float dh, float g, float u, float& dg, float& du) {
    if constexpr (C::kAct == gemm::kSwigluClamped) {
      constexpr float kL = C::M::kLimit, kA = C::M::kAlpha;
      const float gc = fminf(g, kL), uc = fminf(fmaxf(u, -kL), kL);
      const float sg = 1.0f / (1.0f + expf(-kA * gc));
      dg = g <= kL ? dh * (uc + 1.0f) * (sg + kA * gc * sg * (1.0f - sg)) : 0.0f;
      du = u >= -kL && u <= kL ? dh * gc * sg : 0.0f;
    } else {
      dg = dh * u * activate_grad<C::kAct>(g);
      du = dh * gemm::activate<C::kAct>(g);
    }
  }

  /**
   * dH of `rows` rows (dye rows a, pre-activations pre) of one MLP kF_ wide (w2: its
   * [kF_, H] down weights) x column tile f0, then dA (vanilla dH act'(a); gated dG, dU:
   * gated_grad) rows into da, zeros for the rows zero_row(r) names, and their
   * transposes into columns col0.. of da_t (row stride ld; `out` elements per column).
   */
  template <int kF_, class ZeroRow>
  FMOE_DEVICE void dh_tile(const S* w2, int rows, int f0, const S* a, const S* pre, S* da,
                           S* da_t, int64_t ld, int col0, int out, ZeroRow zero_row) {
    constexpr int kPF_ = C::kGated ? 2 * kF_ : kF_;
    const float* staged = G::compute_tile(
        smem, H, [&](int r) -> const S* { return r < rows ? a + int64_t(r) * H : nullptr; },
        [&](int r) -> const S* { return f0 + r < kF_ ? w2 + int64_t(f0 + r) * H : nullptr; },
        rows);
    G::for_each_row_chunk(staged, kTile, [&](int r, int c, float(&v)[8]) {
      const int n = f0 + c;
      if (r >= rows || n >= kF_) return;
      const bool zero = zero_row(r);
      if constexpr (C::kGated) {
        float gv[8], uv[8], dg[8], du[8];
        gemm::load8<Elem>(pre + int64_t(r) * kPF_ + n, gv);
        gemm::load8<Elem>(pre + int64_t(r) * kPF_ + kF_ + n, uv);
#pragma unroll
        for (int q = 0; q < 8; ++q) {
          gated_grad(v[q], gv[q], uv[q], dg[q], du[q]);
          if (zero) dg[q] = du[q] = 0.0f;
        }
        gemm::store8<Elem>(da + int64_t(r) * kPF_ + n, dg);
        gemm::store8<Elem>(da + int64_t(r) * kPF_ + kF_ + n, du);
      } else {
        float av[8];
        gemm::load8<Elem>(pre + int64_t(r) * kPF_ + n, av);
#pragma unroll
        for (int q = 0; q < 8; ++q) v[q] = zero ? 0.0f : v[q] * activate_grad<C::kAct>(av[q]);
        gemm::store8<Elem>(da + int64_t(r) * kPF_ + n, v);
      }
    });
    __syncthreads();
    // dA^T from the rows this block just wrote (the staged tile is spent by now).
    const int cols = min(kTile, kF_ - f0);
    transpose_tile(rows, out, cols, [&](int r) { return da + int64_t(r) * kPF_ + f0; },
                   [&](int c) { return da_t + int64_t(f0 + c) * ld + col0; });
    if constexpr (C::kGated) {  // dU^T: rows kF_.. of da_t
      transpose_tile(rows, out, cols, [&](int r) { return da + int64_t(r) * kPF_ + kF_ + f0; },
                     [&](int c) { return da_t + int64_t(kF_ + f0 + c) * ld + col0; });
    }
  }

  /// dh_tile of local expert le's rows, into columns col0.. of the [*, RP] da_t.
  FMOE_DEVICE void dh_compute(int le, int rows, int f0, int col0, const S* a, const S* pre,
                              S* da) {
    dh_tile<F>(static_cast<const S*>(B.w_down_b) + int64_t(le) * F * H, rows, f0, a, pre, da,
               static_cast<S*>(B.da_t), rp(), col0, write_rows(le, col0, rows),
               [](int) { return false; });
  }

  /// dH tasks of local expert le expected before its weight gradients can run.
  FMOE_DEVICE uint32_t expert_dh_tasks(int le) const {
    int tiles = expert_rowtiles(le);
    if constexpr (C::kEP) {
      for (int q = 0; q < L.world; ++q) {  // bounded: world PEs
        if (q != L.rank) tiles += tiles_of(rows_from(q, le));
      }
    }
    return uint32_t(tiles * kFT);
  }

  /// One dH task of local expert le is done (one thread, after its release fence).
  FMOE_DEVICE bool expert_dh_done(int le) {
    if (atomicAdd(&B.dep_expert[le], 1u) + 1u != expert_dh_tasks(le)) return true;
    return publish_expert(le);
  }

  /// dH of a local row tile x F column tile; completes the row tile's dX dependency and,
  /// with the expert's last, its weight gradients.
  FMOE_DEVICE bool dh_task(int index) {
    const int rt = index / kFT, f0 = (index % kFT) * kTile;
    const RowTile tile = local_tile(rt);
    dh_compute(tile.le, tile.rows, f0, tile.col0,
               static_cast<const S*>(B.dye) + int64_t(tile.row0) * H,
               static_cast<const S*>(L.pre) + int64_t(tile.row0) * kPF,
               static_cast<S*>(B.da) + int64_t(tile.row0) * kPF);
    bool ok = true;
    if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(&B.dep_dx[rt], 1u) + 1u == uint32_t(kFT)) {
        ok = ring.publish(kHT, [&](int i) { return bdesc(uint32_t(rt * kHT + i), kBwdDX); },
                          site);
      }
      ok = expert_dh_done(tile.le) && ok;
    }
    return ok;
  }

  /// Credit `len` finished dX rows of token tile tt in H column tile col; the credit that
  /// completes it publishes the dx task. One thread, after its release fence.
  FMOE_DEVICE bool credit_run(int tt, int len, int col) {
    // Its kept rows (with shared experts the forward counts the tile's tokens too:
    // their dX rows credit it as well).
    const uint32_t target = uint32_t(L.tile_kept[tt]);
    const uint32_t done = atomicAdd(&B.dep_dxsum[tt * kHT + col], uint32_t(len)) + uint32_t(len);
    if (done != target) return true;
    return ring.publish(1, [&](int) { return bdesc(uint32_t(tt * kHT + col), kBwdDXSum); },
                        site);
  }

  /// dX = dA W1^T of `rows` dA rows (kPF_ wide) of one MLP (w1: [H, kPF_]), H column
  /// tile h0, float32 rows into out.
  template <int kPF_>
  FMOE_DEVICE void dx_tile(const S* w1, int rows, int h0, const S* da, float* out) {
    const float* staged = G::compute_tile(
        smem, kPF_,
        [&](int r) -> const S* { return r < rows ? da + int64_t(r) * kPF_ : nullptr; },
        [&](int r) -> const S* { return h0 + r < H ? w1 + int64_t(h0 + r) * kPF_ : nullptr; },
        rows);
    G::for_each_row_chunk(staged, kTile, [&](int r, int c, float(&v)[8]) {
      if (r >= rows || h0 + c >= H) return;
      float4* d = reinterpret_cast<float4*>(out + int64_t(r) * H + h0 + c);
      d[0] = make_float4(v[0], v[1], v[2], v[3]);
      d[1] = make_float4(v[4], v[5], v[6], v[7]);
    });
  }

  /// dx_tile of local expert le.
  FMOE_DEVICE void dx_compute(int le, int rows, int h0, const S* da, float* out) {
    dx_tile<kPF>(static_cast<const S*>(B.w_up_b) + int64_t(le) * H * kPF, rows, h0, da, out);
  }

  /// dX_e of a row tile x H column tile, float32 rows; credits the dx tasks of the
  /// token tiles its rows come from (one thread per row finds the runs).
  FMOE_DEVICE bool dx_task(int index) {
    static_assert(C::kThreads == kTile, "one thread per row of a row tile");
    __shared__ int32_t s_tt[kTile];
    const int rt = index / kHT, col = index % kHT, h0 = col * kTile;
    const RowTile tile = local_tile(rt);
    dx_compute(tile.le, tile.rows, h0, static_cast<const S*>(B.da) + int64_t(tile.row0) * kPF,
               B.dxe + int64_t(tile.row0) * H);
    const int r = threadIdx.x;
    if (r < tile.rows) s_tt[r] = L.row_token[tile.row0 + r] / kTile;
    __syncthreads();
    if (r >= tile.rows || (r > 0 && s_tt[r - 1] == s_tt[r])) return true;
    int len = 1;
    while (r + len < tile.rows && s_tt[r + len] == s_tt[r]) ++len;  // bounded: <= rows
    __threadfence();  // release (after the block barrier): the rows before the credit
    return credit_run(s_tt[r], len, col);
  }

  /// dx of a token tile x H column tile: dZ R^T (float32; the shared gate's column
  /// included), plus the token's dX rows in slot order, then the shared experts' dX row,
  /// rounded once to the storage type.
  FMOE_DEVICE void dxsum_task(int index) {
    const int tt = index / kHT, t0 = tt * kTile, h0 = (index % kHT) * kTile;
    const S* dz = static_cast<const S*>(B.dz);
    const S* rb = static_cast<const S*>(B.router_b);
    const float* staged = G::compute_tile(
        smem, kEp,
        [&](int r) -> const S* { return t0 + r < T ? dz + int64_t(t0 + r) * kEp : nullptr; },
        [&](int r) -> const S* { return h0 + r < H ? rb + int64_t(h0 + r) * kEp : nullptr; },
        min(kTile, T - t0));
    G::for_each_row_chunk(staged, kTile, [&](int r, int c, float(&v)[8]) {
      const int t = t0 + r, n = h0 + c;
      if (t >= T || n >= H) return;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int row = L.token_rows[t * K + j];
        if (row < 0) continue;
        const float4* p = reinterpret_cast<const float4*>(B.dxe + int64_t(row) * H + n);
        const float4 a = __ldcg(p), b = __ldcg(p + 1);
        v[0] += a.x; v[1] += a.y; v[2] += a.z; v[3] += a.w;
        v[4] += b.x; v[5] += b.y; v[6] += b.z; v[7] += b.w;
      }
      if constexpr (C::kShared) {  // after the slots, as the forward's combine
        const float4* p = reinterpret_cast<const float4*>(B.dxs + int64_t(t) * H + n);
        const float4 a = __ldcg(p), b = __ldcg(p + 1);
        v[0] += a.x; v[1] += a.y; v[2] += a.z; v[3] += a.w;
        v[4] += b.x; v[5] += b.y; v[6] += b.z; v[7] += b.w;
      }
      gemm::store8<Elem>(dx + int64_t(t) * H + n, v);
    });
    __syncthreads();
  }

  /// dW2 of one expert, F tile x H tile: z^T (dye^T)^T over the expert's rows.
  FMOE_DEVICE void dw2_task(int index) {
    const int le = index / (kFT * kHT), rem = index % (kFT * kHT);
    const int f0 = (rem / kHT) * kTile, h0 = (rem % kHT) * kTile;
    const int off = s_rp[le];
    const S* zt = static_cast<const S*>(B.z_t);
    const S* dyet = static_cast<const S*>(B.dye_t);
    float* dst = out.down + int64_t(le) * F * H;
    weight_tile(
        s_rp[le + 1] - off,
        [&](int r) -> const S* { return f0 + r < F ? zt + int64_t(f0 + r) * rp() + off : nullptr; },
        [&](int r) -> const S* {
          return h0 + r < H ? dyet + int64_t(h0 + r) * rp() + off : nullptr;
        },
        [&](int r, int c, float(&v)[8]) {
          if (f0 + r < F && h0 + c < H) put8(dst + int64_t(f0 + r) * H + h0 + c, v);
        });
  }

  /// dW1 (gated: dWg | dWu) of one expert, H tile x PF tile: xg^T (dA^T)^T.
  FMOE_DEVICE void dw1_task(int index) {
    const int le = index / (kHT * kPT), rem = index % (kHT * kPT);
    const int h0 = (rem / kPT) * kTile, n0 = (rem % kPT) * kTile;
    const int off = s_rp[le];
    const S* xgt = static_cast<const S*>(B.xg_t);
    const S* dat = static_cast<const S*>(B.da_t);
    weight_tile(
        s_rp[le + 1] - off,
        [&](int r) -> const S* {
          return h0 + r < H ? xgt + int64_t(h0 + r) * rp() + off : nullptr;
        },
        [&](int r) -> const S* {
          return n0 + r < kPF ? dat + int64_t(n0 + r) * rp() + off : nullptr;
        },
        [&](int r, int c, float(&v)[8]) {
          const int h = h0 + r, n = n0 + c;
          if (h >= H || n >= kPF) return;  // F is a multiple of 8: no chunk straddles F
          float* base = n < F ? out.up : out.up2;
          put8(base + (int64_t(le) * H + h) * F + (n < F ? n : n - F), v);
        });
  }

  /// Sums of `len` (a multiple of 8) elements of row h of a transposed buffer (src_t +
  /// h * stride), in order: a bias gradient's column sum.
  FMOE_DEVICE static float row_sum(const S* row, int len) {
    float s = 0.0f;
    for (int i = 0; i < len; i += 8) {  // bounded: len / 8 vectors
      float v[8];
      gemm::load8<Elem, true>(row + i, v);
#pragma unroll
      for (int q = 0; q < 8; ++q) s += v[q];
    }
    return s;
  }

  /// Store (or add) one float32 gradient; with nothing summed (k = 0) it is zero, or
  /// left as it is when accumulating.
  FMOE_DEVICE void put1(float* p, float v, bool any) const {
    if (any || !accumulate) *p = accumulate ? *p + v : v;
  }

  /// Column sums of one expert's rows of a [*, RP] buffer (rows h0.. of n_rows), in row
  /// order: db2 from dye^T, db1 (gated: dbg | dbu) from dA^T; dst(h) is where row h goes.
  template <class Dst>
  FMOE_DEVICE void bias_task(const S* src_t, int n_rows, int le, int h0, Dst dst) {
    const int off = s_rp[le], k = s_rp[le + 1] - off;
    const int h = h0 + threadIdx.x;
    if (h < n_rows) put1(dst(h), row_sum(src_t + int64_t(h) * rp() + off, k), k > 0);
    __syncthreads();
  }

  /// db1 tasks of one expert: vanilla db1 over F, gated (with biases) dbg | dbu over 2F.
  FMOE_DEVICE void db1_task(int index) {
    const int le = index / kB1T, h0 = (index % kB1T) * kTile;
    bias_task(static_cast<const S*>(B.da_t), kPF, le, h0, [&](int h) {
      if constexpr (C::kGated) {
        return h < F ? out.up_b + int64_t(le) * F + h : out.up2_b + int64_t(le) * F + h - F;
      } else {
        return out.up2 + int64_t(le) * F + h;
      }
    });
  }

  /// Router gradient, H tile x expert tile: x^T (dz^T)^T over the tokens; the tasks of
  /// the first H tile also sum the router bias's (dz's columns, in token order).
  FMOE_DEVICE void dr_task(int index) {
    const int h0 = (index / kEpT) * kTile, e0 = (index % kEpT) * kTile;
    const S* xt = static_cast<const S*>(B.x_t);
    const S* dzt = static_cast<const S*>(B.dz_t);
    if constexpr (C::R::kRouterBias) {  // the first H tile's tasks: dz's column sums
      const int e = e0 + int(threadIdx.x);
      if (h0 == 0 && e < E) {
        const int len = given ? 0 : (T + 7) & ~7;  // the caller's routing: no gradient
        put1(out.router_b + e, row_sum(dzt + int64_t(e) * tp(), len), len > 0);
      }
    }
    weight_tile(
        (T + 7) & ~7,
        [&](int r) -> const S* { return h0 + r < H ? xt + int64_t(h0 + r) * tp() : nullptr; },
        [&](int r) -> const S* { return e0 + r < kEp ? dzt + int64_t(e0 + r) * tp() : nullptr; },
        [&](int r, int c, float(&v)[8]) {
          const int h = h0 + r;
          if (h >= H) return;
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            const int e = e0 + c + q;  // the router's rows are E wide: no vector stores
            if (e < E) {  // the caller's routing: zero (x may hold a NaN)
              float* p = out.router + int64_t(h) * E + e;
              const float g = given ? 0.0f : v[q];
              *p = accumulate ? *p + g : g;
            } else if (C::SH::kGate && e == E) {  // column E: the shared experts' gate
              put1(out.s_gate + h, v[q], true);
            }
          }
        });
  }

  // ---------------------------------------------------------------- shared experts
  /// Column sums over the tokens of rows h0 + thread of a [*, TP] buffer (n_rows rows),
  /// in token order; dst(h) is where row h goes.
  template <class Dst>
  FMOE_DEVICE void token_sums(const S* src_t, int n_rows, int h0, Dst dst) {
    const int h = h0 + int(threadIdx.x), len = (T + 7) & ~7;
    if (h < n_rows) put1(dst(h), row_sum(src_t + int64_t(h) * tp(), len), len > 0);
    __syncthreads();
  }

  /// dHs of token tile tt x column tile f0 of the shared MLP (dys rows, its saved
  /// pre-activations), dAs into das and das_t; the tile's last one publishes its dXs
  /// tasks, the launch's last one the dW1s and db1s tasks. Marked tokens' dAs are zeros.
  FMOE_DEVICE bool shared_dh_task(int index) {
    const int tt = index / kSFT, f0 = (index % kSFT) * kTile;
    const int t0 = tt * kTile, rows = min(kTile, T - t0);
    dh_tile<kSF>(static_cast<const S*>(B.ws_down_b), rows, f0,
                 static_cast<const S*>(B.dys) + int64_t(t0) * H,
                 static_cast<const S*>(L.pre_s) + int64_t(t0) * kSPF,
                 static_cast<S*>(B.das) + int64_t(t0) * kSPF, static_cast<S*>(B.das_t), tp(), t0,
                 (rows + 7) & ~7, [&](int r) { return marked(t0 + r); });
    bool ok = true;
    if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(&B.dep_sh[tt], 1u) + 1u == uint32_t(kSFT)) {
        ok = ring.publish(kHT, [&](int i) {
          return bdesc(uint32_t(tt * kHT + i), kBwdSharedDX);
        }, site);
      }
      if (atomicAdd(&B.dep_sh[TT], 1u) + 1u == uint32_t(TT * kSFT)) {
        ok = ring.publish(kHT * kSPT, [&](int i) {
          return bdesc(uint32_t(kSFT * kHT + i), kBwdSharedDW);
        }, site) && ok;
        if constexpr (kUpBiasGrad) {
          ok = ok && ring.publish(kSPT, [&](int i) {
            return bdesc(uint32_t(kHT + i), kBwdSharedDB);
          }, site);
        }
      }
    }
    return ok;
  }

  /// dXs = dAs W1s^T of token tile tt x H column tile col (float32 rows into dxs); its
  /// rows credit the tile's dx task like routed rows.
  FMOE_DEVICE bool shared_dx_task(int index) {
    const int tt = index / kHT, col = index % kHT, t0 = tt * kTile;
    const int rows = min(kTile, T - t0);
    dx_tile<kSPF>(static_cast<const S*>(B.ws_up_b), rows, col * kTile,
                  static_cast<const S*>(B.das) + int64_t(t0) * kSPF, B.dxs + int64_t(t0) * H);
    __syncthreads();
    if (threadIdx.x != 0) return true;
    __threadfence();  // release (after the block barrier): the rows before the credit
    return credit_run(tt, rows, col);
  }

  /// The shared MLP's weight tiles over the tokens: [0, kSFT kHT) dW2s = zs^T (dys^T)^T
  /// (ready), then dW1s = x^T (das^T)^T, H tile x SPF tile (published).
  FMOE_DEVICE void shared_dw_task(int index) {
    const int k = (T + 7) & ~7;
    if (index < kSFT * kHT) {
      const int f0 = (index / kHT) * kTile, h0 = (index % kHT) * kTile;
      const S* zt = static_cast<const S*>(B.zs_t);
      const S* dyt = static_cast<const S*>(B.dys_t);
      weight_tile(
          k, [&](int r) -> const S* { return f0 + r < kSF ? zt + int64_t(f0 + r) * tp() : nullptr; },
          [&](int r) -> const S* { return h0 + r < H ? dyt + int64_t(h0 + r) * tp() : nullptr; },
          [&](int r, int c, float(&v)[8]) {
            if (f0 + r < kSF && h0 + c < H) put8(out.s_down + int64_t(f0 + r) * H + h0 + c, v);
          });
      return;
    }
    const int j = index - kSFT * kHT;
    const int h0 = (j / kSPT) * kTile, n0 = (j % kSPT) * kTile;
    const S* xt = static_cast<const S*>(B.x_t);
    const S* dat = static_cast<const S*>(B.das_t);
    weight_tile(
        k, [&](int r) -> const S* { return h0 + r < H ? xt + int64_t(h0 + r) * tp() : nullptr; },
        [&](int r) -> const S* { return n0 + r < kSPF ? dat + int64_t(n0 + r) * tp() : nullptr; },
        [&](int r, int c, float(&v)[8]) {
          const int h = h0 + r, n = n0 + c;
          if (h >= H || n >= kSPF) return;  // kSF is a multiple of 8: no chunk straddles it
          float* base = n < kSF ? out.s_up : out.s_up2;
          put8(base + int64_t(h) * kSF + (n < kSF ? n : n - kSF), v);
        });
  }

  /// The shared MLP's bias columns: [0, kHT) db2s from dys^T (ready), then db1s
  /// (gated: dbg | dbu) from das^T (published).
  FMOE_DEVICE void shared_db_task(int index) {
    if (index < kHT) {
      token_sums(static_cast<const S*>(B.dys_t), H, index * kTile,
                 [&](int h) { return out.s_down_b + h; });
      return;
    }
    token_sums(static_cast<const S*>(B.das_t), kSPF, (index - kHT) * kTile, [&](int h) {
      if constexpr (C::kGated) return h < kSF ? out.s_up_b + h : out.s_up2_b + h - kSF;
      else return out.s_up2 + h;  // vanilla: db1s in the up2 role, as the experts'
    });
  }

#if FLASHMOE_NVSHMEM
  // ---------------------------------------------------------------- expert parallelism
  using PeerTile = typename Kernel<C>::PeerTile;
  struct RemoteTile {
    PeerTile pt;
    int64_t row0;  // its first row in the [W, SR] receive-side buffers
    int col0;      // its first column in the [*, RP] buffers
  };

  /// Received tile g (over every source) and where its rows go.
  FMOE_DEVICE RemoteTile remote_tile(int g) const {
    const PeerTile pt = fk->recv_tile(g);
    const int src0 =
        load_cg(&L.headers[(int64_t(pt.peer) * L.max_local_experts + pt.le) * 2 + 1]);
    return RemoteTile{pt, fk->slot_row(pt), source_col(pt.peer, pt.le) + pt.src_row - src0};
  }

  /// Send task j: gather a tile's dye rows (contiguous compact rows) and put them into
  /// this rank's slot of the owner's receive buffer, with its dispatch signal.
  FMOE_DEVICE void send_task(int j) {
    const PeerTile t = fk->send_tile(j);
    S* stage = static_cast<S*>(L.send_rows) + int64_t(t.src_row) * H;
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const S*>(B.dye) +
                                                      int64_t(t.src_row) * H);
    constexpr int kRowVecs = H * int(sizeof(S)) / 16;
    for (int v = threadIdx.x; v < t.rows * kRowVecs; v += C::kThreads) {
      reinterpret_cast<uint4*>(stage)[v] = __ldcg(src + v);
    }
    __syncthreads();
    __threadfence();
    S* dst = static_cast<S*>(L.recv_rows) + (int64_t(L.rank) * L.slot_rows + t.dst_row) * H;
    nvshmemx_putmem_signal_nbi_block(dst, stage, size_t(t.rows) * H * sizeof(S),
                                     &L.dispatch_sig[int64_t(L.rank) * L.max_peer_tiles + t.index],
                                     ring.tag, NVSHMEM_SIGNAL_SET, t.peer);
  }

  /// dH of a received tile x F column tile (dye rows as they arrived); the first column
  /// tile's task also transposes the dye rows. Completes the tile's dX dependency and
  /// its part of the expert's.
  FMOE_DEVICE bool dh_remote_task(int index) {
    const int g = index / kFT, f0 = (index % kFT) * kTile;
    const RemoteTile rt = remote_tile(g);
    const int le = rt.pt.le, rows = rt.pt.rows;
    const S* a = static_cast<const S*>(L.recv_rows) + rt.row0 * H;
    dh_compute(le, rows, f0, rt.col0, a, static_cast<const S*>(L.pre_remote) + rt.row0 * kPF,
               static_cast<S*>(B.da_remote) + rt.row0 * kPF);
    if (f0 == 0) {
      const int out = write_rows(le, rt.col0, rows);
      for (int c0 = 0; c0 < H; c0 += kTile) {
        row_transpose(rows, out, c0, H, rt.col0, B.dye_t,
                      [&](int r) { return a + int64_t(r) * H; });
      }
    }
    bool ok = true;
    if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(&B.dep_remote[2 * g], 1u) + 1u == uint32_t(kFT)) {
        ok = ring.publish(kHT, [&](int i) {
          return bdesc(uint32_t(g * kHT + i), kBwdDXRemote);
        }, site);
      }
      ok = expert_dh_done(le) && ok;
    }
    return ok;
  }

  /// dX of a received tile x H column tile; the block finishing the tile's last column
  /// tile puts its float32 rows into the source's dxe, with the return signal.
  FMOE_DEVICE void dx_remote_task(int index) {
    __shared__ int s_last;
    const int g = index / kHT, h0 = (index % kHT) * kTile;
    const RemoteTile rt = remote_tile(g);
    float* out = B.dxe_remote + rt.row0 * H;
    dx_compute(rt.pt.le, rt.pt.rows, h0, static_cast<const S*>(B.da_remote) + rt.row0 * kPF,
               out);
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      s_last = atomicAdd(&B.dep_remote[2 * g + 1], 1u) + 1u == uint32_t(kHT);
      __threadfence();
    }
    __syncthreads();
    if (s_last) {
      __threadfence();  // every thread acquires: the put's copy reads other blocks' rows
      nvshmemx_putmem_signal_nbi_block(
          B.dxe + int64_t(rt.pt.src_row) * H, out, size_t(rt.pt.rows) * H * sizeof(float),
          &L.return_sig[int64_t(L.rank) * L.max_peer_tiles + rt.pt.index], ring.tag,
          NVSHMEM_SIGNAL_SET, rt.pt.peer);
    }
  }

  /// Credit returned dX rows [row0, row0 + rows) (one thread): every H column tile of
  /// each token tile they come from.
  FMOE_DEVICE bool credit_rows(int row0, int rows) {
    bool ok = true;
    int r = 0;
    while (r < rows) {  // bounded: r grows by at least one each turn, up to kTile
      const int tt = L.row_token[row0 + r] / kTile;
      int len = 1;
      while (r + len < rows && L.row_token[row0 + r + len] / kTile == tt) ++len;  // bounded: <= rows
      for (int c = 0; c < kHT; ++c) ok = credit_run(tt, len, c) && ok;
      r += len;
    }
    return ok;
  }

  /**
   * The subscriber (last block), as the forward's: each thread watches a window of its
   * events (dye tiles dispatched to us: their dH tasks; dX rows returned to us: credits
   * of the dx tasks) and handles them as they land.
   */
  FMOE_DEVICE bool subscribe() {
    constexpr int kWindow = 8;
    const int n_recv = fk->s_src[L.world], n = n_recv + fk->s_dst[L.world];
    const uint32_t tag = ring.tag;
    bool ok = true;
    for (int base = threadIdx.x; ok && base < n; base += kWindow * C::kThreads) {
      PeerTile pt[kWindow];
      const uint64_t* sig[kWindow];
      uint32_t pending = 0u;
      for (int j = 0; j < kWindow && base + j * C::kThreads < n; ++j) {
        const int ev = base + j * C::kThreads;
        pt[j] = fk->event_tile(ev, n_recv);
        sig[j] = (ev < n_recv ? L.dispatch_sig : L.return_sig) +
                 int64_t(pt[j].peer) * L.max_peer_tiles + pt[j].index;
        pending |= 1u << j;
      }
      while (ok && pending != 0u) {  // bounded: each turn handles an event or gives up
        const int first = __ffs(int(pending)) - 1;
        int ready = first;
        ok = bounded_wait(
            site,
            base + first * C::kThreads < n_recv ? abi::kPhaseBwdDispatchWait
                                                : abi::kPhaseBwdReturnWait,
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
          ok = ring.publish(kFT, [&](int i) {
            return bdesc(uint32_t(ev * kFT + i), kBwdDHRemote);
          }, site);
        } else {
          ok = credit_rows(pt[ready].src_row, pt[ready].rows);
        }
      }
    }
    return __syncthreads_and(ok) != 0;
  }
#endif  // FLASHMOE_NVSHMEM

  // ---------------------------------------------------------------- the task loop
  struct Counts {
    uint32_t send, dh, dw2, db2, dr, sdh, sdw, sdb, published;
    FMOE_DEVICE uint32_t ready() const { return send + dh + dw2 + db2 + dr + sdh + sdw + sdb; }
    FMOE_DEVICE uint32_t total() const { return ready() + published; }
  };

  /// Task counts; n_recv / n_send: tiles received from / sent to peers.
  FMOE_DEVICE Counts counts(int n_rt, int n_recv, int n_send) const {
    const uint32_t el = uint32_t(L.local_experts);
    const uint32_t weights2 = el * kFT * kHT + (kUpBiasGrad ? el * kHT : 0u);  // dW2, db2
    Counts n;
    n.send = uint32_t(n_send);
    n.dh = uint32_t(n_rt * kFT);
    n.dw2 = C::kEP ? 0u : el * kFT * kHT;  // with peers they wait for received rows
    n.db2 = C::kEP || !kUpBiasGrad ? 0u : el * kHT;
    n.dr = uint32_t(kHT * kEpT);
    n.sdh = C::kShared ? uint32_t(TT * kSFT) : 0u;  // shared experts: dHs, dW2s, db2s
    n.sdw = C::kShared ? uint32_t(kSFT * kHT) : 0u;
    n.sdb = C::kShared && kUpBiasGrad ? uint32_t(kHT) : 0u;
    n.published = uint32_t(n_rt * kHT) + el * kHT * kPT + (kUpBiasGrad ? el * kB1T : 0u) +
                  uint32_t(TT * kHT) +
                  (C::kEP ? uint32_t(n_recv * (kFT + kHT)) + weights2 : 0u) +
                  (C::kShared ? uint32_t(TT * kHT + kHT * kSPT) + (kUpBiasGrad ? kSPT : 0u)
                              : 0u);
    return n;
  }

  /// Claim tasks until none are left: ready kinds by index first, then ring slots.
  FMOE_DEVICE bool task_loop(const Counts& n) {
    __shared__ int64_t s_task;
    const uint32_t total = n.total();
    for (;;) {  // bounded: claimed indices only grow and stop at `total`
      if (threadIdx.x == 0) {
        uint32_t idx = atomicAdd(&L.state[abi::kHead], 1u);
        if (idx >= total) {
          s_task = -2;
        } else if (idx < n.send) {
          s_task = bdesc(idx, kBwdSend);
        } else if ((idx -= n.send) < n.dh) {
          s_task = bdesc(idx, kBwdDH);
        } else if ((idx -= n.dh) < n.dw2) {
          s_task = bdesc(idx, kBwdDW2);
        } else if ((idx -= n.dw2) < n.db2) {
          s_task = bdesc(idx, kBwdDB2);
        } else if ((idx -= n.db2) < n.dr) {
          s_task = bdesc(idx, kBwdDR);
        } else if ((idx -= n.dr) < n.sdh) {
          s_task = bdesc(idx, kBwdSharedDH);
        } else if ((idx -= n.sdh) < n.sdw) {
          s_task = bdesc(idx, kBwdSharedDW);
        } else if ((idx -= n.sdw) < n.sdb) {
          s_task = bdesc(idx, kBwdSharedDB);
        } else {
          s_task = ring.take(idx - n.sdb, site);
        }
      }
      __syncthreads();
      const int64_t task = s_task;
      __syncthreads();
      if (task == -2) return true;
      if (task < 0) return false;
      const int index = int(task >> 4);
      bool ok = true;
      switch (uint32_t(task & 15)) {
        case kBwdDH: ok = dh_task(index); break;
        case kBwdDW2: dw2_task(index); break;
        case kBwdDB2: {
          const int le = index / kHT;
          bias_task(static_cast<const S*>(B.dye_t), H, le, (index % kHT) * kTile,
                    [&](int h) { return out.down_b + int64_t(le) * H + h; });
          break;
        }
        case kBwdDR: dr_task(index); break;
        case kBwdDX: ok = dx_task(index); break;
        case kBwdDW1: dw1_task(index); break;
        case kBwdDB1: db1_task(index); break;
        case kBwdDXSum: dxsum_task(index); break;
        case kBwdSharedDH:
          if constexpr (C::kShared) ok = shared_dh_task(index); else ok = false;
          break;
        case kBwdSharedDX:
          if constexpr (C::kShared) ok = shared_dx_task(index); else ok = false;
          break;
        case kBwdSharedDW:
          if constexpr (C::kShared) shared_dw_task(index); else ok = false;
          break;
        case kBwdSharedDB:
          if constexpr (C::kShared) shared_db_task(index); else ok = false;
          break;
#if FLASHMOE_NVSHMEM
        case kBwdSend: send_task(index); break;
        case kBwdDHRemote: ok = dh_remote_task(index); break;
        case kBwdDXRemote: dx_remote_task(index); break;
#endif
        default: ok = false; break;
      }
      // Publication can fail in one thread only; every thread must leave together.
      if (!__syncthreads_and(ok)) return false;
    }
  }
};

/**
 * The whole backward pass of one saved forward (`fwd`: its slot's layout). flags bit 0:
 * add into the gradient buffers instead of overwriting them; bit 1: the forward ran on
 * the caller's routing (their weights' gradient into d_weights, none for the router).
 */
template <class C>
FMOE_DEVICE void backward(const abi::MoeLayout* fwd, const abi::MoeBackwardLayout* bwd,
                          const typename C::S* x, const typename C::S* dy, typename C::S* dx,
                          GradOut grads, int tokens, int flags) {
  extern __shared__ __align__(1024) char smem[];  // wgmma's swizzled tiles
  __shared__ uint32_t s_epoch;
  const abi::MoeLayout& L = *fwd;
  if (threadIdx.x == 0) s_epoch = read_epoch(L.state);
  __syncthreads();
  int32_t* tables = reinterpret_cast<int32_t*>(smem + C::G::kSmemBytes);
  Backward<C> k(L, *bwd, x, dy, dx, grads, tokens, (flags & 1) != 0, smem, tables, s_epoch,
                (flags & 2) != 0);
  const int warps = gridDim.x * C::kWarps;
  const int gwarp = blockIdx.x * C::kWarps + int(threadIdx.x >> 5);
#if FLASHMOE_NVSHMEM
  // The forward's protocol helpers over the same tables, plus its two peer prefixes.
  int32_t* peer_tables = tables + 4 * (C::E + 1);
  Kernel<C> fk{L, x, nullptr, tokens, k.TT, -1, smem, k.s_eoff, k.s_rtoff, k.s_lexp,
               peer_tables, peer_tables + (L.world + 1), k.site, k.ring, s_epoch + 1u, true};
  if constexpr (C::kEP) k.fk = &fk;
#endif

  if (bwd->delay_ns != 0u && blockIdx.x == 0 && threadIdx.x == 0) sleep_for(bwd->delay_ns);
  const int n_rt = k.expert_offsets();
  k.zero_counters();
#if FLASHMOE_NVSHMEM
  // headers_out entries no expert fills are zero since allocation (never written).
  if constexpr (C::kEP) fk.write_headers();
#endif
  int barrier = 0;
  for (int tile = blockIdx.x; tile < k.TT * C::kGateTiles; tile += gridDim.x) k.gate_tile(tile);
  if constexpr (!C::kFusedTopk) {
    if (!grid_barrier(L.state, barrier++, k.site, abi::kPhaseBwdBarrierGate)) return;
    for (int t = gwarp; t < tokens; t += warps) k.token_pass(t);
  }
  if (!grid_barrier(L.state, barrier++, k.site, abi::kPhaseBwdBarrierTokens)) return;
  int n_recv = 0, n_send = 0;
#if FLASHMOE_NVSHMEM
  if constexpr (C::kEP) {
    if (!fk.exchange_headers(s_epoch, abi::kPhaseBwdPeerDone, abi::kPhaseBwdHeaders)) return;
    n_recv = fk.s_src[L.world];
    n_send = fk.s_dst[L.world];
  }
#endif
  k.column_offsets();
  k.transposes(n_rt, n_recv);
  if (!k.publish_empty()) return;
  if (!grid_barrier(L.state, barrier++, k.site, abi::kPhaseBwdBarrierTranspose)) return;
#if FLASHMOE_NVSHMEM
  if constexpr (C::kEP) {
    if (blockIdx.x == gridDim.x - 1) {  // the subscriber claims no tasks
      if (!k.subscribe()) return;
    } else if (!k.task_loop(k.counts(n_rt, n_recv, n_send))) {
      return;
    }
    fk.finish();
    return;
  }
#endif
  if (!k.task_loop(k.counts(n_rt, n_recv, n_send))) return;
  leave_launch(L.state);
}

}  // namespace moe
}  // namespace flashmoe
