// Emulator build of kernels/ring_test.cu (the task-ring protocol), unchanged source.
#include <flashmoe_emu/runtime.h>

#include "kernels/ring_test.cu"

#include <flashmoe_emu/entry.h>

FMOE_EMU_EXPORT int emu_ring_test(int grid, uint32_t* state, uint64_t* ring, int ring_capacity,
                                  unsigned* seen, int seeds, int fanout,
                                  flashmoe::abi::FaultRecord* record,
                                  unsigned long long timeout_ns) {
  const bool ok = fmoe_emu::launch(1, dim3(unsigned(grid)), dim3(128), [&](int) {
    flashmoe_ring_test(state, ring, ring_capacity, seen, seeds, fanout, record, timeout_ns);
  });
  return ok ? 0 : 1;
}
