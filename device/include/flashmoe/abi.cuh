/**
 * @file abi.cuh
 * @brief The kernel ABI: every struct that crosses the host/device boundary.
 *
 * host/abi.py mirrors these layouts field by field; a compile test checks every
 * offset and size below against the mirror (kernels/abi_check.cu), so the two cannot
 * drift apart silently. Only fixed-width types, natural alignment, no padding holes.
 */
#pragma once

#include <cuda/std/cstdint>

namespace flashmoe {
namespace abi {

/// Bumped whenever a struct below changes.
constexpr cuda::std::uint32_t kAbiVersion = 10;

/// Fault codes written to FaultRecord::code.
enum FaultCode : cuda::std::uint32_t {
  kOk = 0,
  kTimeout = 1,        ///< a bounded wait ran out
  kProtocol = 2,       ///< a peer sent something the protocol does not allow
  kBadLaunch = 3,      ///< launch geometry or arguments the kernel cannot serve
};

/**
 * What the kernel reports when it stops itself. Lives in host-visible memory; the
 * first block to fail claims it (code from kOk to non-zero) and fills the rest.
 */
struct FaultRecord {
  cuda::std::uint32_t code;      ///< FaultCode
  cuda::std::int32_t phase;      ///< which wait (phase ids are listed per kernel)
  cuda::std::int32_t block;      ///< blockIdx.x of the waiter
  cuda::std::int32_t task;       ///< task or tile being worked on, -1 if none
  cuda::std::int64_t counter;    ///< value seen when giving up
  cuda::std::int64_t expected;   ///< value waited for
  cuda::std::int32_t rank;       ///< this PE
  cuda::std::int32_t peer;       ///< PE waited for, -1 if local
  cuda::std::uint64_t elapsed_ns;
  cuda::std::uint32_t epoch;     ///< launch epoch when it happened
  cuda::std::uint32_t reserved[3];
};

/// Words of MoeLayout::state (device memory, zeroed when the layer is built).
enum StateWord : int {
  kEpoch = 0,       ///< launches completed; ring slots are tagged epoch + 1
  kBarrier = 1,     ///< grid-barrier arrivals of the running launch
  kExit = 2,        ///< blocks that left the running launch
  kHead = 3,        ///< next task index to claim
  kPublished = 4,   ///< ring slots filled so far
  kTraced = 5,      ///< trace records written this launch
  kStateWords = 16,
};

/// What the fused kernel should do this launch (tests run components on their own).
enum Mode : cuda::std::int32_t {
  kModeFull = 0,          ///< gate, dispatch, expert FFN, combine
  kModeGateOnly = 1,      ///< stop after softmax/top-k (topk_expert, topk_weight)
  kModeDispatchOnly = 2,  ///< stop after the dispatch lists (row_token, token_rows, ...)
  kModeCombineOnly = 3,   ///< combine y_expert given token_rows and topk_weight
  kModeCommOnly = 4,      ///< full protocol, but expert tiles skip their GEMMs (timing)
  kModeRouted = 5,        ///< full pass on the caller's topk_expert / topk_weight (no gate)
};

/**
 * Marks in the routing buffers. A token whose router logits are not all finite (NaN or
 * an infinity in its x row, in the router, or an overflow) is marked: no expert, NaN
 * weights, no assignment kept, and its output row is NaN (reference.py states the
 * policy). topk_expert holds kNoExpert for it, token_rows kRowMarked.
 */
enum RowMark : cuda::std::int32_t {
  kNoExpert = -1,    ///< topk_expert of a marked token
  kRowDropped = -1,  ///< token_rows of an assignment the capacity rule dropped
  kRowMarked = -2,   ///< token_rows of every slot of a marked token
};

/// Kinds of trace records besides task kinds 0..7 (phases every block runs).
enum TraceKind : cuda::std::uint32_t {
  kTraceGate = 8, kTraceTopk = 9, kTraceScan = 10, kTraceLists = 11, kTraceHeaders = 12,
  kTraceSubscriber = 13, kTraceWait = 14,
};

/// Task kinds of descriptors (index << 3 | kind). Send and local up tasks are never in
/// the ring: their indices come first in the claim order.
enum TaskKind : cuda::std::uint32_t {
  kUp = 0, kDown = 1, kCombine = 2, kSend = 3, kUpRemote = 4, kDownRemote = 5,
  kSharedUp = 6, kSharedDown = 7,  ///< the shared experts' tiles (shared up: claim order)
};

/// Which wait a fault record's phase names (FaultRecord::phase of the fused kernel).
enum Phase : cuda::std::int32_t {
  kPhaseBarrierGate = 1,
  kPhaseBarrierTopk = 2,
  kPhaseBarrierScan = 3,
  kPhaseBarrierLists = 4,
  kPhaseRingSlot = 5,
  kPhaseRingFull = 6,
  kPhasePeerDone = 7,      ///< waiting for a peer to finish the previous launch
  kPhaseHeaders = 8,       ///< waiting for a peer's header
  kPhaseDispatchWait = 9,  ///< waiting for a tile a peer dispatched to us
  kPhaseReturnWait = 10,   ///< waiting for a result tile a peer owes us
  // The backward kernel's own waits (kernels/moe_backward.cu).
  kPhaseBwdBarrierGate = 11,       ///< grid barrier after the backward's gate recompute
  kPhaseBwdBarrierTokens = 12,     ///< grid barrier after the per-token pass
  kPhaseBwdBarrierTranspose = 13,  ///< grid barrier after the transposes
  kPhaseBwdRingSlot = 14,          ///< a slot of the backward's task ring
  kPhaseBwdRingFull = 15,          ///< the backward's task ring ran out of slots
  kPhaseBwdPeerDone = 16,          ///< backward: a peer's end of its previous launch
  kPhaseBwdHeaders = 17,           ///< backward: a peer's header
  kPhaseBwdDispatchWait = 18,      ///< backward: dye rows a peer sends us
  kPhaseBwdReturnWait = 19,        ///< backward: dX rows a peer owes us
  kPhaseTmaWait = 20,  ///< a TMA load of a weight tile that did not land (sm_90a)
  kPhaseNoTensorMaps = 21,  ///< kBadLaunch: a TMA build launched without tensor maps
  kPhaseStageFree = 22,  ///< a producer warp waiting for a free stage or its next tile
};

/// Where each weight's tensor map sits in MoeLayout::tensor_maps (128 bytes each).
enum TensorMapSlot : cuda::std::uint32_t {
  kMapUp = 0,          ///< w_up [El, F, H]
  kMapUp2 = 1,         ///< w_up2 [El, F, H] (gated)
  kMapDown = 2,        ///< w_down [El, H, F]
  kMapSharedUp = 3,    ///< ws_up [FS, H]
  kMapSharedUp2 = 4,   ///< ws_up2 [FS, H] (gated)
  kMapSharedDown = 5,  ///< ws_down [H, FS]
  kTensorMaps = 6,
};

/// Task kinds of the backward kernel's descriptors (index << 4 | kind). Kinds 0..3 are
/// ready when the task loop starts (their indices come first); 4..7 are published.
enum BwdTaskKind : cuda::std::uint32_t {
  kBwdDH = 0,     ///< dH = dYe W2^T for a row tile x F column tile; epilogue dA and dA^T
  kBwdDW2 = 1,    ///< dW2 tile of one expert: Z^T dYe over its rows
  kBwdDB2 = 2,    ///< db2 columns of one expert
  kBwdDR = 3,     ///< router gradient tile: X^T dZ over the tokens
  kBwdDX = 4,     ///< dX_e = dA W1^T for a row tile x H column tile (float32 rows)
  kBwdDW1 = 5,    ///< dW1 (gated dWg | dWu) tile of one expert: X^T dA over its rows
  kBwdDB1 = 6,    ///< db1 columns of one expert
  kBwdDXSum = 7,  ///< dx of a token tile x H column tile: dZ R^T + the slots' dX rows
  // Expert parallelism.
  kBwdSend = 8,      ///< put one tile of dye rows into its owner's receive buffer (ready)
  kBwdDHRemote = 9,  ///< dH of a received tile x F column tile (published by the subscriber)
  kBwdDXRemote = 10, ///< dX of a received tile x H column tile; the last one returns the rows
  // Shared experts.
  kBwdSharedDH = 11,  ///< dHs of a token tile x FS column tile; epilogue dAs and dAs^T (ready)
  kBwdSharedDX = 12,  ///< dXs = dAs W1s^T for a token tile x H column tile (float32 rows)
  kBwdSharedDW = 13,  ///< a dW2s tile (ready), then the dW1s tiles (published)
  kBwdSharedDB = 14,  ///< db2s columns (ready), then db1s columns (published)
};

/// The backward kernel's float32 gradient pointers, in argument order (null when the
/// config has no such tensor). Vanilla: up = dW1, up2 = db1; gated: up = dWg, up2 = dWu,
/// up_bias = dbg, up2_bias = dbu (with biases).
enum BwdGrad : int {
  kGradRouter = 0,      ///< [H, E]
  kGradRouterBias = 1,  ///< [E]
  kGradUp = 2,          ///< [El, H, F]
  kGradUp2 = 3,         ///< vanilla [El, F]; gated [El, H, F]
  kGradUpBias = 4,      ///< gated [El, F]
  kGradUp2Bias = 5,     ///< gated [El, F]
  kGradDown = 6,        ///< [El, F, H]
  kGradDownBias = 7,    ///< [El, H]
  // The shared MLP's, in the same roles (replicated: [H, FS], [FS], ...).
  kGradSharedUp = 8,
  kGradSharedUp2 = 9,
  kGradSharedUpBias = 10,
  kGradSharedUp2Bias = 11,
  kGradSharedDown = 12,
  kGradSharedDownBias = 13,
  kGradSharedGate = 14,  ///< [H]
  kGradPointers = 15,    ///< how many
};

/**
 * Element types (the FMOE_DTYPE constant):
 *   0 float32  - float storage, 3xTF32 tensor-core passes (float32-accurate products)
 *   1 tfloat32 - float storage rounded to TF32, one TF32 pass
 *   2 bfloat16 - bf16 storage, one bf16 pass, float32 accumulation
 *   3 float16  - fp16 storage, one fp16 pass, float32 accumulation
 */
enum DType : int { kFloat32 = 0, kTFloat32 = 1, kBFloat16 = 2, kFloat16 = 3 };

/// Activations (the FMOE_ACT constant).
/// kSwigluClamped is the gated MLP's clamped SwiGLU (two inputs), not a unary activation.
enum Act : int { kRelu = 0, kGelu = 1, kSilu = 2, kIdentity = 3, kSwigluClamped = 4 };

/// One trace record: [start, end) of a task or phase on one block.
struct TraceRecord {
  cuda::std::uint64_t start_ns;   ///< global timer
  cuda::std::uint64_t end_ns;
  cuda::std::uint32_t block;
  cuda::std::uint32_t what;       ///< task descriptor (index << 3 | kind) or TraceKind
};

/**
 * Everything the fused kernel reads besides the per-call arguments, fixed when a
 * layer is built: weights (K-major, the layer's storage type), workspace sized for
 * max_tokens, and the fault record. Lives in device memory; the kernel gets its
 * address. Shapes: E experts (global), El = local_experts, H hidden, F ffn,
 * k top_k, T = max_tokens, TT = ceil(T / 128) token tiles, Ep = E rounded up to 8.
 */
struct MoeLayout {
  const void* router_t;        ///< [E, H]
  const void* w_up;            ///< [El, F, H]  vanilla W1^T, gated Wg^T
  const void* w_up2;           ///< [El, F, H]  gated Wu^T; null for vanilla
  const void* b_up;            ///< [El, F]     vanilla only
  const void* w_down;          ///< [El, H, F]
  const void* b_down;          ///< [El, H]     vanilla only
  float* logits;               ///< [T, Ep]
  cuda::std::int32_t* topk_expert;   ///< [T, k]
  float* topk_weight;                ///< [T, k]
  cuda::std::int32_t* token_rows;    ///< [T, k] compact row of each assignment, or RowMark
  cuda::std::int32_t* row_token;     ///< [T * k] token of each compact row
  cuda::std::int32_t* tile_counts;   ///< [TT, E] per-tile counts, then per-tile bases
  cuda::std::int32_t* expert_total;  ///< [E] assignments before capacity
  cuda::std::int32_t* expert_kept;   ///< [E] rows kept
  cuda::std::int32_t* tile_kept;     ///< [TT] kept assignments per token tile (plus its
                                     ///< tokens with shared experts: rows to combine)
  void* z;                     ///< [T * k, F] expert intermediate
  void* y_expert;              ///< [T * k, H] expert outputs
  cuda::std::uint32_t* dep_rowtile;  ///< [max_rowtiles] up tiles done per row tile
  cuda::std::uint32_t* dep_combine;  ///< [TT, H / 128] rows done per combine task
  cuda::std::uint64_t* ring;         ///< [ring_capacity] epoch-tagged task slots
  cuda::std::uint32_t* state;        ///< [kStateWords] (symmetric with world > 1: progress)
  FaultRecord* fault;                ///< pinned host memory
  cuda::std::uint64_t timeout_ns;
  cuda::std::int32_t max_tokens;
  cuda::std::int32_t experts;
  cuda::std::int32_t local_experts;
  cuda::std::int32_t reserved0;
  cuda::std::int32_t max_rowtiles;
  cuda::std::int32_t ring_capacity;
  cuda::std::int32_t rank;
  cuda::std::int32_t world;
  // Expert parallelism (world > 1): NVSHMEM symmetric buffers, identical on every PE,
  // and the placement tables. Null / zero on one GPU. With world > 1, y_expert above
  // is symmetric too (owners put results into it). SR = slot_rows, PT =
  // max_peer_tiles, Em = max_local_experts.
  void* recv_rows;                   ///< sym [W, SR, H] rows dispatched to this rank
  void* send_rows;                   ///< sym [T * k, H] gathered rows (put source)
  cuda::std::int32_t* headers;       ///< sym [W, Em, 2] {rows, src_row0} from each source
  cuda::std::int32_t* headers_out;   ///< sym [W, Em, 2] what this rank tells each peer
  cuda::std::uint64_t* header_sig;   ///< sym [W]
  cuda::std::uint64_t* dispatch_sig; ///< sym [W, PT] tile i of source s has landed
  cuda::std::uint64_t* return_sig;   ///< sym [W, PT] results of tile i from owner p
  cuda::std::uint64_t* done_sig;     ///< sym [W] peer p finished its launch
  void* z_remote;                    ///< [W, SR, F] up outputs of received rows
  void* y_remote;                    ///< [W, SR, H] down outputs before the return put
  cuda::std::uint32_t* dep_remote;   ///< [W * PT, 2] up / down column tiles done
  const cuda::std::int32_t* expert_owner;  ///< [E] owner rank
  const cuda::std::int32_t* expert_local;  ///< [E] position among the owner's experts
  cuda::std::uint64_t delay_ns;      ///< injected start delay (fault tests), 0 normally
  cuda::std::int32_t slot_rows;
  cuda::std::int32_t max_peer_tiles;
  cuda::std::int32_t max_local_experts;
  cuda::std::int32_t trace_capacity;  ///< records `trace` holds; 0 disables tracing
  TraceRecord* trace;                 ///< per-launch timeline (null: off)
  // Routing rules with per-expert vectors (float32 [E], null when the config has none).
  const float* router_bias;           ///< added to the logits
  const float* selection_bias;        ///< added to the scores to choose experts only
  /// Saving for the backward: the up epilogue also stores the pre-activation, vanilla
  /// `x W1 + b1` [T * k, F], gated `x Wg` then `x Wu` [T * k, 2F], in the storage type.
  /// Null (the default) stores nothing.
  void* pre;
  /// Expert parallelism, saving: the owner's pre-activations of received rows
  /// [W, SR, F or 2F] (null: not saving).
  void* pre_remote;
  /// Expert parallelism, a save slot's copy of the rows it received [W, SR, H] (the
  /// backward's x rows of remote assignments; recv_rows then carries dye rows). A
  /// saving forward fills it itself (null: not saving).
  void* recv_saved;
  // Shared experts (null without): one MLP of width FS over every token, replicated on
  // every rank. PF = FS (vanilla) or 2 FS (gated).
  const void* ws_up;                  ///< [FS, H] vanilla W1^T, gated Wg^T
  const void* ws_up2;                 ///< [FS, H] gated Wu^T
  const void* bs_up;                  ///< vanilla b1 [FS]; gated with biases bg, bu [2FS]
  const void* ws_down;                ///< [H, FS]
  const void* bs_down;                ///< [H] (vanilla, or gated with biases)
  const void* ws_gate;                ///< [H] the gate's weights (null: no gate)
  float* shared_scale;                ///< [T] the gate per token
  void* zs;                           ///< [T, FS] shared intermediate
  void* ys;                           ///< [T, H] shared output
  cuda::std::uint32_t* dep_shared;    ///< [TT] shared up tiles done per token tile
  /// A save slot's shared pre-activations [T, PF] (as `pre`; null: not saving).
  void* pre_s;
  /// Kernels that load weight tiles by TMA (sm_90a, 16-bit types: flashmoe_moe_tma):
  /// kTensorMaps 128-byte tensor maps, 64-byte aligned, indexed by TensorMapSlot (a
  /// weight the layer lacks: zeros). Each map is 3-D {in, out, expert} (2-D weights:
  /// one expert), swizzled 128 B, its box one 128-byte span of `in` by the tile's
  /// rows of `out` (up: the up task's columns, down: the tile's N). Null otherwise.
  const void* tensor_maps;
};

/**
 * What the backward kernel reads besides a saved forward's MoeLayout (routing, compact
 * rows, z, y_expert, pre, state, fault) and the per-call arguments: the weights in the
 * layouts the backward GEMMs read (both operands K-major) and its own workspace, sized
 * for max_tokens. RP = rp_capacity columns (each expert's rows padded to 8), TP =
 * tp_capacity (tokens padded to 8), PF = F (vanilla) or 2F (gated).
 */
struct MoeBackwardLayout {
  const void* router_b;        ///< [H, Ep] router, user layout, experts padded with zeros
  const void* w_up_b;          ///< vanilla W1 [El, H, F]; gated [El, H, 2F]: Wg row, Wu row
  const void* w_down_b;        ///< W2 [El, F, H] (user layout)
  void* dye;                   ///< [T * k, H] w * dy per compact row
  void* dye_t;                 ///< [H, RP]
  void* z_t;                   ///< [F, RP]
  void* xg_t;                  ///< [H, RP] x rows of the compact rows
  void* da;                    ///< [T * k, PF] dA (gated: dG then dU)
  void* da_t;                  ///< [PF, RP]
  float* dxe;                  ///< [T * k, H] dX of each compact row
  void* dz;                    ///< [T, Ep] gradient of the logits
  void* dz_t;                  ///< [Ep, TP]
  void* x_t;                   ///< [H, TP]
  cuda::std::uint32_t* dep_dx;      ///< [max_rowtiles] dH column tiles done per row tile
  cuda::std::uint32_t* dep_expert;  ///< [El] dH tasks done per local expert
  cuda::std::uint32_t* dep_dxsum;   ///< [TT, H / 128] dX rows done per dx task
  cuda::std::uint64_t* ring;        ///< [ring_capacity] epoch-tagged task slots
  cuda::std::uint64_t delay_ns;     ///< injected start delay (fault tests), 0 normally
  cuda::std::int32_t ring_capacity;
  cuda::std::int32_t rp_capacity;
  cuda::std::int32_t tp_capacity;
  cuda::std::int32_t reserved0;
  // Expert parallelism (null on one GPU). dxe above is then symmetric: owners put the
  // dX rows of our assignments into it.
  void* da_remote;                  ///< [W, SR, PF] dA of received rows
  float* dxe_remote;                ///< sym [W, SR, H] dX of received rows (put source)
  cuda::std::uint32_t* dep_remote;  ///< [W * PT, 2] dH / dX column tiles done per tile
  // Shared experts (null without): their MLP over every token, FS wide, SPF = FS
  // (vanilla) or 2 FS (gated). A marked token's columns and rows are zeros.
  const void* ws_up_b;              ///< vanilla W1s [H, FS]; gated [H, 2FS]: Wg row, Wu row
  const void* ws_down_b;            ///< W2s [FS, H] (user layout)
  void* dys;                        ///< [T, H] g * dy per token
  void* dys_t;                      ///< [H, TP]
  void* zs_t;                       ///< [FS, TP]
  void* das;                        ///< [T, SPF] dA of the shared MLP
  void* das_t;                      ///< [SPF, TP]
  float* dxs;                       ///< [T, H] its dX rows
  cuda::std::uint32_t* dep_sh;      ///< [TT + 1] shared dH tasks done per token tile, all
  /// [T, k] dL/d the caller's combine weights (flags bit 1: the forward's routing was
  /// given; the router then gets no gradient).
  float* d_weights;
};

}  // namespace abi
}  // namespace flashmoe

/// X-macro list of every (struct, field) above, for the ABI compile test.
#define FMOE_ABI_FIELDS(X)   \
  X(FaultRecord, code)       \
  X(FaultRecord, phase)      \
  X(FaultRecord, block)      \
  X(FaultRecord, task)       \
  X(FaultRecord, counter)    \
  X(FaultRecord, expected)   \
  X(FaultRecord, rank)       \
  X(FaultRecord, peer)       \
  X(FaultRecord, elapsed_ns) \
  X(FaultRecord, epoch)      \
  X(MoeLayout, router_t)     \
  X(MoeLayout, w_up)         \
  X(MoeLayout, w_up2)        \
  X(MoeLayout, b_up)         \
  X(MoeLayout, w_down)       \
  X(MoeLayout, b_down)       \
  X(MoeLayout, logits)       \
  X(MoeLayout, topk_expert)  \
  X(MoeLayout, topk_weight)  \
  X(MoeLayout, token_rows)   \
  X(MoeLayout, row_token)    \
  X(MoeLayout, tile_counts)  \
  X(MoeLayout, expert_total) \
  X(MoeLayout, expert_kept)  \
  X(MoeLayout, tile_kept)    \
  X(MoeLayout, z)            \
  X(MoeLayout, y_expert)     \
  X(MoeLayout, dep_rowtile)  \
  X(MoeLayout, dep_combine)  \
  X(MoeLayout, ring)         \
  X(MoeLayout, state)        \
  X(MoeLayout, fault)        \
  X(MoeLayout, timeout_ns)   \
  X(MoeLayout, max_tokens)   \
  X(MoeLayout, experts)      \
  X(MoeLayout, local_experts) \
  X(MoeLayout, reserved0)    \
  X(MoeLayout, max_rowtiles) \
  X(MoeLayout, ring_capacity) \
  X(MoeLayout, rank)         \
  X(MoeLayout, world)        \
  X(MoeLayout, recv_rows)    \
  X(MoeLayout, send_rows)    \
  X(MoeLayout, headers)      \
  X(MoeLayout, headers_out)  \
  X(MoeLayout, header_sig)   \
  X(MoeLayout, dispatch_sig) \
  X(MoeLayout, return_sig)   \
  X(MoeLayout, done_sig)     \
  X(MoeLayout, z_remote)     \
  X(MoeLayout, y_remote)     \
  X(MoeLayout, dep_remote)   \
  X(MoeLayout, expert_owner) \
  X(MoeLayout, expert_local) \
  X(MoeLayout, delay_ns)     \
  X(MoeLayout, slot_rows)    \
  X(MoeLayout, max_peer_tiles) \
  X(MoeLayout, max_local_experts) \
  X(MoeLayout, trace_capacity) \
  X(MoeLayout, trace)        \
  X(MoeLayout, router_bias)  \
  X(MoeLayout, selection_bias) \
  X(MoeLayout, pre)          \
  X(MoeLayout, pre_remote)   \
  X(MoeLayout, recv_saved)   \
  X(MoeLayout, ws_up)        \
  X(MoeLayout, ws_up2)       \
  X(MoeLayout, bs_up)        \
  X(MoeLayout, ws_down)      \
  X(MoeLayout, bs_down)      \
  X(MoeLayout, ws_gate)      \
  X(MoeLayout, shared_scale) \
  X(MoeLayout, zs)           \
  X(MoeLayout, ys)           \
  X(MoeLayout, dep_shared)   \
  X(MoeLayout, pre_s)        \
  X(MoeLayout, tensor_maps)  \
  X(MoeBackwardLayout, router_b)   \
  X(MoeBackwardLayout, w_up_b)     \
  X(MoeBackwardLayout, w_down_b)   \
  X(MoeBackwardLayout, dye)        \
  X(MoeBackwardLayout, dye_t)      \
  X(MoeBackwardLayout, z_t)        \
  X(MoeBackwardLayout, xg_t)       \
  X(MoeBackwardLayout, da)         \
  X(MoeBackwardLayout, da_t)       \
  X(MoeBackwardLayout, dxe)        \
  X(MoeBackwardLayout, dz)         \
  X(MoeBackwardLayout, dz_t)       \
  X(MoeBackwardLayout, x_t)        \
  X(MoeBackwardLayout, dep_dx)     \
  X(MoeBackwardLayout, dep_expert) \
  X(MoeBackwardLayout, dep_dxsum)  \
  X(MoeBackwardLayout, ring)       \
  X(MoeBackwardLayout, delay_ns)   \
  X(MoeBackwardLayout, ring_capacity) \
  X(MoeBackwardLayout, rp_capacity) \
  X(MoeBackwardLayout, tp_capacity) \
  X(MoeBackwardLayout, reserved0)  \
  X(MoeBackwardLayout, da_remote)  \
  X(MoeBackwardLayout, dxe_remote) \
  X(MoeBackwardLayout, dep_remote) \
  X(MoeBackwardLayout, ws_up_b)    \
  X(MoeBackwardLayout, ws_down_b)  \
  X(MoeBackwardLayout, dys)        \
  X(MoeBackwardLayout, dys_t)      \
  X(MoeBackwardLayout, zs_t)       \
  X(MoeBackwardLayout, das)        \
  X(MoeBackwardLayout, das_t)      \
  X(MoeBackwardLayout, dxs)        \
  X(MoeBackwardLayout, dep_sh)     \
  X(MoeBackwardLayout, d_weights)  \
  X(TraceRecord, start_ns)   \
  X(TraceRecord, end_ns)     \
  X(TraceRecord, block)      \
  X(TraceRecord, what)

#define FMOE_ABI_STRUCTS(X) X(FaultRecord) X(MoeLayout) X(TraceRecord) X(MoeBackwardLayout)

/// X-macro list of every (enum, enumerator) above, for the ABI compile test; a CPU test
/// checks that it names every enumerator and that host/abi.py mirrors them all.
#define FMOE_ABI_ENUMS(X)                                                                   \
  X(FaultCode, kOk) X(FaultCode, kTimeout) X(FaultCode, kProtocol) X(FaultCode, kBadLaunch) \
  X(StateWord, kEpoch) X(StateWord, kBarrier) X(StateWord, kExit) X(StateWord, kHead)       \
  X(StateWord, kPublished) X(StateWord, kTraced) X(StateWord, kStateWords)                  \
  X(Mode, kModeFull) X(Mode, kModeGateOnly) X(Mode, kModeDispatchOnly)                      \
  X(Mode, kModeCombineOnly) X(Mode, kModeCommOnly) X(Mode, kModeRouted)                     \
  X(TraceKind, kTraceGate) X(TraceKind, kTraceTopk) X(TraceKind, kTraceScan)                \
  X(TraceKind, kTraceLists) X(TraceKind, kTraceHeaders) X(TraceKind, kTraceSubscriber)      \
  X(TraceKind, kTraceWait)                                                                  \
  X(TaskKind, kUp) X(TaskKind, kDown) X(TaskKind, kCombine) X(TaskKind, kSend)              \
  X(TaskKind, kUpRemote) X(TaskKind, kDownRemote) X(TaskKind, kSharedUp)                   \
  X(TaskKind, kSharedDown)                                                                  \
  X(Phase, kPhaseBarrierGate) X(Phase, kPhaseBarrierTopk) X(Phase, kPhaseBarrierScan)       \
  X(Phase, kPhaseBarrierLists) X(Phase, kPhaseRingSlot) X(Phase, kPhaseRingFull)            \
  X(Phase, kPhasePeerDone) X(Phase, kPhaseHeaders) X(Phase, kPhaseDispatchWait)             \
  X(Phase, kPhaseReturnWait) X(Phase, kPhaseBwdBarrierGate) X(Phase, kPhaseBwdBarrierTokens)\
  X(Phase, kPhaseBwdBarrierTranspose) X(Phase, kPhaseBwdRingSlot)                           \
  X(Phase, kPhaseBwdRingFull) X(Phase, kPhaseBwdPeerDone) X(Phase, kPhaseBwdHeaders)       \
  X(Phase, kPhaseBwdDispatchWait) X(Phase, kPhaseBwdReturnWait) X(Phase, kPhaseTmaWait)     \
  X(Phase, kPhaseNoTensorMaps) X(Phase, kPhaseStageFree)                                    \
  X(TensorMapSlot, kMapUp) X(TensorMapSlot, kMapUp2) X(TensorMapSlot, kMapDown)             \
  X(TensorMapSlot, kMapSharedUp) X(TensorMapSlot, kMapSharedUp2)                            \
  X(TensorMapSlot, kMapSharedDown) X(TensorMapSlot, kTensorMaps)                            \
  X(BwdTaskKind, kBwdDH) X(BwdTaskKind, kBwdDW2) X(BwdTaskKind, kBwdDB2)                    \
  X(BwdTaskKind, kBwdDR) X(BwdTaskKind, kBwdDX) X(BwdTaskKind, kBwdDW1)                     \
  X(BwdTaskKind, kBwdDB1) X(BwdTaskKind, kBwdDXSum) X(BwdTaskKind, kBwdSend)                \
  X(BwdTaskKind, kBwdDHRemote) X(BwdTaskKind, kBwdDXRemote) X(BwdTaskKind, kBwdSharedDH)    \
  X(BwdTaskKind, kBwdSharedDX) X(BwdTaskKind, kBwdSharedDW) X(BwdTaskKind, kBwdSharedDB)    \
  X(BwdGrad, kGradRouter) X(BwdGrad, kGradRouterBias) X(BwdGrad, kGradUp)                  \
  X(BwdGrad, kGradUp2) X(BwdGrad, kGradUpBias) X(BwdGrad, kGradUp2Bias)                    \
  X(BwdGrad, kGradDown) X(BwdGrad, kGradDownBias) X(BwdGrad, kGradSharedUp)               \
  X(BwdGrad, kGradSharedUp2) X(BwdGrad, kGradSharedUpBias) X(BwdGrad, kGradSharedUp2Bias)  \
  X(BwdGrad, kGradSharedDown) X(BwdGrad, kGradSharedDownBias) X(BwdGrad, kGradSharedGate)  \
  X(BwdGrad, kGradPointers)                                                                 \
  X(DType, kFloat32) X(DType, kTFloat32) X(DType, kBFloat16) X(DType, kFloat16)             \
  X(Act, kRelu) X(Act, kGelu) X(Act, kSilu) X(Act, kIdentity) X(Act, kSwigluClamped)       \
  X(RowMark, kNoExpert) X(RowMark, kRowDropped) X(RowMark, kRowMarked)
