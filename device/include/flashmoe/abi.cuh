/**
 * @file abi.cuh
 * @brief The kernel ABI: every struct that crosses the host/device boundary.
 *
 * host/abi.py mirrors these layouts field by field; a compile test checks every
 * offset and size below against the mirror (kernels/abi_check.cu), so the two cannot
 * drift apart silently. Only fixed-width types, natural alignment, no padding holes.
 */
#pragma once

#include <cuda/std/cstdint>

namespace flashmoe {
namespace abi {

/// Bumped whenever a struct below changes.
constexpr cuda::std::uint32_t kAbiVersion = 1;

/// Fault codes written to FaultRecord::code.
enum FaultCode : cuda::std::uint32_t {
  kOk = 0,
  kTimeout = 1,        ///< a bounded wait ran out
  kProtocol = 2,       ///< a peer sent something the protocol does not allow
  kBadLaunch = 3,      ///< launch geometry or arguments the kernel cannot serve
};

/**
 * What the kernel reports when it stops itself. Lives in host-visible memory; the
 * first block to fail claims it (code from kOk to non-zero) and fills the rest.
 */
struct FaultRecord {
  cuda::std::uint32_t code;      ///< FaultCode
  cuda::std::int32_t phase;      ///< which wait (phase ids are listed per kernel)
  cuda::std::int32_t block;      ///< blockIdx.x of the waiter
  cuda::std::int32_t task;       ///< task or tile being worked on, -1 if none
  cuda::std::int64_t counter;    ///< value seen when giving up
  cuda::std::int64_t expected;   ///< value waited for
  cuda::std::int32_t rank;       ///< this PE
  cuda::std::int32_t peer;       ///< PE waited for, -1 if local
  cuda::std::uint64_t elapsed_ns;
  cuda::std::uint32_t epoch;     ///< launch epoch when it happened
  cuda::std::uint32_t reserved[3];
};

}  // namespace abi
}  // namespace flashmoe

/// X-macro list of every (struct, field) above, for the ABI compile test.
#define FMOE_ABI_FIELDS(X)   \
  X(FaultRecord, code)       \
  X(FaultRecord, phase)      \
  X(FaultRecord, block)      \
  X(FaultRecord, task)       \
  X(FaultRecord, counter)    \
  X(FaultRecord, expected)   \
  X(FaultRecord, rank)       \
  X(FaultRecord, peer)       \
  X(FaultRecord, elapsed_ns) \
  X(FaultRecord, epoch)

#define FMOE_ABI_STRUCTS(X) X(FaultRecord)
