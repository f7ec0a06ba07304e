/**
 * @file memory.h
 * @brief The emulator's memory model: weak global memory, rule checks and race detection.
 *
 * Only in checked builds (FMOE_EMU_CHECKED=1: host/emulator.py compiles the kernel with
 * g++'s -fsanitize=thread instrumentation and no sanitizer run time). The compiler then
 * calls __tsan_readN / __tsan_writeN / __tsan_volatile_readN before every load and store
 * of the device code; this file defines those functions, so every plain, volatile and
 * shared-memory access of the unchanged CUDA source reaches the model. The runtime's
 * own functions are excluded (FMOE_EMU_RT), and cp.async, __ldcg, atomics, fences and
 * NVSHMEM reach it through their emulations.
 *
 * What the model does, per launch (Options: weak, races, preempt):
 *
 *  - store buffers (weak): a plain global store of a block is buffered: memory takes the
 *    value at once (the block itself reads its own stores), but every other block's L2
 *    reads (cp.async.cg, ld.global.cg, the data of NVSHMEM puts) see the old bytes until
 *    the store drains: at a device- or system-scope fence of the block, NVSHMEM fence or
 *    quiet, an atomic on that word, kernel end, or now and then at random (out of order).
 *    __threadfence_block, __syncthreads and the atomics themselves drain nothing.
 *  - rule 3 (weak): a cacheable load (ld.global.ca: a plain dereference) of a word another
 *    block wrote during the launch is reported: L1 is not coherent across blocks, so the
 *    line may be one the block fetched before the write. __ldg (the read-only path) of
 *    any word written during the launch is reported likewise.
 *  - happens-before (races): per block a clock, a data vector clock (what the block's
 *    reads may assume) and a causal frontier (what its strong reads observed). Strong
 *    writes (atomics, volatile stores, NVSHMEM signals) carry the frontier the block
 *    had at its last fence, strong reads join what the word carries (observations
 *    after the last fence are passed on only by the next fence: the acquire pattern); a
 *    strong read observes its word again after the load (the hooks run before it, and
 *    other blocks run in parallel: a write landing between the hook and the load must
 *    not look unordered), at the block's next model event or, for the emulated
 *    instructions, right after the load or the read-modify-write; a
 *    fence.sc (__threadfence, __threadfence_system) synchronizes with exactly those
 *    earlier fences that causally precede it (the PTX rule that fence.sc instances
 *    synchronize in Fence-SC order, with that order chosen as late as the observed
 *    values allow, so that accidental timing never hides a missing fence). A weak access
 *    of a global word that conflicts with another block's access not ordered before it
 *    is a data race. Scopes: a device-scope fence synchronizes with fences of its own PE
 *    only; __threadfence_block with nothing outside its block.
 *  - shared memory (races): per 4-byte word the last writer and up to two readers with
 *    their barrier interval; two threads of a block touching a word in one interval
 *    (no __syncthreads between, no __syncwarp within a warp), one of them writing and
 *    not both atomically, is a race, as compute-sanitizer's racecheck reports it.
 *  - proxies (races): a word's generic-proxy writer (a store, a landed cp.async) must
 *    issue fence.proxy.async before an async-proxy access of it is issued (a wgmma
 *    operand read, a TMA load writing it); a TMA landing is the async proxy's own write
 *    and needs no fence before the next.
 *  - preemption (preempt > 0): a thread may lose its turn at any shared or global access.
 *
 * Reports stop the launch like every emulator fault (fatal) and name both accesses:
 * their code sites as {{pc:OFFSET}} and shared addresses as {{tls:OFFSET}}, which
 * host/emulator.py turns into file:line and variable names.
 *
 * Intra-block global accesses are not checked (the block is the unit of the global
 * model), nor are strong reads (a bounded spin on a volatile flag is the intended
 * pattern) and reads of words nobody wrote during the launch.
 */
#pragma once

#include <dlfcn.h>
#include <link.h>

#include <deque>
#include <memory>
#include <unordered_map>

namespace fmoe_emu {

#if FMOE_EMU_CHECKED

// The model's own code must not call instrumented code (std:: templates are, and they
// are not inlined into FMOE_EMU_RT functions): hot paths use raw arrays and builtins,
// and the guard keeps the rest (std::vector, std::mutex, std::string in cold paths)
// from re-entering the model.
struct InModel {
  bool prev;
  FMOE_EMU_RT InModel() : prev(tls.in_model) { tls.in_model = true; }
  FMOE_EMU_RT ~InModel() { tls.in_model = prev; }
};
template <class T>
FMOE_EMU_RT inline T lo_of(T a, T b) { return a < b ? a : b; }
template <class T>
FMOE_EMU_RT inline T hi_of(T a, T b) { return a < b ? b : a; }

// ------------------------------------------------------------------ code sites
/// This library's load address (internal linkage: every emulator library has its own).
[[maybe_unused]] static uintptr_t module_base() {
  static const uintptr_t base = [] {
    Dl_info info{};
    dladdr(reinterpret_cast<void*>(&module_base), &info);
    return reinterpret_cast<uintptr_t>(info.dli_fbase);
  }();
  return base;
}
FMOE_EMU_RT inline uint32_t pc_id(uintptr_t pc) { return uint32_t(pc - module_base()); }
inline std::string pc_text(uint32_t id) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "{{pc:%x}}", id);
  return buf;
}
#define FMOE_EMU_PC() (reinterpret_cast<uintptr_t>(__builtin_return_address(0)))

// ------------------------------------------------------------------ registered buffers
/// Shadow of one 4-byte global word (this launch only).
struct GWord {
  int16_t w_blk = -1;   ///< block that last wrote it (-1: nobody this launch)
  int16_t r_blk = -1;   ///< last two weak readers not ordered with each other
  int16_t r2_blk = -1;
  int16_t p_blk = -1;   ///< block whose buffered store other blocks cannot see yet
  uint32_t w_clk = 0, r_clk = 0, r2_clk = 0;
  uint32_t w_pc = 0, r_pc = 0, r2_pc = 0;
  uint16_t w_tid = 0, r_tid = 0, r2_tid = 0;
  uint8_t w_strong = 0;  ///< the last write was an atomic or a signal
  uint8_t w_put = 0;     ///< the last write was a put landing
  uint8_t p_mask = 0;    ///< bytes of the buffered store
  uint8_t p_old[4] = {0, 0, 0, 0};  ///< what other blocks still read there
};
constexpr int kPageShift = 10;  // 1024 words (4 KiB of data) per shadow page
constexpr size_t kPageWords = size_t(1) << kPageShift;
struct GPage {
  GWord w[kPageWords];
};

/// A buffer the host named for this launch (everything else is not checked).
struct Buffer {
  uintptr_t lo = 0, hi = 0;
  std::string name;
  int pe = 0;
  bool symmetric = false;  ///< NVSHMEM heap: remote puts land here, reads are tracked
  size_t npages = 0;
  GPage** pages = nullptr;  ///< shadow pages, made on first use
  int* pending = nullptr;   ///< buffered stores per page

  Buffer() = default;
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  ~Buffer() {
    clear();
    delete[] pages;
    delete[] pending;
  }
  FMOE_EMU_RT size_t index(uintptr_t a) const { return (a - (lo & ~uintptr_t(3))) >> 2; }
  FMOE_EMU_RT int pending_in(size_t i) const {
    return __atomic_load_n(&pending[i >> kPageShift], __ATOMIC_RELAXED);
  }
  FMOE_EMU_RT void add_pending(size_t i, int d) {
    __atomic_fetch_add(&pending[i >> kPageShift], d, __ATOMIC_RELAXED);
  }
  FMOE_EMU_RT GWord* word(size_t i, bool create) {
    GPage** slot = &pages[i >> kPageShift];
    GPage* p = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (p == nullptr && create) {
      auto* fresh = new GPage();
      if (__atomic_compare_exchange_n(slot, &p, fresh, false, __ATOMIC_ACQ_REL,
                                      __ATOMIC_ACQUIRE)) {
        p = fresh;
      } else {
        delete fresh;  // another block made it first
      }
    }
    return p == nullptr ? nullptr : &p->w[i & (kPageWords - 1)];
  }
  FMOE_EMU_RT void clear() {
    for (size_t i = 0; i < npages; ++i) {
      delete pages[i];
      pages[i] = nullptr;
      pending[i] = 0;
    }
  }
};

struct Registry {
  std::vector<std::unique_ptr<Buffer>> bufs;  // sorted by lo
  Buffer** sorted = nullptr;                   // the same, as a raw array (hot path)
  size_t n = 0;
  uintptr_t lo = 0, span = 0;
};
inline Registry& registry() {
  static Registry r;
  return r;
}

/// Replace the registered buffers (between launches).
inline void register_buffers(int n, const char* const* names, const uint64_t* lo,
                             const uint64_t* bytes, const int* pes, const int* flags) {
  Registry& r = registry();
  for (auto& b : r.bufs) b->clear();
  r.bufs.clear();
  for (int i = 0; i < n; ++i) {
    if (bytes[i] == 0) continue;
    auto b = std::make_unique<Buffer>();
    b->lo = uintptr_t(lo[i]);
    b->hi = b->lo + uintptr_t(bytes[i]);
    b->name = names[i];
    b->pe = pes[i];
    b->symmetric = (flags[i] & 1) != 0;
    const size_t words = b->index(b->hi - 1) + 1;
    b->npages = (words + kPageWords - 1) >> kPageShift;
    b->pages = new GPage*[b->npages]();
    b->pending = new int[b->npages]();
    r.bufs.push_back(std::move(b));
  }
  std::sort(r.bufs.begin(), r.bufs.end(),
            [](const std::unique_ptr<Buffer>& a, const std::unique_ptr<Buffer>& b) {
              return a->lo < b->lo;
            });
  delete[] r.sorted;
  r.n = r.bufs.size();
  r.sorted = new Buffer*[r.n + 1];
  for (size_t i = 0; i < r.n; ++i) r.sorted[i] = r.bufs[i].get();
  r.lo = r.bufs.empty() ? 0 : r.bufs.front()->lo;
  uintptr_t hi = 0;
  for (auto& b : r.bufs) hi = std::max(hi, b->hi);
  r.span = r.bufs.empty() ? 0 : hi - r.lo;
}

FMOE_EMU_RT inline Buffer* find_buffer(uintptr_t a) {
  Registry& r = registry();
  if (a - r.lo >= r.span) return nullptr;
  Buffer* const* bufs = r.sorted;
  size_t lo = 0, hi = r.n;
  while (hi - lo > 1) {  // largest lo with bufs[lo]->lo <= a
    const size_t mid = (lo + hi) / 2;
    if (bufs[mid]->lo <= a) lo = mid; else hi = mid;
  }
  Buffer* b = bufs[lo];
  return a >= b->lo && a < b->hi ? b : nullptr;
}

inline std::string where(const Buffer& b, uintptr_t a) {
  char buf[48];
  std::snprintf(buf, sizeof buf, "+0x%zx", size_t(a - b.lo));
  return "'" + b.name + "'" + buf + " (PE " + std::to_string(b.pe) + ")";
}

/// Striped spin locks over word addresses: shadow words are updated under them.
inline unsigned char g_word_locks[4096];
struct WordLock {
  unsigned char* f;
  FMOE_EMU_RT explicit WordLock(uintptr_t word)
      : f(&g_word_locks[((word >> 2) * 0x9e3779b97f4a7c15ull) >> 52]) {
    while (__atomic_test_and_set(f, __ATOMIC_ACQUIRE)) {
    }
  }
  FMOE_EMU_RT ~WordLock() { __atomic_clear(f, __ATOMIC_RELEASE); }
};

// ------------------------------------------------------------------ per-block state
/// A vector clock over the blocks of the launch (a raw array: used on hot paths).
struct Clock {
  uint32_t* v = nullptr;
  size_t n = 0;
  Clock() = default;
  FMOE_EMU_RT explicit Clock(size_t size) : v(new uint32_t[size]()), n(size) {}
  FMOE_EMU_RT Clock(const Clock& o) : v(new uint32_t[o.n]), n(o.n) {
    std::memcpy(v, o.v, n * sizeof(uint32_t));
  }
  FMOE_EMU_RT Clock(Clock&& o) noexcept : v(o.v), n(o.n) {
    o.v = nullptr;
    o.n = 0;
  }
  Clock& operator=(const Clock&) = delete;
  FMOE_EMU_RT Clock& operator=(Clock&& o) noexcept {
    std::swap(v, o.v);
    std::swap(n, o.n);
    return *this;
  }
  FMOE_EMU_RT ~Clock() { delete[] v; }
  FMOE_EMU_RT uint32_t& operator[](size_t i) { return v[i]; }
  FMOE_EMU_RT uint32_t operator[](size_t i) const { return v[i]; }
};
FMOE_EMU_RT inline void join(Clock& into, const Clock& from) {
  for (size_t i = 0; i < into.n; ++i) into.v[i] = hi_of(into.v[i], from.v[i]);
}

struct FenceRecord {
  uint32_t clk;
  Clock vcd;  ///< the fencing block's data clock, its own entry = clk
};

/// A non-blocking put that has not landed (only putmem_nbi: puts with a signal land at
/// once with their signal).
struct PendingPut {
  char* dst;
  std::vector<char> data;
  int pe;
  uint32_t pc;
  bool late;  ///< a signal to the same PE overtook it
};

struct SAccess {
  uint32_t clk = 0;  ///< the accessing thread's own clock at the access (0: none)
  uint32_t pc = 0;
  uint16_t tid = 0;
  uint8_t atomic = 0;
};
struct SWord {
  SAccess w, r1, r2;
  /// 1 + the writer's fence.proxy.async count at its generic-proxy write (0: the word's
  /// last write was the async proxy's, or none): an async-proxy read needs the writer
  /// to have fenced since.
  uint32_t wpf = 0;
};

struct MemBlock {
  int id = 0, pe = 0;
  unsigned x = 0;
  uint32_t clk = 1;
  Clock vcd, cf;
  Clock rel;  // what the block's strong writes release: its frontier at its last fence
  std::mutex mu;                     // guards the fence lists (read by other blocks)
  std::vector<FenceRecord> fences;   // every fence.sc, ascending clk
  std::vector<FenceRecord> sys_fences;
  std::vector<std::pair<Buffer*, size_t>> pending;  // words with a buffered store
  std::deque<PendingPut> puts;
  uintptr_t tls_lo = 0;
  size_t tls_size = 0;
  uintptr_t rt_lo = 0, rt_hi = 0;    // the runtime's own thread-locals
  SWord* smem = nullptr;             // shadow of shared memory, per 4-byte word
  size_t smem_words = 0;
  std::vector<uint32_t> proxy_fences;  // fence.proxy.async count per thread
  // Shared-memory happens-before: row t of svc is thread t's vector clock (entry t its
  // own clock); fence_vc row t its clock at its last fence.proxy.async; bar_vc and
  // named_vc collect what the arrivals at __syncthreads and named barriers release.
  int nthr = 0;
  uint32_t* svc = nullptr;
  uint32_t* fence_vc = nullptr;
  uint32_t* bar_vc = nullptr;
  uint32_t* named_vc = nullptr;
  uint32_t* scratch = nullptr;
  int as_tid = -1;      // >= 0: accesses now are this thread's (an async landing) ...
  uint32_t as_clk = 0;  // ... at this clock of its own
  int hold = 0;         // > 0: no preemption (the accesses are not the running thread's)
  ~MemBlock() {
    delete[] smem;
    delete[] svc;
    delete[] fence_vc;
    delete[] bar_vc;
    delete[] named_vc;
    delete[] scratch;
  }
  uint64_t rng = 0;
  int countdown = 0;                 // accesses until the next preemption
  bool dirty = false;                // plain global stores since the last fence
  bool exposed = false;              // ... and a strong write after them (a publication)
  uintptr_t unsettled = 0;           // a strong read's word, observed again after the load
};

struct SyncShard {
  std::mutex mu;
  std::unordered_map<uintptr_t, Clock> map;
};

struct MemLaunch {
  bool on = false;
  int per_grid = 0;
  std::vector<std::unique_ptr<MemBlock>> blocks;
  SyncShard sync[64];
};
inline MemLaunch& mem() {
  static MemLaunch m;
  return m;
}

FMOE_EMU_RT inline uint64_t next_random(MemBlock& m) {  // splitmix64: cheap, seeded
  uint64_t z = (m.rng += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

inline std::string block_name(int id) {
  const MemLaunch& L = mem();
  const int pe = id / std::max(1, L.per_grid);
  return "block " + std::to_string(L.blocks[size_t(id)]->x) + " of PE " + std::to_string(pe);
}

FMOE_EMU_RT inline MemBlock* cur_mem() {
  Block* b = tls.block;
  return b != nullptr && b->cur >= 0 ? b->mem : nullptr;
}

[[noreturn]] inline void model_fault(const std::string& what) { fatal(what); }

// ------------------------------------------------------------------ launch begin / end
inline void mem_begin_launch(int grids, int per_grid) {
  MemLaunch& L = mem();
  const Options& o = options();
  L.on = o.weak || o.races || o.preempt > 0;
  L.per_grid = per_grid;
  L.blocks.clear();
  for (auto& s : L.sync) s.map.clear();
  for (auto& b : registry().bufs) b->clear();
  if (!L.on) return;
  const int n = grids * per_grid;
  for (int i = 0; i < n; ++i) {
    auto m = std::make_unique<MemBlock>();
    m->id = i;
    m->pe = i / per_grid;
    m->vcd = Clock(size_t(n));
    m->cf = Clock(size_t(n));
    m->rel = Clock(size_t(n));
    m->vcd[size_t(i)] = m->cf[size_t(i)] = m->rel[size_t(i)] = m->clk;
    m->rng = o.seed * 0x2545f4914f6cdd1dull + uint64_t(i) * 0x9e3779b97f4a7c15ull + 1;
    m->countdown = 1;
    L.blocks.push_back(std::move(m));
  }
}

inline void mem_end_launch() {
  MemLaunch& L = mem();
  L.on = false;
  L.blocks.clear();
  for (auto& s : L.sync) s.map.clear();
  for (auto& b : registry().bufs) b->clear();
}

struct TlsSearch {
  uintptr_t base;
  uintptr_t lo;
  size_t size;
};
inline int find_tls(struct dl_phdr_info* info, size_t, void* arg) {
  auto* s = static_cast<TlsSearch*>(arg);
  if (uintptr_t(info->dlpi_addr) != s->base) return 0;
  for (int i = 0; i < info->dlpi_phnum; ++i) {
    if (info->dlpi_phdr[i].p_type == PT_TLS && info->dlpi_tls_data != nullptr) {
      s->lo = reinterpret_cast<uintptr_t>(info->dlpi_tls_data);
      s->size = size_t(info->dlpi_phdr[i].p_memsz);
    }
  }
  return 1;
}

/// On the block's own OS thread, before its threads start: find its shared memory (this
/// library's thread-local block) and attach the block's model state.
inline void mem_block_start(Block& b, int id) {
  MemLaunch& L = mem();
  if (!L.on) return;
  MemBlock& m = *L.blocks[size_t(id)];
  m.x = b.idx.x + b.idx.y * tls.gridDim.x;
  TlsSearch s{module_base(), 0, 0};
  dl_iterate_phdr(&find_tls, &s);
  m.tls_lo = s.lo;
  m.tls_size = s.size;
  m.rt_lo = reinterpret_cast<uintptr_t>(&tls);
  m.rt_hi = m.rt_lo + sizeof(tls);
  if (options().races) {
    m.smem_words = s.size / 4 + 1;
    m.smem = new SWord[m.smem_words]();
    const size_t n = size_t(b.nthreads);
    m.nthr = int(n);
    m.svc = new uint32_t[n * n]();
    m.fence_vc = new uint32_t[n * n]();
    m.bar_vc = new uint32_t[n]();
    m.named_vc = new uint32_t[kNamedBarriers * n]();
    m.scratch = new uint32_t[n]();
    for (size_t t = 0; t < n; ++t) m.svc[t * n + t] = 1;
  }
  tls.in_model = false;
  b.mem = &m;
}

/// After the block's last thread: its puts land and its stores drain (kernel end).
inline void mem_block_end(Block& b) {
  MemBlock* m = b.mem;
  b.mem = nullptr;
  if (m == nullptr) return;
  for (PendingPut& p : m->puts) std::memcpy(p.dst, p.data.data(), p.data.size());
  m->puts.clear();
}

// ------------------------------------------------------------------ causality
FMOE_EMU_RT inline SyncShard& shard(uintptr_t word) {
  return mem().sync[((word >> 2) * 0x9e3779b97f4a7c15ull) >> 58];
}

/// A strong read of `word`: the block's frontier takes what the word's writers carried.
FMOE_EMU_RT inline void observe(MemBlock& m, uintptr_t word) {
  SyncShard& s = shard(word);
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.map.find(word);
  if (it != s.map.end()) join(m.cf, it->second);
}

/// After a strong read of `word` completed: observe it again, so the frontier holds
/// every writer whose value the read could have returned (the writers publish before
/// they write; the hook that ran before the read may have missed the latest one).
FMOE_EMU_RT inline void settle(MemBlock& m) {
  if (m.unsettled == 0) return;
  const uintptr_t word = m.unsettled;
  m.unsettled = 0;
  observe(m, word);
}

/// A strong write of `word`: it carries what the block released at its last fence and
/// the block's own clock (and everything the word carried already: an RMW chain on one
/// word keeps it, as PTX's observation order does). What the block observed since its
/// last fence is not carried: passing that on takes a fence after the observation
/// (PTX: a strong read followed by a fence is the acquire pattern), so a block that
/// publishes work because its counter atomic completed must fence again first.
FMOE_EMU_RT inline void publish(MemBlock& m, uintptr_t word) {
  SyncShard& s = shard(word);
  std::lock_guard<std::mutex> lock(s.mu);
  auto it = s.map.find(word);
  if (it == s.map.end()) it = s.map.emplace(word, Clock(m.rel)).first;
  else join(it->second, m.rel);
  Clock& c = it->second;
  c[size_t(m.id)] = hi_of(c[size_t(m.id)], m.cf[size_t(m.id)]);
}

/// The latest fence of block `a` before its clock interval `c` (system scope only if
/// asked): what an observation of a strong write `a` made in interval `c` can acquire.
/// The fence that ends interval `c` (record clk == c) came after that write in `a`'s
/// program order, so it is not one: acquiring it too would cover `a`'s unfenced stores
/// whenever `a` happened to fence again before the observer looked.
FMOE_EMU_RT inline const Clock* fence_at(MemBlock& a, uint32_t c, bool sys_only) {
  const std::vector<FenceRecord>& list = sys_only ? a.sys_fences : a.fences;
  size_t lo = 0, hi = list.size();
  while (lo < hi) {  // first record with clk >= c
    const size_t mid = (lo + hi) / 2;
    if (list[mid].clk < c) lo = mid + 1; else hi = mid;
  }
  return lo == 0 ? nullptr : &list[lo - 1].vcd;
}

/// Record a release point of block m (a fence.sc, or the implicit release of a put's data
/// before its signal) and start a new clock interval.
FMOE_EMU_RT inline void record_fence(MemBlock& m, bool sys) {
  std::lock_guard<std::mutex> lock(m.mu);
  m.vcd[size_t(m.id)] = m.clk;
  m.fences.push_back(FenceRecord{m.clk, Clock(m.vcd)});
  if (sys) m.sys_fences.push_back(FenceRecord{m.clk, Clock(m.vcd)});
  ++m.clk;
  m.vcd[size_t(m.id)] = m.clk;
  m.cf[size_t(m.id)] = m.clk;
}

/// fence.sc at device (sys = false) or system scope: acquire what every causally earlier
/// fence released, then release.
FMOE_EMU_RT inline void hb_fence(MemBlock& m, bool sys) {
  MemLaunch& L = mem();
  for (size_t a = 0; a < m.cf.n; ++a) {
    if (int(a) == m.id || m.cf[a] <= m.vcd[a]) continue;
    MemBlock& other = *L.blocks[a];
    const bool remote = other.pe != m.pe;
    if (remote && !sys) continue;  // a device-scope fence does not reach another GPU
    std::lock_guard<std::mutex> lock(other.mu);
    const Clock* v = fence_at(other, m.cf[a], remote);
    if (v != nullptr) join(m.vcd, *v);
  }
  join(m.cf, m.vcd);
  record_fence(m, sys);
  std::memcpy(m.rel.v, m.cf.v, m.cf.n * sizeof(uint32_t));
}

// ------------------------------------------------------------------ store buffers
FMOE_EMU_RT inline void drop_pending(Buffer& buf, size_t i, GWord& g) {
  g.p_blk = -1;
  g.p_mask = 0;
  buf.add_pending(i, -1);
}

/// Make the block's buffered stores visible: all of them, or (partial) a random half.
FMOE_EMU_RT inline void drain(MemBlock& m, bool partial = false) {
  size_t kept = 0;
  for (size_t k = 0; k < m.pending.size(); ++k) {
    auto [buf, i] = m.pending[k];
    if (partial && (next_random(m) & 1)) {
      m.pending[kept++] = m.pending[k];
      continue;
    }
    const uintptr_t word = (buf->lo & ~uintptr_t(3)) + (i << 2);
    WordLock lock(word);
    GWord* g = buf->word(i, false);
    if (g != nullptr && g->p_blk == m.id) drop_pending(*buf, i, *g);
  }
  m.pending.resize(kept);
}

/// Buffer a plain store of bytes [a, a + n) of one word, before it happens.
FMOE_EMU_RT inline void buffer_store(MemBlock& m, Buffer& buf, size_t i, GWord& g, uintptr_t word,
                                     uint8_t mask) {
  if (g.p_blk >= 0 && g.p_blk != m.id) drop_pending(buf, i, g);  // overwritten: gone
  const uint8_t fresh = uint8_t(mask & ~(g.p_blk == m.id ? g.p_mask : 0));
  const auto* now = reinterpret_cast<const uint8_t*>(word);
  for (int k = 0; k < 4; ++k) {
    if (fresh & (1u << k)) g.p_old[k] = now[k];
  }
  if (g.p_blk != m.id) {
    g.p_blk = int16_t(m.id);
    g.p_mask = 0;
    buf.add_pending(i, 1);
    m.pending.emplace_back(&buf, i);
  }
  g.p_mask |= mask;
}

/// What another block reads at [src, src + n): memory, with the bytes of other blocks'
/// buffered stores as they were before those stores.
FMOE_EMU_RT inline void copy_visible(MemBlock* m, void* dst, const void* src, size_t n) {
  std::memcpy(dst, src, n);
  if (m == nullptr || !options().weak || n == 0) return;
  const auto a = reinterpret_cast<uintptr_t>(src);
  Buffer* buf = find_buffer(a);
  if (buf == nullptr) return;
  const uintptr_t end = lo_of(a + n, buf->hi);
  for (uintptr_t word = a & ~uintptr_t(3); word < end; word += 4) {
    const size_t i = buf->index(word);
    if (buf->pending_in(i) == 0) {
      // Nothing buffered in this shadow page: skip to the next one.
      word = (buf->lo & ~uintptr_t(3)) + ((((i >> kPageShift) + 1) << kPageShift) << 2) - 4;
      continue;
    }
    WordLock lock(word);
    GWord* g = buf->word(i, false);
    if (g == nullptr || g->p_blk < 0 || g->p_blk == m->id) continue;
    for (int k = 0; k < 4; ++k) {
      const uintptr_t byte = word + uintptr_t(k);
      if ((g->p_mask & (1u << k)) && byte >= a && byte < a + n) {
        static_cast<uint8_t*>(dst)[byte - a] = g->p_old[k];
      }
    }
  }
}

// ------------------------------------------------------------------ race reports
inline std::string thread_name(int blk, unsigned tid) {
  return block_name(blk) + " thread " + std::to_string(tid);
}

inline std::string global_race(const char* kind, const Buffer& buf, uintptr_t a,
                               const std::string& now, const std::string& before,
                               const char* advice) {
  return std::string("data race on global memory (") + kind + ") at " + where(buf, a) + ": " +
         now + "; " + before + "; " + advice;
}

constexpr const char* kPutAdvice =
    "a put is ordered before a later signal to the same PE only by nvshmem_fence or "
    "nvshmem_quiet between them (or by being a put with that signal)";
constexpr const char* kOrderAdvice =
    "no release/acquire chain orders them (design rules 1-2: after __syncthreads, one "
    "thread's __threadfence() then the atomic or signal; the observing thread's "
    "__threadfence() before the block reads)";

enum class Access : uint8_t { Read, L2Read, NcRead, Write, StrongRead, StrongWrite, Put };

/// A weak access by block m's current thread of one word of a registered buffer.
/// Returns the report of a violation ("" if none); the caller faults after the word's
/// lock is released (a fault never returns, and other blocks would wait on the lock).
FMOE_EMU_RT inline std::string global_word(MemBlock& m, Buffer& buf, uintptr_t a, uintptr_t word,
                                           uint8_t mask, Access kind, uint32_t pc,
                                           unsigned tid) {
  Options o = options();
  if (cur_fiber().benign > 0) o.races = o.weak = false;  // an annotated, intended race
  const size_t i = buf.index(word);
  const bool reading = kind == Access::Read || kind == Access::L2Read || kind == Access::NcRead;
  WordLock lock(word);
  GWord* g = buf.word(i, !reading || buf.symmetric);
  if (g == nullptr) return {};  // read, and nobody wrote the word this launch
  const auto hb = [&](int blk, uint32_t clk) {
    return blk < 0 || blk == m.id || clk <= m.vcd[size_t(blk)];
  };
  const auto me = [&] { return thread_name(m.id, tid); };  // only for reports
  if (reading) {
    if (o.races && !hb(g->w_blk, g->w_clk)) {
      return global_race("read-after-write", buf, a, me() + " reads it at " + pc_text(pc),
                  thread_name(g->w_blk, g->w_tid) + (g->w_strong ? " updated it atomically" :
                  g->w_put ? " landed a put there" : " wrote it") + " at " + pc_text(g->w_pc),
                  g->w_put ? kPutAdvice : kOrderAdvice);
    }
    if (o.weak && g->w_blk >= 0 && g->w_blk != m.id && kind != Access::L2Read) {
      return std::string(kind == Access::NcRead ? "__ldg (read-only path)" :
                  "cacheable load (ld.global.ca)") + " at " + pc_text(pc) + " by " + me() +
                  " of " + where(buf, a) + ", which " + thread_name(g->w_blk, g->w_tid) +
                  " wrote during this launch at " + pc_text(g->w_pc) +
                  ": L1 is not coherent across blocks, so the load may return a stale line; "
                  "read data produced during the launch through L2 (load_cg / __ldcg / "
                  "cp.async.cg, design rule 3)";
    }
    if (kind == Access::NcRead && o.weak && g->w_blk == m.id) {
      return "__ldg (read-only path) at " + pc_text(pc) + " by " + me() + " of " +
             where(buf, a) + ", which this block wrote during the launch at " +
             pc_text(g->w_pc) + ": the read-only cache is not coherent with stores";
    }
    if (g->w_blk == m.id) return {};  // reads of its own writes never race
    if (g->r_blk < 0 || g->r_blk == m.id || hb(g->r_blk, g->r_clk)) {
      g->r_blk = int16_t(m.id);
      g->r_clk = m.clk;
      g->r_pc = pc;
      g->r_tid = uint16_t(tid);
    } else {
      g->r2_blk = int16_t(m.id);
      g->r2_clk = m.clk;
      g->r2_pc = pc;
      g->r2_tid = uint16_t(tid);
    }
    return {};
  }
  const bool strong = kind == Access::StrongWrite;
  const char* advice = kind == Access::Put || g->w_put ? kPutAdvice : kOrderAdvice;
  if (o.races) {
    if (!hb(g->w_blk, g->w_clk) && !(strong && g->w_strong)) {
      return global_race("write-after-write", buf, a,
                  me() + (strong ? " updates it atomically at " : " writes it at ") + pc_text(pc),
                  thread_name(g->w_blk, g->w_tid) + (g->w_strong ? " updated it atomically" :
                  " wrote it") + " at " + pc_text(g->w_pc), advice);
    }
    for (int r = 0; r < 2; ++r) {
      const int blk = r ? g->r2_blk : g->r_blk;
      if (!hb(blk, r ? g->r2_clk : g->r_clk)) {
        return global_race("write-after-read", buf, a,
                    me() + (kind == Access::Put ? " lands a put" : strong ? " updates it" :
                    " writes it") + " at " + pc_text(pc),
                    thread_name(blk, r ? g->r2_tid : g->r_tid) + " read it at " +
                    pc_text(r ? g->r2_pc : g->r_pc), advice);
      }
    }
  }
  if (o.weak) {
    if (kind == Access::Write) {
      buffer_store(m, buf, i, *g, word, mask);
    } else if (g->p_blk >= 0) {
      drop_pending(buf, i, *g);  // atomics and landing puts act on L2: the store drained first
    }
  }
  g->w_blk = int16_t(m.id);
  g->w_clk = m.clk;
  g->w_pc = pc;
  g->w_tid = uint16_t(tid);
  g->w_strong = strong;
  g->w_put = kind == Access::Put;
  g->r_blk = g->r2_blk = -1;
  return {};
}

/// A strong read (volatile, an atomic's read, a signal fetch) of a word another block
/// wrote with a weak store that nothing ordered before it: a data race too (a flag set
/// by a plain store). Intended ones are in FMOE_BENIGN_RACE scopes.
FMOE_EMU_RT inline std::string strong_read(MemBlock& m, Buffer& buf, uintptr_t a, uint32_t pc,
                                           unsigned tid) {
  const uintptr_t word = a & ~uintptr_t(3);
  WordLock lock(word);
  const GWord* g = buf.word(buf.index(word), false);
  if (g == nullptr || g->w_blk < 0 || g->w_blk == m.id || g->w_strong ||
      g->w_clk <= m.vcd[size_t(g->w_blk)]) {
    return {};
  }
  return global_race("read-after-write", buf, a,
                     thread_name(m.id, tid) + " reads it with a strong (volatile or atomic) "
                     "load at " + pc_text(pc),
                     thread_name(g->w_blk, g->w_tid) + " wrote it with a plain store at " +
                     pc_text(g->w_pc), kOrderAdvice);
}

FMOE_EMU_RT inline void global_access(MemBlock& m, Buffer& buf, uintptr_t a, size_t n,
                                      Access kind, uint32_t pc) {
  const Fiber& f = cur_fiber();
  const unsigned tid = f.tid;
  if (kind == Access::StrongRead) {
    if (options().races && f.benign == 0) {
      std::string err = strong_read(m, buf, a, pc, tid);
      if (!err.empty()) model_fault(err);
    }
    observe(m, a & ~uintptr_t(3));
    m.unsettled = a & ~uintptr_t(3);  // and again once the load happened
    return;
  }
  const uintptr_t end = lo_of(a + n, buf.hi);
  for (uintptr_t word = a & ~uintptr_t(3); word < end; word += 4) {
    uint8_t mask = 0;
    for (int k = 0; k < 4; ++k) {
      const uintptr_t byte = word + uintptr_t(k);
      if (byte >= a && byte < end) mask |= uint8_t(1u << k);
    }
    std::string err = global_word(m, buf, hi_of(a, word), word, mask, kind, pc, tid);
    if (!err.empty()) model_fault(err);
  }
  if (kind == Access::StrongWrite) {
    publish(m, a & ~uintptr_t(3));
    m.exposed |= m.dirty;
  }
  if (kind == Access::Write && options().weak) {
    m.dirty = true;
    if ((next_random(m) & 1023) == 0) drain(m, true);
  }
}

// ------------------------------------------------------------------ shared memory
[[noreturn]] inline void smem_race(const char* kind, const MemBlock& m, uintptr_t a,
                                   const SAccess& now, const SAccess& before, bool now_writes,
                                   bool before_writes) {
  char off[40];
  std::snprintf(off, sizeof off, "{{tls:%zx}}", size_t(a - m.tls_lo));
  auto verb = [](bool w, bool atomic) {
    return atomic ? " updates it atomically" : w ? " writes it" : " reads it";
  };
  model_fault(std::string("shared-memory race (") + kind + ") on " + off + " in " +
              block_name(m.id) + ": thread " + std::to_string(now.tid) +
              verb(now_writes, now.atomic) + " at " + pc_text(now.pc) + ", thread " +
              std::to_string(before.tid) + verb(before_writes, before.atomic) + " at " +
              pc_text(before.pc) + ", not ordered with it (no __syncthreads, named barrier" +
              (now.tid / 32 == before.tid / 32 ? ", __syncwarp" : "") +
              " or mbarrier phase between them)");
}

FMOE_EMU_RT inline uint32_t* svc_row(MemBlock& m, unsigned t) {
  return m.svc + size_t(t) * size_t(m.nthr);
}

/// Whether `prev` (another thread's access) is not ordered before the current thread's
/// access `cur`: the current thread has not synchronised with prev's thread since.
FMOE_EMU_RT inline bool conflict(MemBlock& m, const SAccess& prev, const SAccess& cur) {
  return prev.clk != 0 && prev.tid != cur.tid && svc_row(m, cur.tid)[prev.tid] < prev.clk &&
         !(prev.atomic && cur.atomic);
}

/// How many fence.proxy.async thread `tid` of the block has issued.
FMOE_EMU_RT inline uint32_t proxy_count(const MemBlock& m, unsigned tid) {
  return tid < m.proxy_fences.size() ? m.proxy_fences[tid] : 0u;
}

/// An access by the current thread to shared memory [a, a + n) (n bytes, any alignment).
FMOE_EMU_RT inline void smem_access(MemBlock& m, uintptr_t a, size_t n, bool write, bool atomic,
                                    uint32_t pc) {
  if (m.smem == nullptr) return;
  Block& b = *tls.block;
  const Fiber& f = b.fibers[size_t(b.cur)];
  SAccess cur;
  const unsigned tid = m.as_tid >= 0 ? unsigned(m.as_tid) : f.tid;
  cur.clk = m.as_tid >= 0 ? m.as_clk : svc_row(m, tid)[tid];
  cur.pc = pc;
  cur.tid = uint16_t(tid);
  cur.atomic = atomic;
  const size_t first = (a - m.tls_lo) / 4, last = (a + n - 1 - m.tls_lo) / 4;
  for (size_t i = first; i <= last && i < m.smem_words; ++i) {
    SWord& s = m.smem[i];
    const uintptr_t wa = m.tls_lo + i * 4;
    if (write || atomic) {
      if (conflict(m, s.w, cur)) smem_race("write-after-write", m, wa, cur, s.w, true, true);
      if (conflict(m, s.r1, cur)) smem_race("write-after-read", m, wa, cur, s.r1, true, false);
      if (conflict(m, s.r2, cur)) smem_race("write-after-read", m, wa, cur, s.r2, true, false);
      s.w = cur;
      s.r1 = s.r2 = SAccess{};
      s.wpf = 1 + proxy_count(m, tid);
    } else {
      if (conflict(m, s.w, cur)) smem_race("read-after-write", m, wa, cur, s.w, false, true);
      // Two readers are kept: a later write must be ordered after both.
      if (conflict(m, s.r1, cur)) {
        s.r2 = cur;
      } else {
        s.r1 = cur;
      }
    }
  }
}

// ------------------------------------------------------------------ shared-memory order
// Vector clocks per thread: a barrier's arrival releases what the thread has seen (its
// own clock moves on), its completion lets the waiting threads acquire all of it; an
// mbarrier's arrival releases into its phase, a try_wait that sees the phase complete
// acquires the phase. Accesses carry the own clock of their thread: one is ordered
// before another thread's access when that thread's clock of it has caught up.
FMOE_EMU_RT inline bool hb_on(const MemBlock* m) { return m != nullptr && m->svc != nullptr; }

FMOE_EMU_RT inline void vc_join(uint32_t* dst, const uint32_t* src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = src[i] > dst[i] ? src[i] : dst[i];
}

FMOE_EMU_RT inline void hb_release(MemBlock& m, unsigned t, uint32_t* obj) {
  uint32_t* row = svc_row(m, t);
  vc_join(obj, row, m.nthr);
  ++row[t];
}

FMOE_EMU_RT inline void hb_acquire(MemBlock& m, unsigned t, const uint32_t* obj) {
  vc_join(svc_row(m, t), obj, m.nthr);
}

/// The current thread arrives at __syncthreads.
FMOE_EMU_RT inline void on_block_arrive() {
  MemBlock* m = cur_mem();
  if (!hb_on(m)) return;
  hb_release(*m, cur_fiber().tid, m->bar_vc);
}

/// __syncthreads completes: every live thread acquires what the arrivals released, and
/// what the exited threads did (they no longer take part, as on a GPU).
FMOE_EMU_RT inline void on_block_release(Block& b) {
  MemBlock* m = b.mem;
  if (!hb_on(m)) return;
  for (const Fiber& f : b.fibers) {
    if (f.done) vc_join(m->bar_vc, svc_row(*m, f.tid), m->nthr);
  }
  for (const Fiber& f : b.fibers) {
    if (!f.done) hb_acquire(*m, f.tid, m->bar_vc);
  }
  std::memset(m->bar_vc, 0, sizeof(uint32_t) * size_t(m->nthr));
}

/// __syncwarp completes for the live lanes [lo, hi): each acquires the others'.
FMOE_EMU_RT inline void on_group_sync(Block& b, int lo, int hi) {
  MemBlock* m = b.mem;
  if (!hb_on(m)) return;
  std::memset(m->scratch, 0, sizeof(uint32_t) * size_t(m->nthr));
  for (int t = lo; t < hi; ++t) {
    if (!b.fibers[size_t(t)].done) hb_release(*m, unsigned(t), m->scratch);
  }
  for (int t = lo; t < hi; ++t) {
    if (!b.fibers[size_t(t)].done) hb_acquire(*m, unsigned(t), m->scratch);
  }
}

/// Named barrier `id`: the current thread arrives (bar.sync or bar.arrive) ...
FMOE_EMU_RT inline void on_named_arrive(int id) {
  MemBlock* m = cur_mem();
  if (!hb_on(m)) return;
  hb_release(*m, cur_fiber().tid, m->named_vc + size_t(id) * size_t(m->nthr));
}
/// ... the barrier completes: thread `tid`, one that waited (bar.sync), acquires ...
FMOE_EMU_RT inline void on_named_acquire(Block& b, unsigned tid, int id) {
  MemBlock* m = b.mem;
  if (!hb_on(m)) return;
  hb_acquire(*m, tid, m->named_vc + size_t(id) * size_t(m->nthr));
}
/// ... and its next use starts from nothing.
FMOE_EMU_RT inline void on_named_reset(Block& b, int id) {
  MemBlock* m = b.mem;
  if (!hb_on(m)) return;
  std::memset(m->named_vc + size_t(id) * size_t(m->nthr), 0, sizeof(uint32_t) * size_t(m->nthr));
}

/// Threads in the block's clocks (0: shared-memory ordering is not modelled).
FMOE_EMU_RT inline int hb_threads() {
  MemBlock* m = cur_mem();
  return hb_on(m) ? m->nthr : 0;
}
/// The current thread releases into / acquires from a synchronisation object of
/// hb_threads() entries (an mbarrier's phase).
FMOE_EMU_RT inline void hb_release_cur(uint32_t* obj) {
  MemBlock* m = cur_mem();
  if (hb_on(m)) hb_release(*m, cur_fiber().tid, obj);
}
FMOE_EMU_RT inline void hb_acquire_cur(const uint32_t* obj) {
  MemBlock* m = cur_mem();
  if (hb_on(m)) hb_acquire(*m, cur_fiber().tid, obj);
}
/// A release that takes effect later (cp.async.mbarrier.arrive): the current thread's
/// clock now into `out`; returns its own clock, which then moves on.
FMOE_EMU_RT inline uint32_t hb_snapshot_cur(uint32_t* out) {
  MemBlock* m = cur_mem();
  if (!hb_on(m)) return 0;
  const unsigned t = cur_fiber().tid;
  uint32_t* row = svc_row(*m, t);
  std::memcpy(out, row, sizeof(uint32_t) * size_t(m->nthr));
  return row[t]++;
}

/// While alive, the current thread keeps its turn at memory accesses (no preemption).
struct HoldTurn {
  MemBlock* m;
  FMOE_EMU_RT HoldTurn() : m(cur_mem()) {
    if (m != nullptr) ++m->hold;
  }
  FMOE_EMU_RT ~HoldTurn() {
    if (m != nullptr) --m->hold;
  }
};

/// While alive, the current thread's shared-memory accesses count as thread `tid`'s
/// at its own clock `clk` (copies landing for the thread that issued them).
struct ActAs {
  MemBlock* m;
  int tid;
  uint32_t clk;
  FMOE_EMU_RT ActAs(int t, uint32_t c) : m(cur_mem()), tid(-1), clk(0) {
    if (m == nullptr) return;
    tid = m->as_tid;
    clk = m->as_clk;
    m->as_tid = t;
    m->as_clk = c;
    ++m->hold;
  }
  FMOE_EMU_RT ~ActAs() {
    if (m == nullptr) return;
    m->as_tid = tid;
    m->as_clk = clk;
    --m->hold;
  }
};

// ------------------------------------------------------------------ annotations
/// FMOE_BENIGN_RACE(why) in device code: the accesses of the enclosing scope race on
/// purpose (their values only steer a heuristic); the model checks none of them.
struct BenignRace {
  FMOE_EMU_RT explicit BenignRace(const char*) {
    if (tls.block != nullptr && tls.block->cur >= 0) ++cur_fiber().benign;
  }
  FMOE_EMU_RT ~BenignRace() {
    if (tls.block != nullptr && tls.block->cur >= 0) --cur_fiber().benign;
  }
};

// ------------------------------------------------------------------ entry points
constexpr int kExposedStallMs = 30;

/// Maybe give the thread's turn away (preemption at a memory access).
FMOE_EMU_RT inline void maybe_preempt(MemBlock& m) {
  const int p = options().preempt;
  if (p <= 0 || m.hold > 0 || --m.countdown > 0) return;
  m.countdown = 1 + int(next_random(m) % uint64_t(2 * p));
  const bool in_model = tls.in_model;
  tls.in_model = false;  // other threads' accesses are checked while this one waits
  yield();
  tls.in_model = in_model;
}

/// Every instrumented load and store of the device code, and the emulated instructions'
/// own accesses, come here. Returns the buffer for global accesses (nullptr otherwise).
FMOE_EMU_RT inline void on_access(const void* p, size_t n, Access kind, uintptr_t pc) {
  MemBlock* m = cur_mem();
  if (m == nullptr) return;
  InModel guard;
  settle(*m);  // the block's previous strong read has completed by now
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a - m->tls_lo < m->tls_size) {
    if (a >= m->rt_lo && a < m->rt_hi) return;  // blockIdx & co.
    maybe_preempt(*m);
    if (kind != Access::StrongRead) {
      const bool write = kind == Access::Write || kind == Access::StrongWrite;
      smem_access(*m, a, n, write, false, pc_id(pc));
    }
    return;
  }
  Buffer* buf = find_buffer(a);
  if (buf == nullptr) return;
  maybe_preempt(*m);
  global_access(*m, *buf, a, n, kind, pc_id(pc));
}

/// An atomic read-modify-write on p (before it happens).
FMOE_EMU_RT inline void on_atomic(const void* p, size_t n, uintptr_t pc) {
  MemBlock* m = cur_mem();
  if (m == nullptr) return;
  InModel guard;
  settle(*m);
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a - m->tls_lo < m->tls_size) {
    maybe_preempt(*m);
    smem_access(*m, a, n, true, true, pc_id(pc));
    return;
  }
  Buffer* buf = find_buffer(a);
  if (buf == nullptr) return;
  maybe_preempt(*m);
  observe(*m, a & ~uintptr_t(3));
  global_access(*m, *buf, a, n, Access::StrongWrite, pc_id(pc));
  m->unsettled = a & ~uintptr_t(3);  // its read part: settled after the operation
}

/// Right after an emulated strong read or read-modify-write of the current thread.
FMOE_EMU_RT inline void after_strong() {
  MemBlock* m = cur_mem();
  if (m == nullptr) return;
  InModel guard;
  settle(*m);
}

// ------------------------------------------------------------------ the async proxy
/// fence.proxy.async of the current thread: its earlier generic-proxy shared-memory
/// writes become visible to async-proxy reads ordered after it (by a barrier).
FMOE_EMU_RT inline void on_fence_proxy_async() {
  MemBlock* m = cur_mem();
  if (m == nullptr) return;
  InModel guard;
  const unsigned tid = cur_fiber().tid;
  if (m->proxy_fences.size() <= tid) m->proxy_fences.resize(tid + 1, 0u);
  ++m->proxy_fences[tid];
  if (hb_on(m)) {
    std::memcpy(m->fence_vc + size_t(tid) * size_t(m->nthr), svc_row(*m, tid),
                sizeof(uint32_t) * size_t(m->nthr));
  }
}

/// An async-proxy access of shared memory [p, p + n), at its issue: a wgmma operand
/// read, or (writes) a TMA load's destination. Every word's last generic-proxy writer
/// must have issued a fence.proxy.async since (PTX: the generic and async proxies are
/// ordered with each other only through that fence: a read may see old bytes, a
/// write may land before the generic store it should follow).
FMOE_EMU_RT inline void on_async_proxy_access(const void* p, size_t n, const Site& site,
                                              bool writes) {
  MemBlock* m = cur_mem();
  if (m == nullptr || m->smem == nullptr) return;
  InModel guard;
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a - m->tls_lo >= m->tls_size) return;
  const size_t first = (a - m->tls_lo) / 4, last = (a + n - 1 - m->tls_lo) / 4;
  for (size_t i = first; i <= last && i < m->smem_words; ++i) {
    const SWord& s = m->smem[i];
    if (s.wpf == 0 || proxy_count(*m, s.w.tid) >= s.wpf) continue;
    // Or this thread fenced after the write was ordered before it (it acquired the
    // write, then fenced: the reader-side form of the rule).
    if (hb_on(m) && s.w.clk != 0 &&
        m->fence_vc[size_t(cur_fiber().tid) * size_t(m->nthr) + s.w.tid] >= s.w.clk) {
      continue;
    }
    char off[40];
    std::snprintf(off, sizeof off, "{{tls:%zx}}", size_t(i * 4));
    model_fault(describe(site) + (writes ? " overwrites " : " reads ") + off + " in " +
                block_name(m->id) + ", which thread " + std::to_string(s.w.tid) +
                " wrote through the generic proxy at " + pc_text(s.w.pc) +
                " and issued no fence.proxy.async after: " +
                (writes ? "the generic store may land after the async proxy's"
                        : "the async proxy may read the old bytes") +
                " (fence.proxy.async in the writing thread, then the barrier; or in the reading "
                "thread after the barrier)");
  }
}

/// The async proxy wrote shared memory [p, p + n) (a TMA load landed): no generic write
/// remains to be fenced there.
FMOE_EMU_RT inline void on_async_proxy_write(const void* p, size_t n) {
  MemBlock* m = cur_mem();
  if (m == nullptr || m->smem == nullptr) return;
  InModel guard;
  const auto a = reinterpret_cast<uintptr_t>(p);
  if (a - m->tls_lo >= m->tls_size) return;
  const size_t first = (a - m->tls_lo) / 4, last = (a + n - 1 - m->tls_lo) / 4;
  for (size_t i = first; i <= last && i < m->smem_words; ++i) m->smem[i].wpf = 0;
}

/// fence.sc of the current thread: cta (nothing beyond the block), gpu or sys scope.
enum class Scope : uint8_t { Cta, Gpu, Sys };
FMOE_EMU_RT inline void on_fence(Scope scope) {
  MemBlock* m = cur_mem();
  if (m == nullptr) return;
  InModel guard;
  settle(*m);
  if (scope == Scope::Cta) return;
  if (options().weak && m->exposed) {
    // The block published (an atomic or signal) after plain stores no fence covered:
    // it waits before this fence releases them, so that a block acting on the
    // publication reads first, as it may on a GPU (a missing release fence then shows
    // whatever the timing of the other blocks would have been).
    std::this_thread::sleep_for(std::chrono::milliseconds(kExposedStallMs));
  }
  m->dirty = m->exposed = false;
  if (options().weak) drain(*m);
  if (options().races) hb_fence(*m, scope == Scope::Sys);
}

/// A cp.async (or any L2 copy) of n bytes from global src to shared dst, landing now.
FMOE_EMU_RT inline void copy_l2(void* dst, const void* src, size_t n, uintptr_t pc) {
  MemBlock* m = cur_mem();
  InModel guard;
  if (m != nullptr) on_access(src, n, Access::L2Read, pc);
  copy_visible(m, dst, src, n);
}

/// A spinning thread: now and then its block's buffered stores drain.
FMOE_EMU_RT inline void on_spin() {
  MemBlock* m = cur_mem();
  InModel guard;
  if (m != nullptr && options().weak && (next_random(*m) & 15) == 0) drain(*m);
}

}  // namespace fmoe_emu

// ------------------------------------------------------------------ instrumentation
// What g++ -fsanitize=thread calls (no sanitizer run time is linked: these are it).
#define FMOE_EMU_CB extern "C" FMOE_EMU_RT __attribute__((noinline))
#define FMOE_EMU_ACCESS(p, n, kind)                                                          \
  if (!fmoe_emu::tls.in_model) fmoe_emu::on_access(p, n, fmoe_emu::Access::kind, FMOE_EMU_PC())
#define FMOE_EMU_RW(n)                                                                          \
  FMOE_EMU_CB void __tsan_read##n(void* p) { FMOE_EMU_ACCESS(p, n, Read); }                    \
  FMOE_EMU_CB void __tsan_write##n(void* p) { FMOE_EMU_ACCESS(p, n, Write); }                  \
  FMOE_EMU_CB void __tsan_unaligned_read##n(void* p) { FMOE_EMU_ACCESS(p, n, Read); }          \
  FMOE_EMU_CB void __tsan_unaligned_write##n(void* p) { FMOE_EMU_ACCESS(p, n, Write); }        \
  FMOE_EMU_CB void __tsan_volatile_read##n(void* p) { FMOE_EMU_ACCESS(p, n, StrongRead); }     \
  FMOE_EMU_CB void __tsan_volatile_write##n(void* p) { FMOE_EMU_ACCESS(p, n, StrongWrite); }
FMOE_EMU_RW(1)
FMOE_EMU_RW(2)
FMOE_EMU_RW(4)
FMOE_EMU_RW(8)
FMOE_EMU_RW(16)
#undef FMOE_EMU_RW
FMOE_EMU_CB void __tsan_read_range(void* p, unsigned long n) { FMOE_EMU_ACCESS(p, n, Read); }
FMOE_EMU_CB void __tsan_write_range(void* p, unsigned long n) { FMOE_EMU_ACCESS(p, n, Write); }
FMOE_EMU_CB void __tsan_init() {}
FMOE_EMU_CB void __tsan_func_entry(void*) {}
FMOE_EMU_CB void __tsan_func_exit() {}
FMOE_EMU_CB void __tsan_vptr_update(void**, void*) {}
FMOE_EMU_CB void __tsan_vptr_read(void**) {}
FMOE_EMU_CB void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
FMOE_EMU_CB void __tsan_atomic_signal_fence(int) {}
// Host atomics of instrumented library code (std::atomic outside the runtime's functions):
// performed, not modelled (device code's atomics are the emulated CUDA ones).
#define FMOE_EMU_TSAN_ATOMICS(bits, T)                                                          \
  FMOE_EMU_CB T __tsan_atomic##bits##_load(const volatile T* a, int) {                         \
    return __atomic_load_n(a, __ATOMIC_SEQ_CST);                                                \
  }                                                                                             \
  FMOE_EMU_CB void __tsan_atomic##bits##_store(volatile T* a, T v, int) {                      \
    __atomic_store_n(a, v, __ATOMIC_SEQ_CST);                                                   \
  }                                                                                             \
  FMOE_EMU_CB T __tsan_atomic##bits##_exchange(volatile T* a, T v, int) {                      \
    return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                             \
  FMOE_EMU_CB T __tsan_atomic##bits##_fetch_add(volatile T* a, T v, int) {                     \
    return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                             \
  FMOE_EMU_CB T __tsan_atomic##bits##_fetch_sub(volatile T* a, T v, int) {                     \
    return __atomic_fetch_sub(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                             \
  FMOE_EMU_CB T __tsan_atomic##bits##_fetch_and(volatile T* a, T v, int) {                     \
    return __atomic_fetch_and(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                             \
  FMOE_EMU_CB T __tsan_atomic##bits##_fetch_or(volatile T* a, T v, int) {                      \
    return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST);                                           \
  }                                                                                             \
  FMOE_EMU_CB T __tsan_atomic##bits##_fetch_xor(volatile T* a, T v, int) {                     \
    return __atomic_fetch_xor(a, v, __ATOMIC_SEQ_CST);                                          \
  }                                                                                             \
  FMOE_EMU_CB T __tsan_atomic##bits##_fetch_nand(volatile T* a, T v, int) {                    \
    return __atomic_fetch_nand(a, v, __ATOMIC_SEQ_CST);                                         \
  }                                                                                             \
  FMOE_EMU_CB int __tsan_atomic##bits##_compare_exchange_strong(volatile T* a, T* c, T v, int, \
                                                                int) {                          \
    return __atomic_compare_exchange_n(a, c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);     \
  }                                                                                             \
  FMOE_EMU_CB int __tsan_atomic##bits##_compare_exchange_weak(volatile T* a, T* c, T v, int,   \
                                                              int) {                            \
    return __atomic_compare_exchange_n(a, c, v, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);      \
  }                                                                                             \
  FMOE_EMU_CB T __tsan_atomic##bits##_compare_exchange_val(volatile T* a, T c, T v, int, int) { \
    __atomic_compare_exchange_n(a, &c, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);           \
    return c;                                                                                   \
  }
FMOE_EMU_TSAN_ATOMICS(8, unsigned char)
FMOE_EMU_TSAN_ATOMICS(16, unsigned short)
FMOE_EMU_TSAN_ATOMICS(32, unsigned)
FMOE_EMU_TSAN_ATOMICS(64, unsigned long long)
#undef FMOE_EMU_TSAN_ATOMICS

namespace fmoe_emu {

#else  // !FMOE_EMU_CHECKED: the model is compiled out

#define FMOE_EMU_PC() uintptr_t(0)
enum class Scope : uint8_t { Cta, Gpu, Sys };
struct BenignRace {
  explicit BenignRace(const char*) {}
};
struct MemBlock {};
inline void mem_begin_launch(int, int) {}
inline void mem_end_launch() {}
inline void mem_block_start(Block&, int) {}
inline void mem_block_end(Block&) {}
inline void on_fence(Scope) {}
inline void on_fence_proxy_async() {}
inline void on_async_proxy_access(const void*, size_t, const Site&, bool) {}
inline void on_async_proxy_write(const void*, size_t) {}
inline void on_block_arrive() {}
inline void on_block_release(Block&) {}
inline void on_group_sync(Block&, int, int) {}
inline void on_named_arrive(int) {}
inline void on_named_acquire(Block&, unsigned, int) {}
inline void on_named_reset(Block&, int) {}
inline int hb_threads() { return 0; }
inline void vc_join(uint32_t*, const uint32_t*, int) {}
inline void hb_release_cur(uint32_t*) {}
inline void hb_acquire_cur(const uint32_t*) {}
inline uint32_t hb_snapshot_cur(uint32_t*) { return 0; }
struct ActAs {
  ActAs(int, uint32_t) {}
};
struct HoldTurn {};
inline void after_strong() {}
inline void on_spin() {}
inline void copy_l2(void* dst, const void* src, size_t n, uintptr_t) { std::memcpy(dst, src, n); }
inline void register_buffers(int, const char* const*, const uint64_t*, const uint64_t*,
                             const int*, const int*) {}

#endif  // FMOE_EMU_CHECKED

}  // namespace fmoe_emu
