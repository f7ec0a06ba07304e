/**
 * @file entry_config.cuh
 * @brief The one Config both MoE entry points (forward and backward) build from the
 *        JIT's FMOE_* constants, so that a backward always differentiates the forward
 *        that ran: same routing rules, MLP variant and shared experts.
 *
 * Constants (flashmoe_core/kernel/specs.py: moe_defines): FMOE_DTYPE, FMOE_H, FMOE_F,
 * FMOE_E, FMOE_K, FMOE_GATED, FMOE_ACT, FMOE_RENORM, the tile FMOE_BM, FMOE_BN, FMOE_BK,
 * FMOE_STAGES and its sm_90a wgmma form FMOE_BK90, FMOE_STAGES90 (required), and with
 * defaults FMOE_EP, the routing rules FMOE_SIGMOID,
 * FMOE_SOFTMAX_AFTER_TOPK, FMOE_ROUTER_BIAS, FMOE_SELECTION_BIAS, FMOE_GROUPS,
 * FMOE_TOPK_GROUPS, FMOE_SCALE_BITS (float32 bits), FMOE_ROUND_LOGITS, the capacity rules
 * FMOE_SLOT_MAJOR and FMOE_DROP_RENORM, the gated-MLP variants FMOE_MLP_BIAS,
 * FMOE_SWIGLU_ALPHA_BITS, FMOE_SWIGLU_LIMIT_BITS, and the shared experts FMOE_SHARED_F
 * (their MLP's width, 0: none) and FMOE_SHARED_GATE.
 */
#pragma once

#include "fused.cuh"

#if !defined(FMOE_DTYPE) || !defined(FMOE_H) || !defined(FMOE_F) || !defined(FMOE_E) || \
    !defined(FMOE_K) || !defined(FMOE_GATED) || !defined(FMOE_ACT) || !defined(FMOE_RENORM) || \
    !defined(FMOE_BM) || !defined(FMOE_BN) || !defined(FMOE_BK) || !defined(FMOE_STAGES) || \
    !defined(FMOE_BK90) || !defined(FMOE_STAGES90)
#error "the MoE kernels need FMOE_DTYPE, FMOE_H, FMOE_F, FMOE_E, FMOE_K, FMOE_GATED, FMOE_ACT, FMOE_RENORM and the tile FMOE_BM, FMOE_BN, FMOE_BK, FMOE_STAGES, FMOE_BK90, FMOE_STAGES90 (flashmoe_core/kernel/specs.py)"
#endif

#ifndef FMOE_EP
#define FMOE_EP 0
#endif
// Routing rules (flashmoe_core.config); absent means the default softmax-then-top-k.
#ifndef FMOE_SIGMOID
#define FMOE_SIGMOID 0
#endif
#ifndef FMOE_SOFTMAX_AFTER_TOPK
#define FMOE_SOFTMAX_AFTER_TOPK 0
#endif
#ifndef FMOE_ROUTER_BIAS
#define FMOE_ROUTER_BIAS 0
#endif
#ifndef FMOE_SELECTION_BIAS
#define FMOE_SELECTION_BIAS 0
#endif
#ifndef FMOE_GROUPS
#define FMOE_GROUPS 1
#endif
#ifndef FMOE_TOPK_GROUPS
#define FMOE_TOPK_GROUPS 1
#endif
#ifndef FMOE_SCALE_BITS
#define FMOE_SCALE_BITS 0x3f800000u
#endif
#ifndef FMOE_ROUND_LOGITS
#define FMOE_ROUND_LOGITS 0
#endif
#ifndef FMOE_SLOT_MAJOR
#define FMOE_SLOT_MAJOR 0
#endif
#ifndef FMOE_DROP_RENORM
#define FMOE_DROP_RENORM 0
#endif

namespace fmoe_entry {
using Route = flashmoe::moe::Route<FMOE_SIGMOID != 0, FMOE_SOFTMAX_AFTER_TOPK != 0,
                                   FMOE_ROUTER_BIAS != 0, FMOE_SELECTION_BIAS != 0, FMOE_GROUPS,
                                   FMOE_TOPK_GROUPS, FMOE_SCALE_BITS, FMOE_ROUND_LOGITS != 0,
                                   FMOE_SLOT_MAJOR != 0, FMOE_DROP_RENORM != 0>;
// Gated-MLP variants (flashmoe_core.config: mlp_bias, swiglu_alpha, swiglu_limit).
#ifndef FMOE_MLP_BIAS
#define FMOE_MLP_BIAS 0
#endif
#ifndef FMOE_SWIGLU_ALPHA_BITS
#define FMOE_SWIGLU_ALPHA_BITS 0x3fd9db23u
#endif
#ifndef FMOE_SWIGLU_LIMIT_BITS
#define FMOE_SWIGLU_LIMIT_BITS 0x40e00000u
#endif
using Mlp = flashmoe::moe::Mlp<FMOE_MLP_BIAS != 0, FMOE_SWIGLU_ALPHA_BITS,
                               FMOE_SWIGLU_LIMIT_BITS>;
// Shared experts (flashmoe_core.config: n_shared * shared_ffn, shared_gate).
#ifndef FMOE_SHARED_F
#define FMOE_SHARED_F 0
#endif
#ifndef FMOE_SHARED_GATE
#define FMOE_SHARED_GATE 0
#endif
using Shared = flashmoe::moe::Shared<FMOE_SHARED_F, FMOE_SHARED_GATE != 0>;
// The tile: wgmma builds (sm_90a, 16-bit) take its Hopper form, the others the mma.sync one.
constexpr bool kHopperTile = flashmoe::gemm::kWgmmaDtype<FMOE_DTYPE>;
constexpr int kBK = kHopperTile ? FMOE_BK90 : FMOE_BK;
constexpr int kStages = kHopperTile ? FMOE_STAGES90 : FMOE_STAGES;
using Cfg = flashmoe::moe::Config<FMOE_DTYPE, FMOE_H, FMOE_F, FMOE_E, FMOE_K, FMOE_GATED != 0,
                                  FMOE_ACT, FMOE_RENORM != 0, FMOE_BM, FMOE_BN, kBK, kStages,
                                  FMOE_EP != 0, Route, Mlp, Shared>;
static_assert(Cfg::G::kWgmma == kHopperTile, "the Hopper tile is the wgmma builds' tile");
}  // namespace fmoe_entry
