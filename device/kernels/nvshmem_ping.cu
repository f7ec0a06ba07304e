/**
 * @file nvshmem_ping.cu
 * @brief Proves the NVSHMEM device path end to end: put, fence, put-with-signal,
 *        bounded wait, acquire.
 *
 * Every PE puts `count` words of `src` to `dst` on PE (me + 1) % npes: all but the
 * last with a plain put, nvshmem_fence (which orders that put before the next one to
 * the same PE), then the last word with a signal set to `epoch`. It then waits
 * (bounded by timeout_ns) until its own signal holds `epoch` from PE (me - 1),
 * acquires, and copies what arrived in `dst` to `got` (so the words the host checks
 * are the ones the kernel read after the signal). On timeout the fault record names
 * the phase (1), the peer waited for, the signal value seen and the one expected.
 * result[0] = 1 on success, 0 on timeout.
 *
 * Launch contract: grid 1, block 32; dst and signal are symmetric allocations, got
 * holds count words; the module must be registered with nvshmem (library_init) before
 * launch.
 */
#include <flashmoe/shmem.cuh>
#include <flashmoe/wait.cuh>

extern "C" __global__ void flashmoe_nvshmem_ping(uint64_t* dst, const uint64_t* src,
                                                 uint64_t* signal, int count, uint64_t epoch,
                                                 flashmoe::abi::FaultRecord* record,
                                                 uint64_t timeout_ns, int* result,
                                                 uint64_t* got) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const int me = nvshmem_my_pe();
  const int npes = nvshmem_n_pes();
  const int to = (me + 1) % npes;
  const int from = (me + npes - 1) % npes;
  if (count > 1) nvshmem_putmem_nbi(dst, src, size_t(count - 1) * sizeof(uint64_t), to);
  nvshmem_fence();
  nvshmem_putmem_signal_nbi(dst + count - 1, src + count - 1, sizeof(uint64_t), signal, epoch,
                            NVSHMEM_SIGNAL_SET, to);
  nvshmem_quiet();

  const flashmoe::WaitSite site{record, timeout_ns, me, static_cast<uint32_t>(epoch), nullptr,
                                    1};
  const bool ok = flashmoe::bounded_wait(
      site, /*phase=*/1, /*task=*/-1, /*peer=*/from,
      [&] { return nvshmem_signal_fetch(signal) == epoch; },
      [&](int64_t& seen, int64_t& expected) {
        seen = static_cast<int64_t>(nvshmem_signal_fetch(signal));
        expected = static_cast<int64_t>(epoch);
      });
  if (ok) {
    __threadfence_system();  // acquire: the words were written by another GPU
    for (int i = 0; i < count; ++i) got[i] = __ldcg(&dst[i]);  // bounded: count words
  }
  result[0] = ok ? 1 : 0;
}
