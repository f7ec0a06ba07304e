/**
 * @file sync.cuh
 * @brief Inter-block synchronisation of the persistent kernel: grid barrier, task ring.
 *
 * Ordering rules (docs/design.md): results are released by __syncthreads(), then one
 * thread's __threadfence() and atomic; they are acquired by the observing thread's
 * __threadfence() before __syncthreads(). Data produced during the launch is read
 * through L2 (ld.global.cg / cp.async.cg).
 */
#pragma once

#include "abi.cuh"
#include "wait.cuh"

namespace flashmoe {

/// Load through L2, skipping L1 (L1 is not coherent across blocks within a launch).
template <class T>
FMOE_DEVICE T load_cg(const T* p) {
  return __ldcg(p);
}

FMOE_DEVICE uint32_t load_volatile(const uint32_t* p) {
  return *reinterpret_cast<const volatile uint32_t*>(p);
}

FMOE_DEVICE uint64_t load_volatile(const uint64_t* p) {
  return *reinterpret_cast<const volatile uint64_t*>(p);
}

/// A strong (volatile) 64-bit store: single-copy atomic when aligned, and unlike an
/// atomic exchange it returns nothing, so a run of them issues without waiting.
FMOE_DEVICE void store_volatile(uint64_t* p, uint64_t v) {
  *reinterpret_cast<volatile uint64_t*>(p) = v;
}

/// Bounded wait until a 64-bit signal word (written by a peer) equals `value`.
FMOE_DEVICE bool wait_signal(const WaitSite& site, int32_t phase, int32_t task, int32_t peer,
                             const uint64_t* sig, uint64_t value) {
  return bounded_wait(
      site, phase, task, peer, [&] { return load_volatile(sig) == value; },
      [&](int64_t& seen, int64_t& expected) {
        seen = int64_t(load_volatile(sig));
        expected = int64_t(value);
      });
}

/// The launch epoch; read once by every block before anything else.
FMOE_DEVICE uint32_t read_epoch(const uint32_t* state) {
  return load_volatile(&state[abi::kEpoch]);
}

using abi::Phase;
using abi::kPhaseBarrierGate;
using abi::kPhaseBarrierLists;
using abi::kPhaseBarrierScan;
using abi::kPhaseBarrierTopk;
using abi::kPhaseDispatchWait;
using abi::kPhaseHeaders;
using abi::kPhasePeerDone;
using abi::kPhaseReturnWait;
using abi::kPhaseRingFull;
using abi::kPhaseRingSlot;

/**
 * Grid-wide barrier number `index` (0, 1, ...) of this launch. The arrival counter
 * only grows during a launch (the last block out resets it), so barrier i waits for
 * (i + 1) * gridDim.x arrivals. Returns false if the wait failed (fault recorded or
 * seen); the caller must leave the kernel.
 */
template <int kBody = 0>
FMOE_DEVICE bool grid_barrier(uint32_t* state, int index, const WaitSite& site, int32_t phase) {
  __shared__ int ok;
  body_sync<kBody>();
  if (threadIdx.x == 0) {
    __threadfence();
    atomicAdd(&state[abi::kBarrier], 1u);
    const uint32_t target = uint32_t(index + 1) * gridDim.x;
    ok = bounded_wait(
        site, phase, -1, -1, [&] { return load_volatile(&state[abi::kBarrier]) >= target; },
        [&](int64_t& seen, int64_t& expected) {
          seen = load_volatile(&state[abi::kBarrier]);
          expected = target;
        });
    __threadfence();
  }
  body_sync<kBody>();
  return ok != 0;
}

/// Leave the launch: the last block out resets the barrier/exit words and advances the
/// epoch (so the next launch, or a replayed graph, sees fresh ring tags). Returns true
/// in thread 0 of the last block out.
template <int kBody = 0>
FMOE_DEVICE bool leave_launch(uint32_t* state) {
  body_sync<kBody>();
  bool last = false;
  if (threadIdx.x == 0) {
    __threadfence();
    const uint32_t out = atomicAdd(&state[abi::kExit], 1u) + 1u;
    if (out == gridDim.x) {
      __threadfence();  // acquire: every block's barrier arrivals come before the resets
      state[abi::kBarrier] = 0u;
      state[abi::kExit] = 0u;
      __threadfence();
      atomicAdd(&state[abi::kEpoch], 1u);
      last = true;
    }
  }
  return last;
}

/**
 * Task ring: producers append 32-bit descriptors into epoch-tagged 64-bit slots;
 * consumers claim slot indices and wait until the slot carries this launch's tag.
 */
struct TaskRing {
  uint64_t* slots;
  uint32_t* state;
  int32_t capacity;
  uint32_t tag;  ///< epoch + 1 (never 0, so zeroed memory is never a valid slot)
  int32_t slot_phase = kPhaseRingSlot;  ///< fault phase of a slot wait (kernels differ)
  int32_t full_phase = kPhaseRingFull;  ///< fault phase of running out of slots

  /// Append `count` descriptors desc(i); called by one thread after its release fence.
  /// The caller usually publishes because its counter atomic saw other blocks' credits:
  /// this fence makes that read an acquire, and (being cumulative) releases what those
  /// blocks wrote to the task's taker too. Without it only the caller's own writes are
  /// ordered before the slot.
  template <class Desc>
  FMOE_DEVICE bool publish(int count, Desc desc, const WaitSite& site) const {
    __threadfence();
    const uint32_t base = atomicAdd(&state[abi::kPublished], uint32_t(count));
    if (base + uint32_t(count) > uint32_t(capacity)) {
      report_fault(site, abi::kProtocol, full_phase, -1, int64_t(base) + count, capacity, -1, 0);
      return false;
    }
    // The fence above releases everything before it to each slot's strong store; the
    // stores need no order among themselves (each taker waits for its own slot).
    for (int i = 0; i < count; ++i) {
      store_volatile(&slots[base + i], (uint64_t(tag) << 32) | uint64_t(desc(i)));
    }
    return true;
  }

  /// Wait for slot `index` of this launch; returns its descriptor, or -1 on failure.
  FMOE_DEVICE int64_t take(uint32_t index, const WaitSite& site) const {
    if (index >= uint32_t(capacity)) {
      report_fault(site, abi::kProtocol, full_phase, int32_t(index), index, capacity, -1, 0);
      return -1;
    }
    const uint64_t* slot = &slots[index];
    const bool ok = bounded_wait(
        site, slot_phase, int32_t(index), -1,
        [&] { return uint32_t(load_volatile(slot) >> 32) == tag; },
        [&](int64_t& seen, int64_t& expected) {
          seen = int64_t(load_volatile(slot) >> 32);
          expected = tag;
        });
    if (!ok) return -1;
    __threadfence();
    return int64_t(load_volatile(slot) & 0xffffffffull);
  }
};

}  // namespace flashmoe
