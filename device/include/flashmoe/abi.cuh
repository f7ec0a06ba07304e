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
constexpr cuda::std::uint32_t kAbiVersion = 2;

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
  kStateWords = 16,
};

/// What the fused kernel should do this launch (tests run components on their own).
enum Mode : cuda::std::int32_t {
  kModeFull = 0,          ///< gate, dispatch, expert FFN, combine
  kModeGateOnly = 1,      ///< stop after softmax/top-k (topk_expert, topk_weight)
  kModeDispatchOnly = 2,  ///< stop after the dispatch lists (row_token, token_rows, ...)
  kModeCombineOnly = 3,   ///< combine y_expert given token_rows and topk_weight
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
  cuda::std::int32_t* token_rows;    ///< [T, k] compact row of each assignment, -1 dropped
  cuda::std::int32_t* row_token;     ///< [T * k] token of each compact row
  cuda::std::int32_t* tile_counts;   ///< [TT, E] per-tile counts, then per-tile bases
  cuda::std::int32_t* expert_total;  ///< [E] assignments before capacity
  cuda::std::int32_t* expert_kept;   ///< [E] rows kept
  cuda::std::int32_t* tile_kept;     ///< [TT] kept assignments per token tile
  void* z;                     ///< [T * k, F] expert intermediate
  void* y_expert;              ///< [T * k, H] expert outputs
  cuda::std::uint32_t* dep_rowtile;  ///< [max_rowtiles] up tiles done per row tile
  cuda::std::uint32_t* dep_combine;  ///< [TT, H / 128] rows done per combine task
  cuda::std::uint64_t* ring;         ///< [ring_capacity] epoch-tagged task slots
  cuda::std::uint32_t* state;        ///< [kStateWords]
  FaultRecord* fault;                ///< pinned host memory
  cuda::std::uint64_t timeout_ns;
  cuda::std::int32_t max_tokens;
  cuda::std::int32_t experts;
  cuda::std::int32_t local_experts;
  cuda::std::int32_t first_expert;
  cuda::std::int32_t max_rowtiles;
  cuda::std::int32_t ring_capacity;
  cuda::std::int32_t rank;
  cuda::std::int32_t world;
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
  X(MoeLayout, first_expert) \
  X(MoeLayout, max_rowtiles) \
  X(MoeLayout, ring_capacity) \
  X(MoeLayout, rank)         \
  X(MoeLayout, world)

#define FMOE_ABI_STRUCTS(X) X(FaultRecord) X(MoeLayout)
