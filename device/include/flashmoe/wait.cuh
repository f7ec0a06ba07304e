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

namespace flashmoe {

struct WaitSite {
  abi::FaultRecord* record;  ///< host-visible fault record
  uint64_t timeout_ns;
  int32_t rank;
  uint32_t epoch;
};

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

/// True once any block (or peer-facing code) has reported a fault this launch.
FMOE_DEVICE bool fault_raised(const WaitSite& site) {
  return site.record != nullptr &&
         *reinterpret_cast<volatile const uint32_t*>(&site.record->code) != abi::kOk;
}

/**
 * Spin until pred() holds; false (after reporting) when the deadline passes or another
 * block already failed. pred must read memory with volatile or atomic loads.
 */
template <class Pred, class Describe>
FMOE_DEVICE bool bounded_wait(const WaitSite& site, int32_t phase, int32_t task, int32_t peer,
                              Pred pred, Describe describe) {
  if (pred()) return true;
  const uint64_t start = global_timer_ns();
  uint32_t spins = 0;
  while (!pred()) {  // bounded: gives up after site.timeout_ns
    if ((++spins & 63u) == 0u) {
      const uint64_t now = global_timer_ns();
      if (fault_raised(site)) return false;
      if (now - start > site.timeout_ns) {
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
