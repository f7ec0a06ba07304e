/**
 * @file wait.cuh
 * @brief Bounded waits: every spin in flashmoe goes through here.
 *
 * A wait gives up after a deadline (global timer, nanoseconds), records who waited
 * for what in the FaultRecord and returns false; the caller then leaves the kernel.
 * Nothing spins forever, so a lost peer or a protocol bug becomes a Python
 * exception instead of a hung GPU.
 */
#pragma once

#include "abi.cuh"
#include "prelude.cuh"
#if FLASHMOE_NVSHMEM
#include "shmem.cuh"
#endif

namespace flashmoe {

struct WaitSite {
  abi::FaultRecord* record;  ///< host-visible fault record
  uint64_t timeout_ns;       ///< longest wait without progress
  int32_t rank;
  uint32_t epoch;
  const uint32_t* state;     ///< the kernel's state words (progress), or null
  int32_t world;             ///< PEs whose progress counts (state symmetric if > 1)
};

/// A stamp that changes whenever the kernel moves on: a block reached a grid barrier,
/// claimed its next task or published one, here or (expert parallelism) on a peer. A
/// wait gives up only after timeout_ns without any such change, so a long launch, or
/// a peer busy with work we wait for, is never taken for a lost one.
FMOE_DEVICE uint32_t progress_stamp(const WaitSite& site) {
  if (site.state == nullptr) return 0u;
  // These words are zeroed with plain stores at launch start and by the last block out,
  // here and on peers: any recent value will do (a stale one only restarts the clock).
  FMOE_BENIGN_RACE("progress stamp: any recent value of the state words");
  const volatile uint32_t* w = site.state;
  uint32_t stamp = w[abi::kBarrier] + w[abi::kHead] + w[abi::kPublished];
#if FLASHMOE_NVSHMEM
  for (int p = 0; p < site.world; ++p) {  // bounded: world PEs
    if (p == site.rank) continue;
    stamp += nvshmem_uint32_g(site.state + abi::kBarrier, p) +
             nvshmem_uint32_g(site.state + abi::kHead, p) +
             nvshmem_uint32_g(site.state + abi::kPublished, p);
  }
#endif
  return stamp;
}

/// Claim the fault record (first failure wins) and describe the failure.
FMOE_DEVICE void report_fault(const WaitSite& site, uint32_t code, int32_t phase, int32_t task,
                              int64_t counter, int64_t expected, int32_t peer, uint64_t elapsed) {
  abi::FaultRecord* r = site.record;
  if (r == nullptr) return;
  if (atomicCAS_system(&r->code, 0u, code) != 0u) return;  // somebody reported first
  r->phase = phase;
  r->block = static_cast<int32_t>(blockIdx.x);
  r->task = task;
  r->counter = counter;
  r->expected = expected;
  r->rank = site.rank;
  r->peer = peer;
  r->elapsed_ns = elapsed;
  r->epoch = site.epoch;
  __threadfence_system();
}

/// A flag threads set (once, or several at a time: every producer lane that gives up
/// does, so an atomic exchange, not a store) and waits read while they poll: set_flag /
/// flag_set.
FMOE_DEVICE void set_flag(uint32_t* flag) { atomicExch(flag, 1u); }
FMOE_DEVICE bool flag_set(const uint32_t* flag) {
  return *reinterpret_cast<const volatile uint32_t*>(flag) != 0u;
}

/// True once any block (or peer-facing code) has reported a fault this launch.
FMOE_DEVICE bool fault_raised(const WaitSite& site) {
  return site.record != nullptr &&
         *reinterpret_cast<volatile const uint32_t*>(&site.record->code) != abi::kOk;
}

/// fault_raised() as one answer for the whole block: thread 0 reads the record (or
/// any thread reports `failed_here`) and every thread gets the same result, so a fault
/// recorded between two threads' reads cannot split the block. Every body thread calls it.
template <int kBody = 0>
FMOE_DEVICE bool block_fault_raised(const WaitSite& site, bool failed_here = false) {
  return body_sync_or<kBody>(failed_here || (threadIdx.x == 0 && fault_raised(site)));
}

/**
 * Spin until pred() holds; false (after reporting) when the kernel made no progress
 * for site.timeout_ns or another block already failed. pred must read memory with
 * volatile or atomic loads.
 */
template <class Pred, class Describe>
FMOE_DEVICE bool bounded_wait(const WaitSite& site, int32_t phase, int32_t task, int32_t peer,
                              Pred pred, Describe describe) {
  if (pred()) return true;
  uint64_t start = global_timer_ns();
  uint32_t stamp = progress_stamp(site);
  uint32_t spins = 0;
  while (!pred()) {  // bounded: gives up after site.timeout_ns without progress
    if ((++spins & 63u) == 0u) {
      const uint64_t now = global_timer_ns();
      if (fault_raised(site)) return false;
      const uint32_t seen = progress_stamp(site);
      if (seen != stamp) {  // the kernel moved on: wait afresh
        stamp = seen;
        start = now;
      } else if (now - start > site.timeout_ns) {
        int64_t seen = 0, expected = 0;
        describe(seen, expected);
        report_fault(site, abi::kTimeout, phase, task, seen, expected, peer, now - start);
        return false;
      }
    }
    __nanosleep(32);
  }
  return true;
}

/// Busy-wait for `ns` nanoseconds (fault injection: a delayed rank).
FMOE_DEVICE void sleep_for(uint64_t ns) {
  const uint64_t start = global_timer_ns();
  while (global_timer_ns() - start < ns) {  // bounded: ends after ns
    __nanosleep(1000);
  }
}

}  // namespace flashmoe
