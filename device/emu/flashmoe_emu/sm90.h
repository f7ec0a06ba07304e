/**
 * @file sm90.h
 * @brief Hopper's asynchronous instructions, emulated: mbarrier, wgmma.mma_async with
 *        shared-memory matrix descriptors, wgmma fence/commit/wait, elect.sync and
 *        setmaxnreg (device/include/flashmoe/gemm/sm90.cuh calls these under the
 *        emulator).
 *
 * The semantics follow the PTX ISA, written out here rather than taken from CuTe, so
 * that a disagreement between the project's use of CuTe and the hardware shows:
 * gmma_layout_mismatches() compares the descriptor decoding and the accumulator
 * layout below with CuTe's SM90 GMMA layouts at start-up.
 *
 * Asynchrony is real where a kernel could get it wrong:
 *  - wgmma.mma_async reads its shared-memory operands and writes its accumulators
 *    when the thread's wgmma.wait_group retires the op, not at issue; at issue the
 *    accumulator registers are overwritten with NaN, so a read before the wait shows
 *    in the results, and the operands are fingerprinted, so shared memory written
 *    while an op is in flight is reported;
 *  - an op issued without a wgmma.fence since the thread's last wait is reported (the
 *    fence orders register and shared-memory accesses before the async proxy's);
 *  - an mbarrier phase completes only when its pending arrivals and its transaction
 *    count both reach zero; try_wait yields the fiber while the phase is open; an
 *    ordinary store over a live barrier's 8 bytes is reported at its next operation.
 *  - in checked builds, a wgmma.mma_async operand or TMA destination word whose last
 *    generic-proxy writer (a store, a landed cp.async) issued no fence.proxy.async
 *    after writing it is reported at issue (memory.h); a TMA landing is an async-proxy
 *    write.
 * Not modelled: clusters, multicast.
 */
#pragma once

#include <limits>
#include <unordered_map>

#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "atoms.h"
#include "runtime.h"

namespace fmoe_emu {

// Checked builds instrument std:: templates: the state below (vectors, maps) is touched
// under the memory model's guard, so that it is not taken for the kernel's memory. The
// guard never spans a yield (other threads' accesses must stay checked).
#if FMOE_EMU_CHECKED
#define FMOE_SM90_GUARD const InModel fmoe_sm90_guard_
#else
#define FMOE_SM90_GUARD static_cast<void>(0)
#endif

// ------------------------------------------------------------------ shared addresses
/// The block's dynamic shared memory, as the emulated kernel registered it: shared
/// addresses (what descriptors and cvta hold) are offsets into it.
struct SharedWindow {
  const char* base = nullptr;
  size_t bytes = 0;
};
inline thread_local SharedWindow shared_window;

/// Register a block's dynamic shared memory (call from the launch's on_start); it must
/// be 1024-byte aligned, as 128-byte swizzled operands need on the GPU.
FMOE_EMU_RT inline void set_shared_window(const void* base, size_t bytes) {
  if (reinterpret_cast<uintptr_t>(base) % 1024) {
    fatal("emulator: the dynamic shared memory window must be 1024-byte aligned");
  }
  shared_window = SharedWindow{static_cast<const char*>(base), bytes};
}

FMOE_EMU_RT inline uint32_t shared_address(const void* p) {
  const char* c = static_cast<const char*>(p);
  const SharedWindow& w = shared_window;
  if (w.base == nullptr || c < w.base || c >= w.base + w.bytes) {
    fatal("a shared address was taken of memory outside the block's dynamic shared memory "
          "(descriptors and cvta need the registered window: set_shared_window)");
  }
  return uint32_t(c - w.base);
}

FMOE_EMU_RT inline const char* shared_pointer(uint32_t addr, size_t bytes, const char* what) {
  const SharedWindow& w = shared_window;
  if (w.base == nullptr || size_t(addr) + bytes > w.bytes) {
    fatal(std::string(what) + " reads shared address " + std::to_string(addr) +
          " past the block's dynamic shared memory (" + std::to_string(w.bytes) + " B)");
  }
  return w.base + addr;
}

// ------------------------------------------------------------------ mbarrier
struct Mbarrier {
  uint32_t expected = 0;  ///< arrivals per phase (init count)
  uint32_t pending = 0;   ///< arrivals still missing in the current phase
  int64_t tx = 0;         ///< transaction bytes expected minus completed
  uint32_t phase = 0;     ///< phases completed so far (parity = phase & 1)
  std::vector<uint32_t> rel;   ///< what the current phase's arrivals released (checked)
  std::vector<uint32_t> done;  ///< ... and the last completed phase's: waiters acquire it
};
inline thread_local std::unordered_map<const void*, Mbarrier> mbarriers;

/// What an initialised mbarrier's 8 bytes hold here (the state lives beside them): a
/// mark of its address, so that an ordinary store over a live barrier shows at its
/// next operation (on a GPU it corrupts the barrier).
FMOE_EMU_RT inline uint64_t mbarrier_mark(const void* bar) {
  return 0x4d42415252494552ull ^ reinterpret_cast<uintptr_t>(bar);
}

FMOE_EMU_RT inline Mbarrier& mbarrier_state(const void* bar, const char* op) {
  FMOE_SM90_GUARD;
  if (reinterpret_cast<uintptr_t>(bar) % 8) fatal(std::string(op) + " on an unaligned mbarrier");
  auto it = mbarriers.find(bar);
  if (it == mbarriers.end()) fatal(std::string(op) + " on an mbarrier nobody initialised");
  uint64_t held;
  std::memcpy(&held, bar, 8);
  if (held != mbarrier_mark(bar)) {
    fatal(std::string(op) + " on an mbarrier that an ordinary store overwrote since its "
          "mbarrier.init (shared memory of a live barrier must hold nothing else)");
  }
  return it->second;
}

FMOE_EMU_RT inline void mbarrier_maybe_complete(Mbarrier& m) {
  if (m.pending == 0 && m.tx == 0) {
    ++m.phase;
    m.pending = m.expected;
    FMOE_SM90_GUARD;
    m.done.swap(m.rel);
    m.rel.assign(m.done.size(), 0u);
  }
}

/// The current thread's arrival releases what it has seen into the phase (checked builds).
FMOE_EMU_RT inline void mbarrier_release(Mbarrier& m, const uint32_t* snapshot = nullptr) {
  const int n = hb_threads();
  if (n == 0) return;
  FMOE_SM90_GUARD;
  if (m.rel.size() != size_t(n)) m.rel.assign(size_t(n), 0u);
  if (m.done.size() != size_t(n)) m.done.assign(size_t(n), 0u);
  if (snapshot == nullptr) {
    hb_release_cur(m.rel.data());
  } else {
    vc_join(m.rel.data(), snapshot, n);
  }
}

FMOE_EMU_RT inline void mbarrier_init(void* bar, uint32_t count) {
  if (reinterpret_cast<uintptr_t>(bar) % 8) fatal("mbarrier.init on an unaligned address");
  if (count == 0 || count >= (1u << 20)) fatal("mbarrier.init count must be in [1, 2^20)");
  FMOE_SM90_GUARD;
  mbarriers[bar] = Mbarrier{count, count, 0, 0};
  const uint64_t mark = mbarrier_mark(bar);
  std::memcpy(bar, &mark, 8);
}

/// arrive (with expect_tx bytes first, as arrive.expect_tx does); returns the phase
/// the arrival belonged to (the PTX state token).
FMOE_EMU_RT inline uint64_t mbarrier_arrive(void* bar, uint32_t expect_tx = 0) {
  Mbarrier& m = mbarrier_state(bar, "mbarrier.arrive");
  const uint64_t token = m.phase;
  m.tx += expect_tx;
  if (m.pending == 0) fatal("mbarrier.arrive on a phase that has every arrival already");
  mbarrier_release(m);
  --m.pending;
  mbarrier_maybe_complete(m);
  return token;
}

FMOE_EMU_RT inline void mbarrier_expect_tx(void* bar, uint32_t bytes) {
  mbarrier_state(bar, "mbarrier.expect_tx").tx += bytes;
}

FMOE_EMU_RT inline void mbarrier_complete_tx(void* bar, uint32_t bytes) {
  Mbarrier& m = mbarrier_state(bar, "mbarrier.complete_tx");
  m.tx -= bytes;
  if (m.tx < 0) fatal("mbarrier.complete_tx completed more bytes than the phase expects");
  mbarrier_maybe_complete(m);
}

/// try_wait.parity: whether the phase with this parity has completed (the barrier's
/// current phase has the other parity). A false answer yields the fiber first, so a
/// spinning thread lets the arriving ones run.
FMOE_EMU_RT inline void land_for(const void* bar);

FMOE_EMU_RT inline bool mbarrier_try_wait_parity(void* bar, uint32_t parity) {
  land_for(bar);  // loads land at the latest moment a correct kernel allows
  Mbarrier& m = mbarrier_state(bar, "mbarrier.try_wait");
  const bool done = (m.phase & 1u) != (parity & 1u);
  if (!done) {
    yield();
    chaos();
  } else if (!m.done.empty()) {
    FMOE_SM90_GUARD;
    hb_acquire_cur(m.done.data());
  }
  return done;
}

// ------------------------------------------------------------------ cp.async arrive-on
/// cp.async.mbarrier.arrive.noinc: an arrival on `bar` once every cp.async the thread
/// issued before it has landed (the barrier's count includes it: noinc). Its copies
/// and the arrival take effect together when a wait on the barrier looks, the latest
/// moment a correct kernel allows; a cp.async.wait_group of the thread no longer waits
/// for them.
struct PendingCpArrive {
  void* bar;
  unsigned tid;
  std::vector<PendingCopy> copies;
  std::vector<uint32_t> clock;  ///< the thread's vector clock at the arrive (checked)
  uint32_t own;
  uint32_t phase;  ///< the barrier's phase when it was issued
  Site site;
};
inline thread_local std::vector<PendingCpArrive> pending_cp_arrive;

FMOE_EMU_RT inline void cp_async_mbarrier_arrive_noinc(void* bar, const Site& site) {
  const uint32_t phase = mbarrier_state(bar, "cp.async.mbarrier.arrive").phase;
  Fiber& f = cur_fiber();
  FMOE_SM90_GUARD;
  PendingCpArrive r{bar, f.tid, {}, {}, 0, phase, site};
  r.copies.swap(f.pending);
  // In flight until the arrival lands: poison, as a TMA box is.
  for (const PendingCopy& c : r.copies) std::memset(c.dst, 0xff, 16);
  r.clock.assign(size_t(hb_threads()), 0u);
  if (!r.clock.empty()) r.own = hb_snapshot_cur(r.clock.data());
  pending_cp_arrive.push_back(std::move(r));
}

FMOE_EMU_RT inline void cp_arrive_land(PendingCpArrive& r) {
  {
    const ActAs as(int(r.tid), r.own);  // the issuing thread's writes, before its arrival
    for (const PendingCopy& c : r.copies) land(c);
  }
  Mbarrier& m = mbarrier_state(r.bar, "cp.async.mbarrier.arrive");
  if (m.phase != r.phase) {
    fatal("cp.async.mbarrier.arrive.noinc (" + describe(r.site) + ", thread " +
          std::to_string(r.tid) + ") lands after the phase it was issued in completed: the "
          "barrier's count is short of its arrivals, so the phase completed before these "
          "copies landed");
  }
  if (m.pending == 0) {
    fatal("cp.async.mbarrier.arrive.noinc (" + describe(r.site) + ") arrives on a phase that "
          "has every arrival already (the barrier's count must include these arrivals)");
  }
  if (!r.clock.empty()) mbarrier_release(m, r.clock.data());
  --m.pending;
  mbarrier_maybe_complete(m);
}

// ------------------------------------------------------------------ TMA
/// The emulator's tensor map: what cuTensorMapEncodeTiled would encode, in the 128
/// bytes of a CUtensorMap (host/tma.py writes it; the layout is this emulator's own).
struct EmuTensorMap {
  uint32_t magic;         ///< kTensorMapMagic
  uint32_t elem_bytes;    ///< 1, 2, 4 or 8
  uint32_t rank;          ///< 1..3
  uint32_t swizzle;       ///< 0 none, 1 32-byte, 2 64-byte, 3 128-byte
  uint64_t address;       ///< global address of element (0, 0, 0)
  uint64_t dims[3];       ///< elements per dimension, innermost first
  uint64_t strides[2];    ///< bytes between steps of dimensions 1 and 2
  uint32_t box[3];        ///< elements per dimension of one load
  uint32_t pad[13];
};
static_assert(sizeof(EmuTensorMap) == 128, "a tensor map is 128 bytes");
constexpr uint32_t kTensorMapMagic = 0x4d544d46u;  // "FMTM"

struct PendingTma {
  char* dst;
  EmuTensorMap map;
  int coord[3];
  void* bar;
  uint32_t bytes;
  Site site;
};
inline thread_local std::vector<PendingTma> pending_tma;

FMOE_EMU_RT inline uint32_t tma_swizzle_span(uint32_t swizzle) {
  return swizzle == 0 ? 0u : 16u << swizzle;
}

/// The load lands: the box is read from global memory (zeros outside the tensor),
/// written row by row into shared memory in the map's swizzle, and its bytes complete
/// the barrier's transactions.
FMOE_EMU_RT inline void tma_land(const PendingTma& t) {
  const EmuTensorMap& m = t.map;
  const uint32_t eb = m.elem_bytes;
  const uint32_t base = shared_address(t.dst);
  const int bits = int(m.swizzle);  // XOR width in 16-byte units: 0, 1, 2 or 3 bits
  uint32_t n = 0;
  for (uint32_t i2 = 0; i2 < (m.rank > 2 ? m.box[2] : 1u); ++i2) {
    for (uint32_t i1 = 0; i1 < (m.rank > 1 ? m.box[1] : 1u); ++i1) {
      for (uint32_t i0 = 0; i0 < m.box[0]; ++i0, ++n) {
        uint32_t addr = base + n * eb;
        if (bits) addr ^= ((addr >> 7) & ((1u << bits) - 1u)) << 4;
        char* out = const_cast<char*>(shared_pointer(addr, eb, "cp.async.bulk.tensor"));
        const int64_t g0 = int64_t(t.coord[0]) + i0, g1 = int64_t(t.coord[1]) + i1,
                      g2 = int64_t(t.coord[2]) + i2;
        const bool inside = g0 >= 0 && uint64_t(g0) < m.dims[0] &&
                            (m.rank < 2 || (g1 >= 0 && uint64_t(g1) < m.dims[1])) &&
                            (m.rank < 3 || (g2 >= 0 && uint64_t(g2) < m.dims[2]));
        if (!inside) {
          std::memset(out, 0, eb);
          continue;
        }
        const uint64_t off = uint64_t(g0) * eb + (m.rank > 1 ? uint64_t(g1) * m.strides[0] : 0) +
                             (m.rank > 2 ? uint64_t(g2) * m.strides[1] : 0);
        copy_l2(out, reinterpret_cast<const void*>(m.address + off), eb, 0);
      }
    }
  }
  on_async_proxy_write(t.dst, t.bytes);
  mbarrier_complete_tx(t.bar, t.bytes);
}

/// Land the loads and cp.async arrivals that complete `bar`'s phase (before a wait on it
/// looks), in issue order. Landing reads global memory through the memory model, which
/// may hand the thread's turn away: each pending operation is taken out before it lands
/// and the lists are searched afresh after, so other threads' landings in between are
/// safe, and the thread does not yield in the middle of one (HoldTurn).
FMOE_EMU_RT inline void land_for(const void* bar) {
  FMOE_SM90_GUARD;
  const HoldTurn hold;
  for (;;) {  // bounded: every round removes one pending load
    auto it = std::find_if(pending_tma.begin(), pending_tma.end(),
                           [bar](const PendingTma& t) { return t.bar == bar; });
    if (it == pending_tma.end()) break;
    const PendingTma t = *it;
    pending_tma.erase(it);
    tma_land(t);
  }
  for (;;) {  // bounded: every round removes one pending arrival
    auto it = std::find_if(pending_cp_arrive.begin(), pending_cp_arrive.end(),
                           [bar](const PendingCpArrive& r) { return r.bar == bar; });
    if (it == pending_cp_arrive.end()) break;
    PendingCpArrive r = std::move(*it);
    pending_cp_arrive.erase(it);
    cp_arrive_land(r);
  }
}

/// cp.async.bulk.tensor.{1,2,3}d.shared.global.mbarrier::complete_tx::bytes: the box at
/// `coord` goes to `dst` and completes its bytes on `bar`, asynchronously: the box reads
/// as 0xFF bytes (NaN) until a wait on the barrier lands it.
FMOE_EMU_RT inline void tma_load(void* dst, const void* map, void* bar, int rank, const int* coord,
                                 const Site& site) {
  EmuTensorMap m;
  std::memcpy(&m, map, sizeof m);
  if (m.magic != kTensorMapMagic) fatal("cp.async.bulk.tensor with a tensor map not encoded "
                                        "for the emulator (host/tma.py)");
  if (int(m.rank) != rank) {
    fatal("cp.async.bulk.tensor." + std::to_string(rank) + "d with a rank-" +
          std::to_string(m.rank) + " tensor map");
  }
  const uint32_t span = tma_swizzle_span(m.swizzle);
  const uintptr_t align = span ? span * 8u : 128u;  // where the swizzle pattern repeats
  if (shared_address(dst) % align) {
    fatal("cp.async.bulk.tensor destination not " + std::to_string(align) + "-byte aligned");
  }
  uint32_t bytes = m.elem_bytes;
  for (int d = 0; d < rank; ++d) bytes *= m.box[d];
  mbarrier_state(bar, "cp.async.bulk.tensor");  // an initialised barrier
  (void)shared_pointer(shared_address(dst), bytes, "cp.async.bulk.tensor");
  on_async_proxy_access(dst, bytes, site, true);
  FMOE_SM90_GUARD;  // the async proxy writes: not a thread's store to the race detector
  std::memset(dst, 0xff, bytes);  // in flight: unreadable until the barrier releases it
  PendingTma t{static_cast<char*>(dst), m, {coord[0], rank > 1 ? coord[1] : 0,
                                           rank > 2 ? coord[2] : 0}, bar, bytes, site};
  pending_tma.push_back(t);
}

// ------------------------------------------------------------------ descriptors
/// Operand element types of wgmma (the storage bits the tensor core reads).
enum class GmmaType : int { BF16 = 0, F16 = 1, TF32 = 2 };

FMOE_EMU_RT inline int gmma_type_bytes(GmmaType t) { return t == GmmaType::TF32 ? 4 : 2; }

FMOE_EMU_RT inline float gmma_operand(GmmaType t, const char* p) {
  if (t == GmmaType::TF32) {
    uint32_t u;
    std::memcpy(&u, p, 4);
    return tf32_operand(u);
  }
  uint16_t h;
  std::memcpy(&h, p, 2);
  return t == GmmaType::BF16 ? bf16_bits_to_float(h) : half_bits_to_float(h);
}

/// Shared address of element (row, k) of a K-major operand described by a wgmma
/// matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address, leading and
/// stride byte offsets in 16-byte units, layout type in bits 62-63 (0 interleaved, 1
/// 128-byte, 2 64-byte, 3 32-byte swizzle). K-major canonical layouts, in 16-byte units
/// (a "chunk" holds 16 / bytes elements of one row):
///   interleaved:  row r, chunk j at (r % 8) + (r / 8) * SBO + j * LBO
///   W-byte swizzle (W = 32, 64, 128): (r % 8) * W / 16 + (r / 8) * SBO + j, then bits
///   [4, 4 + log2(W / 16)) of the byte address XORed with the bits 3 above them.
FMOE_EMU_RT inline uint32_t gmma_element_address(uint64_t desc, int row, int k, int bytes) {
  const uint32_t start = uint32_t(desc & 0x3fffu) << 4;
  const uint32_t lbo = uint32_t((desc >> 16) & 0x3fffu) << 4;
  const uint32_t sbo = uint32_t((desc >> 32) & 0x3fffu) << 4;
  const uint32_t base_offset = uint32_t((desc >> 49) & 0x7u);
  const int type = int((desc >> 62) & 0x3u);
  if (base_offset != 0) fatal("wgmma descriptor with a nonzero base offset (not emulated)");
  const int per_chunk = 16 / bytes;
  const int j = k / per_chunk, e = k % per_chunk;
  static const int kSwizzleBits[4] = {0, 3, 2, 1};  // by layout type
  const int b = kSwizzleBits[type];
  uint32_t addr;
  if (type == 0) {
    addr = start + uint32_t(row % 8) * 16u + uint32_t(row / 8) * sbo + uint32_t(j) * lbo;
  } else {
    addr = start + uint32_t(row % 8) * (16u << b) + uint32_t(row / 8) * sbo + uint32_t(j) * 16u;
    addr ^= ((addr >> 7) & ((1u << b) - 1u)) << 4;
  }
  return addr + uint32_t(e * bytes);
}

/// Accumulator element i of warpgroup thread t for an m64nN f32 accumulator (PTX ISA
/// "wgmma .m64nNk* D fragment"): row 16 * warp + lane / 4 + 8 * ((i / 2) % 2), column
/// 8 * (i / 4) + 2 * (lane % 4) + i % 2.
FMOE_EMU_RT inline void gmma_acc_coord(int t, int i, int& m, int& n) {
  const int warp = t / 32, lane = t % 32;
  m = 16 * warp + lane / 4 + 8 * ((i / 2) % 2);
  n = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
}

// ------------------------------------------------------------------ wgmma
struct WgmmaOp {
  uint64_t desc_a, desc_b;
  float* d;
  int n;
  GmmaType type;
  int group;
  std::vector<float> c;  ///< the accumulators at issue (the C input when scale_d) ...
  bool chained;          ///< ... unless an earlier op in flight writes them: its result
  bool scale_d;
  uint64_t fingerprint;  ///< of the operand bytes at issue
  Site site;
};

struct WgmmaThread {
  std::vector<WgmmaOp> ops;
  int group = 0;      ///< groups committed so far
  bool fenced = false;
  /// Results of retired ops whose accumulators a later op still in flight writes: the
  /// registers stay NaN, the chain goes on from here.
  std::vector<std::pair<float*, std::vector<float>>> carried;
};

/// Per-thread wgmma state, by thread index (reset at block start by the emulated kernel).
inline thread_local std::vector<WgmmaThread> wgmma_threads;

FMOE_EMU_RT inline WgmmaThread& wgmma_thread() {
  FMOE_SM90_GUARD;
  const unsigned tid = cur_fiber().tid;
  if (wgmma_threads.size() <= tid) wgmma_threads.resize(tid + 1);
  return wgmma_threads[tid];
}

FMOE_EMU_RT inline int gmma_k(GmmaType t) { return t == GmmaType::TF32 ? 8 : 16; }

/// The k elements of operand row `row` as floats, read 16-byte chunk by chunk (a chunk's
/// elements are contiguous in every layout); folds the raw bytes into `hash`. `issue`
/// (at issue, not at the retiring wait): the reads are checked as the async proxy's.
FMOE_EMU_RT inline void gmma_load_row(uint64_t desc, int row, GmmaType t, float* out,
                                      uint64_t& hash, const Site* issue) {
  const int bytes = gmma_type_bytes(t), kk = gmma_k(t), per_chunk = 16 / bytes;
  for (int j = 0; j < kk / per_chunk; ++j) {
    const uint32_t addr = gmma_element_address(desc, row, j * per_chunk, bytes);
    const char* p = shared_pointer(addr, 16, "wgmma.mma_async");
    if (issue != nullptr) on_async_proxy_access(p, 16, *issue, false);
    uint64_t w[2];
    std::memcpy(w, p, 16);
    hash = (hash ^ w[0]) * 1099511628211ull;
    hash = (hash ^ w[1]) * 1099511628211ull;
    for (int e = 0; e < per_chunk; ++e) out[j * per_chunk + e] = gmma_operand(t, p + e * bytes);
  }
}

/// The operand rows warpgroup thread t reads (its two A rows, its N / 4 B rows), as
/// floats [2 + n / 4][k], and their fingerprint: every row is some thread's, so the
/// threads' fingerprints together cover both operands.
FMOE_EMU_RT inline uint64_t gmma_thread_rows(uint64_t desc_a, uint64_t desc_b, int n, GmmaType t,
                                             int tid, float (*rows)[16],
                                             const Site* issue = nullptr) {
  const int warp = (tid % 128) / 32, lane = tid % 32;
  uint64_t h = 1469598103934665603ull;
  for (int r = 0; r < 2; ++r) {
    gmma_load_row(desc_a, 16 * warp + lane / 4 + 8 * r, t, rows[r], h, issue);
  }
  for (int j = 0; j < n / 8; ++j) {
    for (int c = 0; c < 2; ++c) {
      gmma_load_row(desc_b, 8 * j + 2 * (lane % 4) + c, t, rows[2 + 2 * j + c], h, issue);
    }
  }
  return h;
}

FMOE_EMU_RT inline void wgmma_fence() { wgmma_thread().fenced = true; }

/// fence.proxy.async.shared::cta: the thread's generic-proxy shared-memory writes so
/// far may be read by the async proxy after a barrier (memory.h checks that they were).
FMOE_EMU_RT inline void fence_proxy_async() { on_fence_proxy_async(); }

/// wgmma.mma_async.sync.aligned.m64nNk{16,8}.f32 with both operands K-major in shared
/// memory; d holds this thread's n / 2 accumulators.
FMOE_EMU_RT inline void wgmma_issue(float* d, int n, GmmaType type, uint64_t desc_a,
                                    uint64_t desc_b, bool scale_d, const Site& site) {
  if (n < 8 || n > 256 || n % 8) fatal("wgmma N must be a multiple of 8 in [8, 256]");
  if ((cur_fiber().tid / 128 + 1) * 128 > blockDim.x) {
    fatal("wgmma issued by a thread outside a whole warpgroup (threads 128 w .. 128 w + 127 "
          "must all be in the block)");
  }
  FMOE_SM90_GUARD;
  WgmmaThread& w = wgmma_thread();
  if (!w.fenced) {
    fatal("wgmma.mma_async at " + describe(site) + " without a wgmma.fence since the thread's "
          "last wait_group: the accumulators and operands it reads are unordered with the "
          "thread's earlier accesses");
  }
  // Ops on the same accumulators run in issue order, each on its predecessor's result.
  bool chained = false;
  for (const WgmmaOp& prev : w.ops) chained |= prev.d == d;
  float rows[2 + 256 / 4][16];
  const uint64_t print = gmma_thread_rows(desc_a, desc_b, n, type, int(cur_fiber().tid), rows,
                                          &site);
  WgmmaOp op{desc_a, desc_b, d, n, type, w.group,
             chained ? std::vector<float>() : std::vector<float>(d, d + n / 2), chained, scale_d,
             print, site};
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int i = 0; i < n / 2; ++i) d[i] = nan;  // not readable before the wait
  w.ops.push_back(std::move(op));
}

/// Run a retiring op from accumulators `in` (its C, or its predecessor's result);
/// returns its result.
FMOE_EMU_RT inline std::vector<float> wgmma_execute(const WgmmaOp& op, int t,
                                                    const std::vector<float>& in) {
  FMOE_SM90_GUARD;
  float rows[2 + 256 / 4][16];
  if (gmma_thread_rows(op.desc_a, op.desc_b, op.n, op.type, t, rows) != op.fingerprint) {
    fatal("shared memory read by the wgmma.mma_async issued at " + describe(op.site) +
          " was written before the wait_group that retires it");
  }
  // Accumulator i = 4 j + 2 r + c: row r of the thread's two, B row 2 j + c of its own.
  const int kk = gmma_k(op.type);
  std::vector<float> out(size_t(op.n / 2));
  for (int i = 0; i < op.n / 2; ++i) {
    const int j = i / 4, r = (i / 2) % 2, c = i % 2;
    float acc = !op.scale_d ? 0.0f : in[size_t(i)];
    const float* a = rows[r];
    const float* b = rows[2 + 2 * j + c];
    for (int k = 0; k < kk; ++k) acc = std::fma(a[k], b[k], acc);
    out[size_t(i)] = acc;
  }
  return out;
}

FMOE_EMU_RT inline void wgmma_commit() {
  FMOE_SM90_GUARD;
  WgmmaThread& w = wgmma_thread();
  ++w.group;
}

/// wgmma.wait_group N: retire every op but those of the newest N committed groups.
FMOE_EMU_RT inline void wgmma_wait(int keep) {
  if (!wgmma_thread().ops.empty()) {
    yield();  // the ops run while other threads go on: what they do meanwhile must not
    chaos();  // touch the operands (checked when the ops retire, below)
  }
  FMOE_SM90_GUARD;
  WgmmaThread& w = wgmma_thread();
  const int limit = w.group - keep;
  const int t = int(cur_fiber().tid);
  // Ops retire in issue order; groups only grow, so the ones kept are the newest.
  auto carried = [&](float* d) -> std::vector<float>* {
    for (auto& c : w.carried) {
      if (c.first == d) return &c.second;
    }
    return nullptr;
  };
  size_t done = 0;
  for (; done < w.ops.size() && w.ops[done].group < limit; ++done) {
    const WgmmaOp& op = w.ops[done];
    std::vector<float>* prev = op.chained ? carried(op.d) : nullptr;
    if (op.chained && prev == nullptr) fatal("wgmma emulator: a chained op lost its input");
    std::vector<float> out = wgmma_execute(op, t, op.chained ? *prev : op.c);
    if (prev != nullptr) {
      *prev = std::move(out);
    } else {
      w.carried.emplace_back(op.d, std::move(out));
    }
  }
  w.ops.erase(w.ops.begin(), w.ops.begin() + long(done));
  // Accumulators no op in flight writes any more land in their registers.
  for (size_t i = 0; i < w.carried.size();) {
    bool pending = false;
    for (const WgmmaOp& op : w.ops) pending |= op.d == w.carried[i].first;
    if (pending) {
      ++i;
      continue;
    }
    std::copy(w.carried[i].second.begin(), w.carried[i].second.end(), w.carried[i].first);
    w.carried.erase(w.carried.begin() + long(i));
  }
  w.fenced = false;
}

/// At a thread's exit: an op still in flight is a bug (its registers never land), as
/// is a TMA load nobody waited for when the block's last thread leaves.
FMOE_EMU_RT inline void wgmma_check_exit() {
  FMOE_SM90_GUARD;
  if (tls.block != nullptr && tls.block->live == 1 && !pending_tma.empty()) {
    fatal("the block ends with the cp.async.bulk.tensor of " +
          describe(pending_tma.front().site) + " never waited for (no wait on its barrier)");
  }
  if (wgmma_threads.size() <= cur_fiber().tid) return;
  const WgmmaThread& w = wgmma_threads[cur_fiber().tid];
  if (!w.ops.empty()) {
    fatal("thread " + std::to_string(cur_fiber().tid) + " exits with the wgmma.mma_async of " +
          describe(w.ops.front().site) + " in flight (no wait_group retired it)");
  }
}

// ------------------------------------------------------------------ elect, setmaxnreg
/// elect.sync with a full mask: lane 0 of the warp is elected.
FMOE_EMU_RT inline bool elect_one() { return lane_id() == 0; }

/// setmaxnreg: no registers to move here, but the count must be the same for every
/// thread of the warpgroup (checked per warpgroup, per call in program order).
inline thread_local std::map<std::pair<int, int>, std::pair<int, int>> setmaxnreg_calls;
inline thread_local std::vector<int> setmaxnreg_seq;

FMOE_EMU_RT inline void setmaxnreg(int regs, const Site& site) {
  if (regs < 24 || regs > 256 || regs % 8) {
    fatal("setmaxnreg count must be a multiple of 8 in [24, 256]");
  }
  const int tid = int(cur_fiber().tid), wg = tid / 128;
  FMOE_SM90_GUARD;
  if (int(setmaxnreg_seq.size()) <= tid) setmaxnreg_seq.resize(size_t(tid) + 1, 0);
  const int seq = setmaxnreg_seq[size_t(tid)]++;
  auto& entry = setmaxnreg_calls[{wg, seq}];
  if (entry.second == 0) {
    entry.first = regs;
  } else if (entry.first != regs) {
    fatal("setmaxnreg at " + describe(site) + ": warpgroup " + std::to_string(wg) +
          " asks for " + std::to_string(entry.first) + " and " + std::to_string(regs) +
          " registers (the count must be warpgroup-uniform)");
  }
  ++entry.second;
}

/// Forget the per-block state of the instructions above and check in-flight ops at
/// every thread's exit (call at block start, with the block's shared memory).
FMOE_EMU_RT inline void sm90_block_start(const void* smem, size_t smem_bytes) {
  set_shared_window(smem, smem_bytes);
  FMOE_SM90_GUARD;
  mbarriers.clear();
  pending_tma.clear();
  pending_cp_arrive.clear();
  wgmma_threads.clear();
  setmaxnreg_calls.clear();
  setmaxnreg_seq.clear();
  thread_exit_hook = &wgmma_check_exit;
}

// ------------------------------------------------------------------ cross-check
/// Elements where decoding CuTe's descriptor of a K-major operand tile disagrees with
/// CuTe's own layout of it: 64 x 64 tiles of T in each GMMA layout atom (interleaved,
/// 32-, 64-, 128-byte swizzle), one descriptor per k-step as a mainloop takes them.
template <class T, class Atom>
FMOE_EMU_RT inline int gmma_desc_mismatches(GmmaType type) {
  using namespace cute;
  constexpr int kK = 64, kStep = 256 / int(8 * sizeof(T));  // k per wgmma: 32 bytes
  alignas(1024) static char buf[64 * kK * sizeof(T)];
  const SharedWindow saved = shared_window;
  shared_window = SharedWindow{buf, sizeof buf};
  auto layout = tile_to_shape(Atom{}, Shape<_64, Int<kK>>{});
  Tensor t = make_tensor(make_smem_ptr(reinterpret_cast<T*>(buf)), layout);
  int bad = 0;
  for (int kb = 0; kb < kK / kStep; ++kb) {
    Tensor sub = local_tile(t, Shape<_64, Int<kStep>>{}, make_coord(0, kb));
    const uint64_t desc = uint64_t(GMMA::make_gmma_desc<GMMA::Major::K>(sub));
    for (int m = 0; m < 64; ++m) {
      for (int k = 0; k < kStep; ++k) {
        const uint32_t want = uint32_t(reinterpret_cast<const char*>(&sub(m, k)) - buf);
        bad += gmma_element_address(desc, m, k, gmma_type_bytes(type)) != want;
      }
    }
  }
  shared_window = saved;
  return bad;
}

/// Disagreements between the emulation above and CuTe's SM90 GMMA layouts (0 expected):
/// descriptors of every layout atom for 16- and 32-bit operands, and the m64nN
/// accumulator layout (CLayout_64xN) for N = 64 and 256.
FMOE_EMU_RT inline int gmma_layout_mismatches() {
  using namespace cute;
  using B16 = cutlass::bfloat16_t;
  using F32 = cutlass::tfloat32_t;
  int bad = gmma_desc_mismatches<B16, GMMA::Layout_K_INTER_Atom<B16>>(GmmaType::BF16) +
            gmma_desc_mismatches<B16, GMMA::Layout_K_SW32_Atom<B16>>(GmmaType::BF16) +
            gmma_desc_mismatches<B16, GMMA::Layout_K_SW64_Atom<B16>>(GmmaType::BF16) +
            gmma_desc_mismatches<B16, GMMA::Layout_K_SW128_Atom<B16>>(GmmaType::BF16) +
            gmma_desc_mismatches<F32, GMMA::Layout_K_SW128_Atom<F32>>(GmmaType::TF32) +
            gmma_desc_mismatches<F32, GMMA::Layout_K_INTER_Atom<F32>>(GmmaType::TF32);
  auto check_c = [&](auto layout, int n_cols) {
    for (int t = 0; t < 128; ++t) {
      for (int i = 0; i < n_cols / 2; ++i) {
        const int idx = layout(t, i);
        int m, n;
        gmma_acc_coord(t, i, m, n);
        bad += (idx % 64 != m) || (idx / 64 != n);
      }
    }
  };
  check_c(GMMA::CLayout_64xN<64>{}, 64);
  check_c(GMMA::CLayout_64xN<256>{}, 256);
  return bad;
}

}  // namespace fmoe_emu
