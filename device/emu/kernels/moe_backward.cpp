// Emulator build of kernels/moe_backward.cu (the fused MoE backward), unchanged source.
#include <flashmoe_emu/runtime.h>

#include "kernels/moe_backward.cu"

#include <flashmoe_emu/entry.h>

// backward()'s `extern __shared__ char smem[]`.
namespace flashmoe {
namespace moe {
alignas(128) thread_local char smem[Backward<BwdCfg>::kSmemBytes];
}  // namespace moe
}  // namespace flashmoe

FMOE_EMU_EXPORT int emu_moe_backward_smem() { return flashmoe_moe_backward_smem; }
FMOE_EMU_EXPORT unsigned emu_moe_backward_abi() { return flashmoe_moe_backward_abi; }

/**
 * One launch of the backward kernel on `pes` PEs at once (one for now). Per PE p:
 * fwd[p], bwd[p], x[p], dy[p], dx[p], tokens[p]; grads[5 p .. 5 p + 4] are its router,
 * up, up2, down and down_b gradient pointers.
 */
FMOE_EMU_EXPORT int emu_moe_backward(int pes, const flashmoe::abi::MoeLayout* const* fwd,
                                     const flashmoe::abi::MoeBackwardLayout* const* bwd,
                                     const BwdS* const* x, const BwdS* const* dy,
                                     BwdS* const* dx, float* const* grads, const int* tokens,
                                     int flags, int grid) {
  const bool ok = fmoe_emu::launch(
      pes, dim3(unsigned(grid)), dim3(128),
      [&](int pe) {
        float* const* g = grads + 5 * pe;
        flashmoe_moe_backward(fwd[pe], bwd[pe], x[pe], dy[pe], dx[pe], g[0], g[1], g[2], g[3],
                              g[4], tokens[pe], flags);
      },
      [](int) { emu_poison(flashmoe::moe::smem, sizeof flashmoe::moe::smem); });
  return ok ? 0 : 1;
}
