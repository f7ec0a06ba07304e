/**
 * @file moe_backward.cu
 * @brief Entry point of the persistent fused MoE backward kernel.
 *
 * Launch contract (docs/design.md, "Backward"): block 128 threads; grid = every
 * co-resident block (occupancy x SMs, from the host's occupancy query); dynamic shared
 * memory flashmoe_moe_backward_smem bytes (opt-in above 48 KiB). `fwd` points to the
 * MoeLayout of a save slot whose forward ran with `pre` set (routing, compact rows, z,
 * y_expert, pre of that call; its state and fault record are the layer's); `bwd` to the
 * layer's MoeBackwardLayout; both in device memory. `x` is the saved input, `dy` the
 * upstream gradient ([tokens, H], storage type), `dx` receives [tokens, H]; the
 * abi::kGradPointers float32 gradient pointers (in abi::BwdGrad order) are the user
 * layouts (GradOut in backward.cuh; those the config lacks may be null). flags bit 0 adds into the gradients. Launches of one layer (forward and
 * backward) must not overlap: they share the state words. Not cooperative-launched.
 *
 * Compile-time constants: those of moe_fused.cu (flashmoe/moe/entry_config.cuh). FMOE_EP=1
 * (expert parallelism) needs what the forward's EP build needs (NVSHMEM, symmetric
 * buffers, 2 * (world + 1) * 4 more bytes of dynamic shared memory) and a `fwd` layout
 * whose recv_saved, z_remote and pre_remote hold the saved forward's received rows;
 * MoeBackwardLayout::dxe and dxe_remote are then symmetric.
 */
#include <flashmoe/moe/backward.cuh>
#include <flashmoe/moe/entry_config.cuh>

using BwdCfg = fmoe_entry::Cfg;
using BwdS = BwdCfg::S;

/// Dynamic shared memory per block, read by the host.
extern "C" __device__ const int flashmoe_moe_backward_smem =
    flashmoe::moe::Backward<BwdCfg>::kSmemBytes;
/// The ABI version the kernel was built with (checked by the host at load).
extern "C" __device__ const unsigned flashmoe_moe_backward_abi = flashmoe::abi::kAbiVersion;

extern "C" __global__ void __launch_bounds__(128)
flashmoe_moe_backward(const flashmoe::abi::MoeLayout* __restrict__ fwd,
                      const flashmoe::abi::MoeBackwardLayout* __restrict__ bwd,
                      const BwdS* __restrict__ x, const BwdS* __restrict__ dy,
                      BwdS* __restrict__ dx, float* g_router, float* g_router_bias,
                      float* g_up, float* g_up2, float* g_up_bias, float* g_up2_bias,
                      float* g_down, float* g_down_bias, float* g_s_up, float* g_s_up2,
                      float* g_s_up_bias, float* g_s_up2_bias, float* g_s_down,
                      float* g_s_down_bias, float* g_s_gate, int tokens, int flags) {
  static_assert(flashmoe::abi::kGradPointers == 15, "one argument per abi::BwdGrad");
  flashmoe::moe::backward<BwdCfg>(
      fwd, bwd, x, dy, dx,
      flashmoe::moe::GradOut{g_router, g_router_bias, g_up, g_up2, g_up_bias, g_up2_bias,
                             g_down, g_down_bias, g_s_up, g_s_up2, g_s_up_bias,
                             g_s_up2_bias, g_s_down, g_s_down_bias, g_s_gate},
      tokens, flags);
}
