/**
 * @file ring_test.cu
 * @brief The task-ring protocol under contention, on its own (kernel-level test).
 *
 * Every block claims task indices from state[kHead]. Indices below `seeds` are seed
 * tasks, known without the ring; each publishes `fanout` follow-up descriptors. Indices
 * from `seeds` on are ring slots. Each claimed descriptor d bumps seen[d]; the host
 * checks every follow-up was seen exactly once, and that the epoch advanced.
 *
 * Launch contract: block 128 threads, any grid whose blocks are all resident;
 * state zeroed before the first launch and ring_capacity >= seeds * fanout.
 */
#include <flashmoe/sync.cuh>

extern "C" __global__ void __launch_bounds__(128)
flashmoe_ring_test(uint32_t* state, uint64_t* ring, int ring_capacity, unsigned* seen,
                   int seeds, int fanout, flashmoe::abi::FaultRecord* record,
                   unsigned long long timeout_ns) {
  using namespace flashmoe;
  __shared__ uint32_t s_epoch;
  __shared__ long long s_task;
  if (threadIdx.x == 0) s_epoch = read_epoch(state);
  __syncthreads();
  const WaitSite site{record, timeout_ns, 0, s_epoch, state, 1};
  const TaskRing ring_q{ring, state, ring_capacity, s_epoch + 1u};
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    state[abi::kHead] = 0u;
    state[abi::kPublished] = 0u;
  }
  if (!grid_barrier(state, 0, site, kPhaseBarrierGate)) return;
  const uint32_t total = uint32_t(seeds) * uint32_t(1 + fanout);
  for (;;) {  // bounded: indices only grow and stop at `total`
    if (threadIdx.x == 0) {
      const uint32_t idx = atomicAdd(&state[abi::kHead], 1u);
      if (idx >= total) {
        s_task = -2;
      } else if (idx < uint32_t(seeds)) {
        s_task = idx;
        __threadfence();
        const bool ok = ring_q.publish(fanout, [&](int i) {
          return uint32_t(seeds) + idx * uint32_t(fanout) + uint32_t(i);
        }, site);
        if (!ok) s_task = -1;
      } else {
        s_task = ring_q.take(idx - uint32_t(seeds), site);
      }
      if (s_task >= 0) atomicAdd(&seen[s_task], 1u);
    }
    __syncthreads();
    const long long task = s_task;
    __syncthreads();
    if (task < 0) {
      if (task == -2) break;
      return;
    }
  }
  leave_launch(state);
}
