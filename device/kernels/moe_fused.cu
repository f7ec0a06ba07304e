/**
 * @file moe_fused.cu
 * @brief Entry point of the persistent fused MoE forward kernel.
 *
 * Launch contract (docs/design.md): block flashmoe_moe_threads threads (128; 160 in
 * warp-specialised sm_90a builds); grid = every co-resident block
 * (occupancy x SMs, from the host's occupancy query); dynamic shared memory
 * flashmoe_moe_smem bytes (opt-in above 48 KiB); `layout` points to a MoeLayout in
 * device memory; the fault record it names is host-visible. Not cooperative-launched:
 * co-residency comes from the grid size.
 *
 * Compile-time constants: flashmoe/moe/entry_config.cuh (the JIT sets them from the
 * config: flashmoe_core/kernel/specs.py).
 * FMOE_EP=1 (expert parallelism) needs FLASHMOE_NVSHMEM=1, symmetric buffers in the
 * layout, NVSHMEM initialised on every PE, the module registered with NVSHMEM, and
 * 2 * (world + 1) * 4 more bytes of dynamic shared memory (peer tables).
 */
#include <flashmoe/moe/entry_config.cuh>

using Cfg = fmoe_entry::Cfg;
using S = Cfg::S;

/// Dynamic shared memory per block without the peer tables, read by the host.
extern "C" __device__ const int flashmoe_moe_smem = Cfg::kSmemBytes;
/// The ABI version the kernel was built with (checked by the host at load).
extern "C" __device__ const unsigned flashmoe_moe_abi = flashmoe::abi::kAbiVersion;
/// 1: the expert GEMMs load weight tiles by TMA, so MoeLayout::tensor_maps must hold the
/// weights' tensor maps (sm_90a builds of 16-bit types); 0: they are not read.
extern "C" __device__ const int flashmoe_moe_tma = Cfg::G::kTmaB ? 1 : 0;

/// Threads per block: 128, or 160 in warp-specialised builds (sm_90a, 16-bit): the
/// body's warpgroup and a producer warp.
extern "C" __device__ const int flashmoe_moe_threads = Cfg::kBlockThreads;

extern "C" __global__ void __launch_bounds__(Cfg::kBlockThreads)
flashmoe_moe_forward(const flashmoe::abi::MoeLayout* __restrict__ layout,
                     const S* __restrict__ x, S* __restrict__ y, int tokens, int capacity,
                     int mode) {
  flashmoe::moe::forward<Cfg>(layout, x, y, tokens, capacity, mode);
}
