// Emulator build of kernels/moe_fused.cu (the fused MoE forward), unchanged source:
// one grid per PE, all launched together (expert parallelism inside one process).
#include <flashmoe_emu/runtime.h>

#include "kernels/moe_fused.cu"

#include <flashmoe_emu/entry.h>

/// Most PEs one emulated launch serves (sizes the peer tables in shared memory).
constexpr int kEmuMaxWorld = 64;

// forward()'s `extern __shared__ char smem[]`: the kernel's tables, then the two peer
// prefix tables expert parallelism adds (2 * (world + 1) ints).
namespace flashmoe {
namespace moe {
constexpr int kEmuSmemBytes = Cfg::kSmemBytes + 2 * (kEmuMaxWorld + 1) * 4;
alignas(1024) thread_local char smem[kEmuSmemBytes];
}  // namespace moe
}  // namespace flashmoe

FMOE_EMU_EXPORT int emu_moe_smem() { return flashmoe_moe_smem; }
FMOE_EMU_EXPORT unsigned emu_moe_abi() { return flashmoe_moe_abi; }
FMOE_EMU_EXPORT int emu_moe_tma() { return flashmoe_moe_tma; }
FMOE_EMU_EXPORT int emu_moe_max_world() { return kEmuMaxWorld; }

/**
 * One launch of the fused kernel on `pes` PEs at once. Per PE p: layouts[p], x[p],
 * y[p], tokens[p], capacity[p]; launched[p] == 0 leaves PE p out (its grid exits at
 * once: an absent rank). heaps[p] is PE p's symmetric heap (expert parallelism only;
 * every heap holds heap_bytes).
 */
FMOE_EMU_EXPORT int emu_moe_forward(int pes, const flashmoe::abi::MoeLayout* const* layouts,
                                    const S* const* x, S* const* y, const int* tokens,
                                    const int* capacity, const int* launched, int mode, int grid,
                                    char* const* heaps, unsigned long long heap_bytes) {
  if (pes < 1 || pes > kEmuMaxWorld) {
    fmoe_emu::record_error("emulator: " + std::to_string(pes) + " PEs; 1.." +
                           std::to_string(kEmuMaxWorld) + " are supported");
    return 1;
  }
#if FLASHMOE_NVSHMEM
  fmoe_emu::ShmemWorld& w = fmoe_emu::shmem_world();
  w.npes = pes;
  w.base.assign(heaps, heaps + pes);
  w.bytes = size_t(heap_bytes);
#else
  (void)heaps;
  (void)heap_bytes;
#endif
  const bool ok = fmoe_emu::launch(
      pes, dim3(unsigned(grid)), dim3(unsigned(Cfg::kBlockThreads)),
      [&](int pe) {
        if (launched[pe]) flashmoe_moe_forward(layouts[pe], x[pe], y[pe], tokens[pe], capacity[pe], mode);
      },
      [](int) { emu_block_start(flashmoe::moe::smem, sizeof flashmoe::moe::smem); });
  return ok ? 0 : 1;
}
