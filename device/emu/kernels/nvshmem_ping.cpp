// Emulator build of kernels/nvshmem_ping.cu: every PE of the process, one grid each.
#include <flashmoe_emu/runtime.h>

#include "kernels/nvshmem_ping.cu"

#include <flashmoe_emu/entry.h>

/// PE p's dst, src and signal are heaps[p] + the given offsets; record and result
/// have one entry per PE, got[p] count words.
FMOE_EMU_EXPORT int emu_nvshmem_ping(int pes, char* const* heaps, unsigned long long heap_bytes,
                                     unsigned long long dst_off, const uint64_t* const* src,
                                     unsigned long long sig_off, int count, uint64_t epoch,
                                     flashmoe::abi::FaultRecord* records,
                                     unsigned long long timeout_ns, int* results,
                                     uint64_t* const* got) {
  fmoe_emu::ShmemWorld& w = fmoe_emu::shmem_world();
  w.npes = pes;
  w.base.assign(heaps, heaps + pes);
  w.bytes = size_t(heap_bytes);
  const bool ok = fmoe_emu::launch(pes, dim3(1), dim3(32), [&](int pe) {
    flashmoe_nvshmem_ping(reinterpret_cast<uint64_t*>(heaps[pe] + dst_off), src[pe],
                          reinterpret_cast<uint64_t*>(heaps[pe] + sig_off), count, epoch,
                          records + pe, timeout_ns, results + pe, got[pe]);
  });
  return ok ? 0 : 1;
}
