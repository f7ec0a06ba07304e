"""The CPU emulator backend: the real device code, compiled for the host and run there.

Every kernel of ``device/`` also builds with a host C++ compiler against a small
emulation of the CUDA execution model (``device/emu/``): one OS thread per block,
one fiber per CUDA thread, emulated tensor-core instructions, NVSHMEM between PEs in
one process. The layers here reuse the GPU layer's plan, ABI and layout, keep every
buffer in host memory and return NumPy::

    layer = MoELayer(cfg, w, backend="emulator")      # an EmulatedMoELayer
    y, routing = layer(x, return_routing=True)

    ep = EmulatedExpertParallel(cfg, w)               # cfg.world_size PEs, one process
    ys = ep([x0, x1])

What it proves: the kernels' indexing, tiling, fragment layouts, pipelines, task and
signal protocols, termination and fault paths, against the oracle; with
``EmulatorOptions(weak=True, races=True, preempt=...)`` (or ``EmulatorOptions.strict``)
also the memory-ordering rules of docs/design.md: weak global memory with per-block
store buffers, the L1 rule, data races on shared and global memory. What it cannot:
occupancy and co-residency limits, timing and performance, the NVLink/InfiniBand
transports themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import env
from ..config import MoEConfig
from .training import (EmulatedExpertParallelTraining, EmulatedTraining, backward_symmetric,
                       staged_input)
from ..kernel.ep import plan_heap
from ..host.abi import (ABI_VERSION, FAULT_RECORD, MODES, STATE, STATE_WORDS, decode_fault)
from ..host.emulator import BufferSpan, EmulatorError, EmulatorOptions
from ..host.errors import FlashMoEError
from ..kernel.jit import emulator_library
from ..kernel.contract import (check_ranks_agree, check_weights_finite, fault_exception,
                               kernel_weights, layout_record, placement_tables, recovery_state,
                               tensor_maps)
from ..kernel.specs import ACT_IDS, moe_spec, nvshmem_ping_spec, ring_test_spec, tile_gemm_spec
from ..numerics import round_to, storage_dtype
from ..kernel.plan import plan_layer
from ..oracle.reference import Routing, given_routing
from ..weights import MoEWeights, check_weights

__all__ = ["EmulatorOptions", "EmulatorError", "EmulatedMoELayer", "EmulatedExpertParallel",
           "EmulatedRank",
           "tile_gemm", "ring_test", "nvshmem_ping", "DEFAULT_GRID", "DEFAULT_TIMEOUT_S"]

DEFAULT_GRID = 4          # blocks per PE: each is an OS thread on a machine of few cores
DEFAULT_TIMEOUT_S = 60.0  # the emulator is ~10^4x slower than a GPU: waits last longer
_ALIGN = 256
_P = ctypes.c_void_p


def _aligned(nbytes: int, fill: Optional[int] = None) -> np.ndarray:
    """A 256-byte-aligned byte array (GPU allocations are aligned at least that much)."""
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    off = (-raw.ctypes.data) % _ALIGN
    out = raw[off:off + nbytes]
    if fill is not None:
        out[...] = fill
    return out


def _addr(a: Optional[np.ndarray]) -> int:
    return 0 if a is None else int(a.ctypes.data)


def _timeout(timeout_s: Optional[float]) -> float:
    # FLASHMOE_TIMEOUT_S applies here as on a GPU; unset, the emulator's longer default.
    t = env.timeout_s(default=DEFAULT_TIMEOUT_S) if timeout_s is None else float(timeout_s)
    if not 0 < t <= 3600:
        raise ValueError(f"timeout_s={timeout_s} must be in (0, 3600] seconds")
    return t


def _span(name: str, a: Optional[np.ndarray], pe: int = 0, symmetric: bool = False):
    return [] if a is None else [BufferSpan(name, _addr(a), int(a.nbytes), pe, symmetric)]


def _grid(grid: int, least: int) -> int:
    if not least <= int(grid) <= 256:
        raise ValueError(f"grid={grid} must be in [{least}, 256] blocks")
    return int(grid)


# ------------------------------------------------------------------------- kernels
def tile_gemm(a: np.ndarray, b: np.ndarray, dtype: str, bias: Optional[np.ndarray] = None,
              activation: str = "identity", gated: bool = False,
              a_index: Optional[np.ndarray] = None,
              options: EmulatorOptions = EmulatorOptions()) -> np.ndarray:
    """:func:`flashmoe_core.gpu.ops.tile_gemm` on the emulator (same arguments and result)."""
    from ..kernel.contract import gemm_operands

    a, b, bias, a_index, m, n, k = gemm_operands(a, b, dtype, bias, activation, gated, a_index)
    lib = emulator_library(tile_gemm_spec(dtype), options.checked)
    fn = lib.function("emu_tile_gemm", [_P, _P, _P, _P, _P] + [ctypes.c_int] * 5)
    out = np.empty((m, n), storage_dtype(dtype))
    bias = None if bias is None else np.ascontiguousarray(round_to(bias, dtype))
    if m > 0:
        spans = (_span("A", a) + _span("a_index", a_index) + _span("B", b) + _span("bias", bias) +
                 _span("C", out))
        lib.launch(options, fn, _addr(a), _addr(a_index), _addr(b), _addr(bias), _addr(out),
                   m, n, k, ACT_IDS[activation], int(gated), buffers=spans)
    return out


def _wgmma_dtype(a: np.ndarray) -> str:
    """The 16-bit storage type wgmma takes, by name, of an operand array."""
    dtype = {np.dtype(storage_dtype("bfloat16")): "bfloat16",
             np.dtype(np.float16): "float16"}.get(a.dtype)
    if dtype is None:
        raise ValueError(f"a and b must be bfloat16 or float16, not {a.dtype}")
    return dtype


def gmma_test(a: np.ndarray, b: np.ndarray, swizzle: str = "128B", tma: bool = False,
              map_k: Optional[int] = None, options: EmulatorOptions = EmulatorOptions()):
    """``kernels/gmma_test.cu`` (Hopper's wgmma, descriptors, mbarriers and TMA) on the
    emulator: ``c = a b^T`` in float32 for a [64, K] and b [N, K] of one 16-bit storage
    type (K a multiple of 64, N 64, 128 or 256), and the kernel's mbarrier probe words.
    ``tma``: the operand tiles arrive by TMA loads (a swizzled layout) instead of stores;
    ``map_k``: the tensor maps' K (default K), past which the loads read zeros."""
    from ..host.tma import SWIZZLES, encode_emulated
    from ..kernel.specs import gmma_test_spec

    if tma and swizzle == "interleave":
        raise ValueError("the TMA mode loads swizzled tiles: pass swizzle='32B', '64B' or "
                         "'128B'")

    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != 64 or a.shape[1] != b.shape[1] or \
            a.shape[1] % 64 or a.dtype != b.dtype:
        raise ValueError(f"a must be [64, K] and b [N, K] of one dtype, K a multiple of 64; got "
                         f"{a.shape} {a.dtype} and {b.shape} {b.dtype}")
    dtype = _wgmma_dtype(a)
    lib = emulator_library(gmma_test_spec(dtype, b.shape[0], swizzle), options.checked)
    mismatches = lib.function("emu_gmma_layout_mismatches", [], ctypes.c_int)()
    if mismatches:
        raise FlashMoEError(f"the emulator's wgmma descriptor or accumulator layout disagrees "
                            f"with CuTe's SM90 GMMA layouts in {mismatches} places")
    fn = lib.function("emu_gmma_test", [_P, _P, _P, ctypes.c_int, _P, _P, _P, ctypes.c_int])
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    c = np.empty((64, b.shape[0]), np.float32)
    probe = np.zeros(9, np.uint32)
    k, eb = a.shape[1], a.itemsize
    tma_swizzle = "none" if swizzle == "interleave" else swizzle
    box_k = (16 << SWIZZLES[tma_swizzle] if SWIZZLES[tma_swizzle] else 128) // eb  # a span
    maps = [encode_emulated(_addr(t), eb, (map_k or k, t.shape[0]), (k * eb,),
                            (box_k, t.shape[0]), tma_swizzle) for t in (a, b)]
    spans = _span("A", a) + _span("B", b) + _span("C", c) + _span("probe", probe)
    lib.launch(options, fn, _addr(a), _addr(b), _addr(c), k, _addr(probe), _addr(maps[0]),
               _addr(maps[1]), int(tma), buffers=spans)
    return c, probe


def ws_gemm_test(a: np.ndarray, b: np.ndarray, a_index: Optional[np.ndarray] = None,
                 tma: bool = False, grid: int = 2, stages: int = 4, bk: int = 64,
                 timeout_s: float = 10.0, options: EmulatorOptions = EmulatorOptions()):
    """``kernels/ws_gemm_test.cu`` (the warp-specialised wgmma mainloop: a producer warp
    fills the stages, the consumer warpgroup multiplies) on the emulator: ``c =
    a[a_index] b^T`` in float32 for a [rows, K] and b [N, K] of one 16-bit storage type
    (K a multiple of 8), on a persistent grid of ``grid`` blocks, ``stages`` stages of
    ``bk`` (64 or 32); ``tma``: b's tiles by TMA. Returns ``(c, fault)``, fault the decoded fault record (code 0: none)."""
    from ..host.tma import encode_emulated
    from ..kernel.specs import ws_gemm_test_spec

    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or a.shape[1] % 8 or \
            a.dtype != b.dtype:
        raise ValueError(f"a must be [rows, K] and b [N, K] of one dtype, K a multiple of 8; "
                         f"got {a.shape} {a.dtype} and {b.shape} {b.dtype}")
    dtype = _wgmma_dtype(a)
    a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
    if a_index is not None:
        a_index = np.ascontiguousarray(a_index, np.int32)
        if a_index.ndim != 1 or (a_index.size and (a_index.min() < 0 or
                                                   a_index.max() >= a.shape[0])):
            raise ValueError(f"a_index must be 1-D row indices of a (0..{a.shape[0] - 1})")
    m = a.shape[0] if a_index is None else a_index.size
    n, k = b.shape
    lib = emulator_library(ws_gemm_test_spec(dtype, stages, bk), options.checked)
    fn = lib.function("emu_ws_gemm_test", [ctypes.c_int, _P, _P, _P, _P, ctypes.c_int,
                                           ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, _P,
                                           ctypes.c_ulonglong])
    c = np.full((m, n), np.nan, np.float32)
    eb = a.itemsize
    span = bk * eb  # one swizzle span of K per box row: 128 or 64 bytes
    map_b = encode_emulated(_addr(b), eb, (k, n, 1), (k * eb, n * k * eb), (span // eb, 128, 1),
                            f"{span}B")
    record = np.zeros(1, FAULT_RECORD)
    spans = (_span("A", a) + _span("a_index", a_index) + _span("B", b) + _span("C", c) +
             _span("fault record", record))
    lib.launch(options, fn, int(grid), _addr(a), _addr(a_index), _addr(b), _addr(c), m, n, k,
               _addr(map_b), int(tma), _addr(record), int(timeout_s * 1e9), buffers=spans)
    return c, decode_fault(record.tobytes())


def ring_test(state: np.ndarray, ring: np.ndarray, seen: np.ndarray, seeds: int, fanout: int,
              grid: int = 8, timeout_s: float = 10.0,
              options: EmulatorOptions = EmulatorOptions()) -> dict:
    """One launch of ``kernels/ring_test.cu`` on caller-owned buffers (kept between
    launches, as on a GPU); returns the decoded fault record."""
    for name, arr, dt in (("state", state, np.uint32), ("ring", ring, np.uint64),
                          ("seen", seen, np.uint32)):
        if arr.dtype != dt or not arr.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous {np.dtype(dt)} array")
    if state.size < STATE_WORDS or ring.size < seeds * fanout or seen.size < seeds * (1 + fanout):
        raise ValueError("state needs 16 words, ring seeds * fanout slots and seen "
                         "seeds * (1 + fanout) counters")
    lib = emulator_library(ring_test_spec(), options.checked)
    fn = lib.function("emu_ring_test", [ctypes.c_int, _P, _P, ctypes.c_int, _P, ctypes.c_int,
                                        ctypes.c_int, _P, ctypes.c_ulonglong])
    record = np.zeros(1, FAULT_RECORD)
    spans = _span("state", state) + _span("ring", ring) + _span("seen", seen) + \
        _span("fault record", record)
    lib.launch(options, fn, _grid(grid, 1), _addr(state), _addr(ring), ring.size, _addr(seen),
               seeds, fanout, _addr(record), int(timeout_s * 1e9), buffers=spans)
    return decode_fault(record.tobytes())


def nvshmem_ping(pes: int, count: int = 64, epoch: int = 1, timeout_s: float = 5.0,
                 options: EmulatorOptions = EmulatorOptions()):
    """``kernels/nvshmem_ping.cu`` on ``pes`` emulated PEs: each puts ``count`` words to
    the next PE (a put, a fence, the last word with a signal) and waits for the
    previous one's.

    Returns
    -------
    (received, records): received[p] are the words PE p's kernel read after its signal
    arrived; records[p] its decoded fault record (code 0 when the signal came in time).
    """
    if not 1 <= pes <= 64 or count < 1:
        raise ValueError(f"pes={pes} must be in [1, 64] and count={count} positive")
    lib = emulator_library(nvshmem_ping_spec(), options.checked)
    fn = lib.function("emu_nvshmem_ping", [ctypes.c_int, _P, ctypes.c_ulonglong,
                                           ctypes.c_ulonglong, _P, ctypes.c_ulonglong,
                                           ctypes.c_int, ctypes.c_uint64, _P, ctypes.c_ulonglong,
                                           _P, _P])
    heap_bytes = _ALIGN + count * 8
    heaps = [_aligned(heap_bytes, 0) for _ in range(pes)]
    srcs = [np.arange(count, dtype=np.uint64) + np.uint64(1000 * p) for p in range(pes)]
    got = [np.zeros(count, np.uint64) for _ in range(pes)]
    records = np.zeros(pes, FAULT_RECORD)
    results = np.zeros(pes, np.int32)
    heap_ptrs = (ctypes.c_void_p * pes)(*[_addr(h) for h in heaps])
    src_ptrs = (ctypes.c_void_p * pes)(*[_addr(s) for s in srcs])
    got_ptrs = (ctypes.c_void_p * pes)(*[_addr(g) for g in got])
    spans = [b for p in range(pes) for b in
             _span("heap", heaps[p], p, True) + _span("src", srcs[p], p) +
             _span("got", got[p], p)] + _span("fault records", records) + _span("results", results)
    lib.launch(options, fn, pes, heap_ptrs, heap_bytes, _ALIGN, src_ptrs, 0, count, epoch,
               _addr(records), int(timeout_s * 1e9), _addr(results), got_ptrs, buffers=spans)
    return got, [decode_fault(records[p:p + 1].tobytes()) for p in range(pes)]


# ------------------------------------------------------------------------- one PE
class _PeBuffers:
    """One PE's host-memory buffers and its MoeLayout (the layer's device memory)."""

    def __init__(self, cfg: MoEConfig, weights: MoEWeights, rank: int, timeout_s: float,
                 heap: Optional[np.ndarray] = None, heap_offsets: Optional[Dict[str, int]] = None):
        self.cfg, self.rank, self.timeout_s = cfg, rank, timeout_s
        self.local_ids = cfg.local_experts(rank) if cfg.world_size > 1 else list(range(cfg.experts))
        self.plan = plan_layer(cfg, local_experts=len(self.local_ids))
        self.buf: Dict[str, np.ndarray] = {}
        self.heap_names = set(heap_offsets or ())
        self.delay_ns = 0
        if cfg.world_size > 1:
            hp = plan_heap(cfg)
            workspace = {k: v for k, v in hp.local.items() if k not in self.plan.weights}
            sizes = {**hp.symmetric, **backward_symmetric(cfg)}
            for name, off in heap_offsets.items():
                self.buf[name] = heap[off:off + sizes[name]]
            weights = weights.subset(self.local_ids)
        else:
            workspace = self.plan.workspace
        # Workspace starts as garbage, as device memory does; the kernel must not rely on it.
        for name, nbytes in workspace.items():
            self.buf[name] = _aligned(nbytes, 0xA5)
        self._upload_weights(weights)
        if cfg.world_size > 1:
            for name, table in placement_tables(cfg).items():
                self.view(name, table.shape, table.dtype)[...] = table
        self.fault = np.zeros(1, FAULT_RECORD)
        self.reset()

    def _put(self, name: str, array: np.ndarray) -> None:
        a = np.ascontiguousarray(array)
        self.buf[name] = _aligned(a.nbytes)
        self.buf[name][...] = a.reshape(-1).view(np.uint8)

    def _upload_weights(self, w: MoEWeights) -> None:
        for name, array in kernel_weights(w).items():
            self._put(name, array)
        # The weights' tensor maps, which kernels with the sm_90a mainloop of a 16-bit
        # type load weight tiles through (the others never read them).
        if np.dtype(storage_dtype(self.cfg.dtype)).itemsize == 2:
            from ..host.tma import encode_emulated

            self._put("tensor_maps", tensor_maps(self.cfg, self.ptr, encode_emulated,
                                                 len(self.local_ids)))

    def reset(self) -> None:
        """Zero what a layer zeroes when it is built (counters, ring, signals)."""
        for name in ("state", "ring", "dep_rowtile", "dep_combine"):
            self.buf[name][...] = 0
        for name in ("header_sig", "dispatch_sig", "return_sig", "done_sig"):
            if name in self.buf:
                self.buf[name][...] = 0
        self.fault[...] = np.zeros(1, FAULT_RECORD)
        self.make_layout()

    def recover(self, words: np.ndarray, epoch: int) -> None:
        """After a failed launch: what MoELayer.recover() does on every rank (counters
        cleared, one epoch past all used, peers' last launches counted as done);
        signals stay as the failed launch left them."""
        for name in ("ring", "dep_rowtile", "dep_combine"):
            self.buf[name][...] = 0
        self.view("state", (STATE_WORDS,), np.uint32)[...] = words
        if "done_sig" in self.buf:
            self.view("done_sig", (self.cfg.world_size,), np.uint64)[...] = epoch
        self.fault[...] = np.zeros(1, FAULT_RECORD)

    def ptr(self, name: str) -> int:
        return _addr(self.buf.get(name))

    def spans(self) -> List[BufferSpan]:
        """Every buffer of this PE, named for the memory model."""
        heap = self.heap_names
        out = [s for name, a in self.buf.items() for s in _span(name, a, self.rank, name in heap)]
        return out + _span("layout", self.layout, self.rank) + \
            _span("fault record", self.fault, self.rank)

    def make_layout(self) -> None:
        rec = layout_record(self.cfg, self.plan, self.ptr, fault=_addr(self.fault),
                            timeout_s=self.timeout_s, rank=self.rank,
                            local_experts=len(self.local_ids), delay_ns=self.delay_ns)
        self.layout = _aligned(rec.nbytes)
        self.layout[...] = np.frombuffer(rec.tobytes(), np.uint8)

    def view(self, name: str, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape))
        return self.buf[name].view(dtype)[:n].reshape(shape)

    def fault_info(self) -> Optional[dict]:
        info = decode_fault(self.fault.tobytes())
        return None if info["code"] == 0 else info

    def routing(self, tokens: int) -> Routing:
        k = self.cfg.top_k
        return Routing(self.view("topk_expert", (tokens, k), np.int32).copy(),
                       self.view("topk_weight", (tokens, k), np.float32).copy(),
                       self.view("token_rows", (tokens, k), np.int32) >= 0)

    def state(self) -> dict:
        words = self.view("state", (STATE_WORDS,), np.uint32)
        return {k: int(words[v]) for k, v in STATE.items()}


class _Launcher:
    """The fused kernel's emulator library for one configuration."""

    def __init__(self, cfg: MoEConfig, options: EmulatorOptions) -> None:
        if not isinstance(options, EmulatorOptions):
            raise TypeError(f"options must be EmulatorOptions, got {type(options).__name__}")
        self.cfg, self.options = cfg, options
        self.on_report: Optional[Callable[[], None]] = None  # the owning layer's recovery
        self._load()

    def _load(self) -> None:
        """The library the options need (a checked build for the memory model)."""
        cfg = self.cfg
        self.lib = emulator_library(moe_spec(cfg), self.options.checked)
        abi = self.lib.function("emu_moe_abi", [], ctypes.c_uint)()
        if abi != ABI_VERSION:
            raise FlashMoEError(f"emulator kernel ABI {abi} differs from host ABI {ABI_VERSION}; "
                                "clear the kernel cache (FLASHMOE_CACHE_DIR)")
        max_world = self.lib.function("emu_moe_max_world", [])()
        if cfg.world_size > max_world:
            raise ValueError(f"world_size={cfg.world_size}: the emulator runs at most "
                             f"{max_world} PEs in one process")
        self.fn = self.lib.function("emu_moe_forward", [ctypes.c_int, _P, _P, _P, _P, _P, _P,
                                                        ctypes.c_int, ctypes.c_int, _P,
                                                        ctypes.c_ulonglong])

    def set_options(self, options: EmulatorOptions) -> None:
        checked = self.options.checked
        self.options = options
        if options.checked != checked:
            self._load()

    def __call__(self, pes: Sequence[_PeBuffers], tokens: Sequence[int], launched: Sequence[bool],
                 mode: str, grid: int, x_ptrs: Sequence[int], y_ptrs: Sequence[int],
                 heaps: Sequence[np.ndarray] = (), heap_bytes: int = 0,
                 spans: Optional[List[BufferSpan]] = None) -> None:
        n = len(pes)
        arr = lambda t, vals: (t * n)(*vals)  # noqa: E731
        caps = [self.cfg.capacity(t) for t in tokens]
        with recovering(self.on_report):
            self.lib.launch(
                self.options, self.fn, n, arr(_P, [_addr(p.layout) for p in pes]),
                arr(_P, x_ptrs), arr(_P, y_ptrs), arr(ctypes.c_int, tokens),
                arr(ctypes.c_int, [-1 if c is None else c for c in caps]),
                arr(ctypes.c_int, [int(bool(v)) for v in launched]), MODES[mode], grid,
                arr(_P, [_addr(h) for h in heaps]) if heaps else None, heap_bytes,
                # Buffers the memory model watches; a save slot's stand-in PE names none.
                buffers=spans if spans is not None else
                [b for p in pes for b in (p.spans() if hasattr(p, "spans") else ())])


@contextlib.contextmanager
def recovering(on_report: Optional[Callable[[], None]]):
    """Run a launch; if the emulator stopped it with a report, let the layer recover
    (the stopped launch left its counters and epoch as they were) before re-raising,
    so that the layer's next call starts clean, as after a fault record."""
    try:
        yield
    except EmulatorError:
        if on_report is not None:
            on_report()
        raise


class _Emulated:
    """What both emulated layers share: their launcher and its options."""

    _launcher: "_Launcher"

    def _emulated_pes(self) -> list:
        """This layer's PEs (one, or every PE of an expert-parallel layer)."""
        raise NotImplementedError

    def _recover_after_report(self) -> None:
        """After an emulator report: recover every PE, as MoELayer.recover() on every rank."""
        pes = self._emulated_pes()
        words, epoch = recovery_state([pe.state()["epoch"] for pe in pes])
        for pe in pes:
            pe.recover(words, epoch)

    @property
    def options(self) -> EmulatorOptions:
        """How launches are scheduled and perturbed (settable between calls)."""
        return self._launcher.options

    @options.setter
    def options(self, value: EmulatorOptions) -> None:
        if not isinstance(value, EmulatorOptions):
            raise TypeError("options must be EmulatorOptions")
        self._launcher.set_options(value)


class EmulatedMoELayer(_Emulated, EmulatedTraining):
    """A one-GPU MoE layer whose fused kernel runs on the CPU emulator.

    ``MoELayer(cfg, weights, backend="emulator")`` returns one. NumPy in, NumPy out.

    Parameters
    ----------
    cfg : MoEConfig
        ``world_size`` must be 1 (see :class:`EmulatedExpertParallel` for more PEs).
    weights : MoEWeights
    grid : int
        Blocks of the persistent grid (each one OS thread).
    timeout_s : float, optional
        Bound of every device-side wait (default ``FLASHMOE_TIMEOUT_S`` if set, else
        60 s: the emulator is slow).
    options : EmulatorOptions
        Scheduling and perturbation of each launch.
    check_finite : bool
        As for :class:`~flashmoe_core.gpu.layer.MoELayer`: refuse non-finite weights and
        inputs, naming the tensor and its first bad element.
    """

    def __init__(self, cfg: MoEConfig, weights: MoEWeights, grid: int = DEFAULT_GRID,
                 timeout_s: Optional[float] = None,
                 options: EmulatorOptions = EmulatorOptions(), check_finite: bool = False) -> None:
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        check_weights(cfg, weights)
        self.check_finite = bool(check_finite)
        if self.check_finite:
            check_weights_finite(weights)
        if cfg.world_size != 1:
            raise ValueError(f"cfg.world_size={cfg.world_size}: an EmulatedMoELayer is one PE; "
                             "use EmulatedExpertParallel to run several PEs in one process")
        self.cfg = cfg
        self.grid = _grid(grid, 1)
        self.backend = "emulator"
        self._launcher = _Launcher(cfg, options)
        self._launcher.on_report = self._recover_after_report
        self._pe = _PeBuffers(cfg, weights, 0, _timeout(timeout_s))
        self.plan = self._pe.plan
        self._weights = weights  # the backward uploads its own layouts when first needed

    def _launch(self, tokens: int, mode: str, x_ptr: int) -> None:
        pe = self._pe
        self._launcher([pe], [tokens], [True], mode, self.grid, [x_ptr], [pe.ptr("y_stage")])
        self.check_fault()

    def check_fault(self) -> None:
        """Raise the fault the last launch recorded, if any (after recovering)."""
        info = self._pe.fault_info()
        if info is not None:
            self._pe.recover(*recovery_state([self._pe.state()["epoch"]]))
            raise fault_exception(info)

    def _stage(self, x: np.ndarray) -> int:
        if not isinstance(x, np.ndarray):
            raise TypeError(f"the emulator takes NumPy arrays, got {type(x).__name__}")
        x, t = staged_input(self.cfg, x, "x", self.check_finite)
        self._pe.view("x_stage", x.shape, x.dtype)[...] = x
        return t

    def __call__(self, x: np.ndarray, return_routing: bool = False, routing=None,
                 save_for_backward: bool = False, recompute: bool = False):
        """Forward pass: ``y`` (and the kernel's Routing) as NumPy; ``routing`` as for
        :meth:`MoELayer.__call__` (the caller's experts and weights).

        ``save_for_backward=True`` also returns a SavedForBackward for
        :meth:`backward` (``y, saved[, routing]``); ``recompute=True`` keeps only x and
        the routing (see :mod:`flashmoe_core.kernel.training`).
        """
        if save_for_backward or recompute:
            if not save_for_backward:
                raise ValueError("recompute=True is an option of save_for_backward=True")
            return self._forward_saving(x, recompute, routing, return_routing=return_routing)
        mode = "full"
        if routing is not None:
            shape = getattr(x, "shape", ())
            experts, weights = given_routing(self.cfg, routing,
                                             int(shape[0]) if len(shape) == 2 else -1)
        t = self._stage(x)
        if routing is not None:
            k = self.cfg.top_k
            self._pe.view("topk_expert", (t, k), np.int32)[...] = experts
            self._pe.view("topk_weight", (t, k), np.float32)[...] = weights
            mode = "routed"
        self._launch(t, mode, self._pe.ptr("x_stage"))
        y = self._pe.view("y_stage", (t, self.cfg.hidden), storage_dtype(self.cfg.dtype)).copy()
        return (y, self.routing(t)) if return_routing else y

    def routing(self, tokens: int) -> Routing:
        """The routing of the last forward pass of ``tokens`` tokens."""
        return self._pe.routing(tokens)

    @property
    def testing(self) -> "_LayerTesting":
        """Test and fault-injection hooks, as ``MoELayer.testing``."""
        return _LayerTesting(self)

    def _emulated_pes(self) -> list:
        return [self._pe]

    def close(self) -> None:
        """Nothing to free on the host (kept for MoELayer's interface)."""


class _LayerTesting:
    """``EmulatedMoELayer.testing``: the hooks of ``MoELayer.testing`` the emulator has."""

    def __init__(self, layer: EmulatedMoELayer) -> None:
        self._layer = layer

    def stage(self, x: np.ndarray) -> int:
        """Copy x into the layer's input buffer; returns its token count."""
        return self._layer._stage(x)

    def run_mode(self, x: np.ndarray, mode: str) -> None:
        """Run a component on its own: ``gate_only`` or ``dispatch_only``."""
        if mode not in ("gate_only", "dispatch_only", "full"):
            raise ValueError(f"mode={mode!r}: expected gate_only, dispatch_only or full")
        L = self._layer
        L._launch(L._stage(x), mode, L._pe.ptr("x_stage"))

    def combine_only(self, tokens: int) -> np.ndarray:
        """Only the combine, on token_rows / topk_weight / y_expert as filled."""
        L = self._layer
        if not 1 <= tokens <= L.cfg.tokens:
            raise ValueError(f"tokens={tokens} must be in [1, {L.cfg.tokens}]")
        L._launch(tokens, "combine_only", 0)
        return L._pe.view("y_stage", (tokens, L.cfg.hidden), storage_dtype(L.cfg.dtype)).copy()

    def state(self) -> dict:
        """The kernel's state words (epoch, barrier, ...)."""
        return self._layer._pe.state()

    def workspace(self, name: str, shape, dtype) -> np.ndarray:
        """A copy of a workspace buffer."""
        return self._layer._pe.view(name, shape, dtype).copy()

    def fill_workspace(self, name: str, array: np.ndarray) -> None:
        """Write an array into a workspace buffer."""
        a = np.ascontiguousarray(array)
        self._layer._pe.view(name, (a.size,), a.dtype)[...] = a.reshape(-1)

    def inject_delay(self, seconds: float) -> None:
        """Delay every later launch by ``seconds``."""
        if not 0 <= seconds <= 60:
            raise ValueError(f"delay {seconds} s must be in [0, 60]")
        pe = self._layer._pe
        pe.delay_ns = int(seconds * 1e9)
        pe.make_layout()

    def inject_backward_delay(self, seconds: float) -> None:
        """Delay every later backward launch by ``seconds``."""
        self._layer._inject_backward_delay(seconds)


# ------------------------------------------------------------------------- several PEs
class EmulatedExpertParallel(_Emulated, EmulatedExpertParallelTraining):
    """``cfg.world_size`` PEs of an expert-parallel layer in one process, their fused
    kernels launched together on the emulator, NVSHMEM emulated between them.

    Every PE gets a symmetric heap (one host allocation, identical layout on every PE)
    and its own local buffers, exactly as :class:`~flashmoe_core.gpu.layer.MoELayer` lays
    them out on GPUs.

    Parameters
    ----------
    cfg : MoEConfig
        ``world_size`` >= 2; ``tokens`` is the bound per PE.
    weights : MoEWeights
        Every expert (each PE takes its own).
    grid : int
        Blocks per PE (at least 2: the last block of each PE is the subscriber).
    timeout_s : float, optional
    options : EmulatorOptions
    check_finite : bool
        Refuse non-finite weights and inputs (as :class:`EmulatedMoELayer`).
    """

    def __init__(self, cfg: MoEConfig, weights: MoEWeights, grid: int = 3,
                 timeout_s: Optional[float] = None,
                 options: EmulatorOptions = EmulatorOptions(), check_finite: bool = False) -> None:
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        if cfg.world_size < 2:
            raise ValueError("EmulatedExpertParallel needs cfg.world_size >= 2; use "
                             "MoELayer(cfg, w, backend='emulator') for one PE")
        check_weights(cfg, weights)
        if sorted(weights.expert_ids) != list(range(cfg.experts)):
            raise ValueError(f"the weights hold experts {weights.expert_ids}; "
                             "EmulatedExpertParallel needs every expert (each PE takes its own)")
        self.check_finite = bool(check_finite)
        if self.check_finite:
            check_weights_finite(weights)
        self.cfg = cfg
        self._weights = weights  # the backward uploads its own layouts when first needed
        self.world = cfg.world_size
        self.grid = _grid(grid, 2)
        self._launcher = _Launcher(cfg, options)
        self._launcher.on_report = self._recover_after_report
        timeout = _timeout(timeout_s)
        offsets, total = _heap_layout(cfg)
        self.heap_bytes = total
        self._heaps = [_aligned(total, 0) for _ in range(self.world)]
        self.pes = [_PeBuffers(cfg, weights, r, timeout, self._heaps[r], offsets)
                    for r in range(self.world)]

    @property
    def testing(self) -> "_ExpertParallelTesting":
        """Test and fault-injection hooks (components, buffers, state, delays)."""
        return _ExpertParallelTesting(self)

    def __call__(self, xs: Sequence[np.ndarray], absent: Sequence[int] = (),
                 return_routing: bool = False, save_for_backward: bool = False,
                 recompute: bool = False):
        """One forward pass on every PE at once.

        Parameters
        ----------
        xs : one [t_p, hidden] array per PE (each PE's own tokens).
        absent : PEs that do not launch this pass (fault injection: the others time out).
        return_routing : also return each PE's Routing.
        save_for_backward : also return a SavedForBackward for :meth:`backward`
            (``ys, saved[, routings]``).
        recompute : with ``save_for_backward``, keep only each PE's x and routing; the
            backward runs the forward again first (on every PE, along the same routes).

        Returns
        -------
        ys (and routings): lists with one entry per PE (None for absent PEs).

        Raises
        ------
        FlashMoETimeout or KernelFault
            For the lowest PE whose kernel recorded a fault; ``.records`` holds every
            PE's decoded record (None where there was none). Every PE then recovers
            as after ``MoELayer.recover()`` on every rank.
        """
        if recompute and not save_for_backward:
            raise ValueError("recompute=True is an option of save_for_backward=True")
        if save_for_backward:
            return self._forward_saving_ep(xs, absent, return_routing, recompute)
        tokens, launched = self._run(xs, absent, "full")
        dt = storage_dtype(self.cfg.dtype)
        ys: List[Optional[np.ndarray]] = [
            pe.view("y_stage", (t, self.cfg.hidden), dt).copy() if up else None
            for pe, t, up in zip(self.pes, tokens, launched)]
        if return_routing:
            return ys, [pe.routing(t) if up else None
                        for pe, t, up in zip(self.pes, tokens, launched)]
        return ys

    def _run(self, xs, absent, mode: str):
        if len(xs) != self.world:
            raise ValueError(f"xs has {len(xs)} arrays; expected one per PE ({self.world})")
        bad = [r for r in absent if not 0 <= r < self.world]
        if bad:
            raise ValueError(f"absent PEs {bad} are not in [0, {self.world})")
        tokens = []
        for r, (pe, x) in enumerate(zip(self.pes, xs)):
            if not isinstance(x, np.ndarray):
                raise TypeError(f"xs[{r}] must be a NumPy array, got {type(x).__name__}")
            x, t = staged_input(self.cfg, x, f"xs[{r}]", self.check_finite)
            pe.view("x_stage", x.shape, x.dtype)[...] = x
            tokens.append(t)
        launched = [r not in absent for r in range(self.world)]
        self._launcher(self.pes, tokens, launched, mode, self.grid,
                       [pe.ptr("x_stage") for pe in self.pes],
                       [pe.ptr("y_stage") for pe in self.pes], self._heaps, self.heap_bytes)
        records = [pe.fault_info() for pe in self.pes]
        if any(records):
            # Every PE is in this process: recover them all, as recover() on every rank.
            words, epoch = recovery_state([pe.state()["epoch"] for pe in self.pes])
            for pe in self.pes:
                pe.recover(words, epoch)
            first = next(r for r in records if r)
            exc = fault_exception(first)
            exc.records = records
            raise exc
        return tokens, launched

    def _emulated_pes(self) -> list:
        return list(self.pes)

    def close(self) -> None:
        """Nothing to free on the host (kept for MoELayer's interface)."""


def _heap_layout(cfg: MoEConfig):
    """Offsets of the symmetric buffers in a PE's heap (same order and offsets on every
    PE) and its size; the backward's symmetric buffers are reserved too (host memory is
    cheap here)."""
    offsets, total = {}, 0
    for name, nbytes in {**plan_heap(cfg).symmetric, **backward_symmetric(cfg)}.items():
        offsets[name] = total
        total += -(-nbytes // _ALIGN) * _ALIGN
    return offsets, total


# ------------------------------------------------------------------------- one PE per process
class EmulatedRank(_Emulated):
    """One PE of an expert-parallel layer per MPI process, on the emulator.

    ``MoELayer(cfg, w, backend="emulator", comm=comm)`` returns one when
    ``cfg.world_size > 1``: this process launches only its own PE's grid, and the PEs'
    symmetric heaps are POSIX shared memory that every process of the node maps, so a
    put or a signal is a store into the peer's heap. The host side is the GPU layer's:
    the ranks agree on the configuration first, a failed launch leaves the layer failed
    until :meth:`recover` runs on every rank.

    Checked options apply to this process's accesses only (peers run in their own
    processes: the memory model cannot order their accesses against ours).

    Parameters
    ----------
    cfg : MoEConfig
        ``world_size`` = the communicator's size.
    weights : MoEWeights
        At least this rank's experts.
    comm : mpi4py communicator
        Every rank on one node.
    grid : int
        Blocks of this PE (at least 2: the last is the subscriber).
    timeout_s : float, optional
    options : EmulatorOptions
    """

    def __init__(self, cfg: MoEConfig, weights: MoEWeights, comm, grid: int = 3,
                 timeout_s: Optional[float] = None,
                 options: EmulatorOptions = EmulatorOptions(), check_finite: bool = False) -> None:
        import secrets
        from socket import gethostname

        from ..host.shm import SharedHeap

        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        if comm is None or comm.Get_size() != cfg.world_size or cfg.world_size < 2:
            got = "no communicator" if comm is None else f"{comm.Get_size()} ranks"
            raise ValueError(f"cfg.world_size={cfg.world_size} needs comm= with that many "
                             f"ranks (got {got}); launch with mpirun -np {cfg.world_size}")
        self.cfg, self.world, self.rank = cfg, cfg.world_size, int(comm.Get_rank())
        self._comm = comm
        problem = None
        try:  # local problems first, then one collective verdict (no rank hangs alone)
            if not isinstance(weights, MoEWeights) or weights.cfg != cfg:
                raise ValueError("weights must be MoEWeights built for this same config")
            missing = sorted(set(cfg.local_experts(self.rank)) - set(weights.expert_ids))
            if missing:
                raise ValueError(f"rank {self.rank} owns experts {missing} but the weights "
                                 "lack them")
            self.grid = _grid(grid, 2)
            timeout = _timeout(timeout_s)
            self.check_finite = bool(check_finite)
            if self.check_finite:
                check_weights_finite(weights)
        except ValueError as exc:
            problem = str(exc)
        check_ranks_agree(comm, cfg, problem)
        hosts = comm.allgather(gethostname())
        if len(set(hosts)) > 1:
            raise ValueError(f"the emulator's symmetric heaps are one node's shared memory, "
                             f"but the ranks run on {sorted(set(hosts))}: run every rank on "
                             "one node")
        self._launcher = _Launcher(cfg, options)
        self._launcher.on_report = self._report_failed
        offsets, self.heap_bytes = _heap_layout(cfg)
        job = comm.bcast(secrets.token_hex(6) if self.rank == 0 else None, root=0)
        names = [f"flashmoe-emu-{job}-pe{r}" for r in range(self.world)]
        mine = SharedHeap(names[self.rank], self.heap_bytes, create=True)  # zeroed
        comm.Barrier()
        try:
            self._heaps = [mine if r == self.rank else SharedHeap(names[r], self.heap_bytes,
                                                                    create=False)
                           for r in range(self.world)]
        finally:
            comm.Barrier()
            mine.unlink()  # every rank mapped every heap: no name is needed any more
        self._pe = _PeBuffers(cfg, weights, self.rank, timeout, mine.array, offsets)
        self._failed: Optional[str] = None
        comm.Barrier()  # every PE's signals are zero before anyone launches

    def _emulated_pes(self) -> list:
        return [self._pe]

    def _report_failed(self) -> None:
        # The peers' launches did not end normally either: recovery is collective.
        self._failed = "the emulator stopped the launch with a report"

    def _spans(self) -> List[BufferSpan]:
        peers = [BufferSpan("heap", h.address, h.nbytes, r, True)
                 for r, h in enumerate(self._heaps) if r != self.rank]
        return self._pe.spans() + peers

    def _run(self, x: np.ndarray, mode: str) -> int:
        if self._failed is not None:
            raise FlashMoEError(f"a previous launch of this expert-parallel layer failed "
                                f"({self._failed}); call recover() on every rank first")
        if not isinstance(x, np.ndarray):
            raise TypeError(f"the emulator takes NumPy arrays, got {type(x).__name__}")
        x, t = staged_input(self.cfg, x, "x", self.check_finite)
        pe = self._pe
        pe.view("x_stage", x.shape, x.dtype)[...] = x
        n = self.world
        # Every PE's grid of the launch is this process's only; the others exit at once.
        self._launcher([pe] * n, [t] * n, [r == self.rank for r in range(n)], mode, self.grid,
                       [pe.ptr("x_stage")] * n, [pe.ptr("y_stage")] * n,
                       [h.array for h in self._heaps], self.heap_bytes, spans=self._spans())
        info = pe.fault_info()
        if info is not None:
            exc = fault_exception(info)
            self._failed = f"{type(exc).__name__}: {exc}"
            raise exc
        return t

    def __call__(self, x: np.ndarray, return_routing: bool = False, routing=None,
                 save_for_backward: bool = False):
        """Forward pass of this rank's tokens (collective: every rank calls it)."""
        if routing is not None or save_for_backward:
            raise ValueError("one PE per process on the emulator runs the forward pass only: "
                             "for given routing or training under expert parallelism use "
                             "EmulatedExpertParallel (every PE in one process)")
        t = self._run(x, "full")
        y = self._pe.view("y_stage", (t, self.cfg.hidden), storage_dtype(self.cfg.dtype)).copy()
        return (y, self.routing(t)) if return_routing else y

    def routing(self, tokens: int) -> Routing:
        """The routing of this rank's last forward pass."""
        return self._pe.routing(tokens)

    def state(self) -> dict:
        """This PE's kernel state words (epoch, barrier, ...)."""
        return self._pe.state()

    def recover(self) -> None:
        """After a failed launch, on every rank (collective): counters cleared, one epoch
        past every epoch used, every peer's previous launch counted as done."""
        words, epoch = recovery_state(self._comm.allgather(self._pe.state()["epoch"]))
        self._pe.recover(words, epoch)
        self._comm.Barrier()
        self._failed = None

    def close(self) -> None:
        """Unmap the heaps (collective: every rank closes)."""
        self._comm.Barrier()
        self._pe = None
        for h in self._heaps:
            h.close()
        self._heaps = []


class _ExpertParallelTesting:
    """``EmulatedExpertParallel.testing``."""

    def __init__(self, ep: EmulatedExpertParallel) -> None:
        self._ep = ep

    def run_mode(self, xs: Sequence[np.ndarray], mode: str) -> None:
        """One pass of a component on every PE: ``gate_only`` or ``dispatch_only``."""
        if mode not in ("gate_only", "dispatch_only"):
            raise ValueError(f"mode={mode!r}: expected gate_only or dispatch_only")
        self._ep._run(xs, (), mode)

    def workspace(self, rank: int, name: str, shape, dtype) -> np.ndarray:
        """A copy of one PE's buffer."""
        return self._ep.pes[rank].view(name, shape, dtype).copy()

    def state(self, rank: int) -> dict:
        """One PE's kernel state words."""
        return self._ep.pes[rank].state()

    def inject_delay(self, rank: int, seconds: float) -> None:
        """Delay every later launch of one PE by ``seconds``."""
        ep = self._ep
        if not 0 <= rank < ep.world or not 0 <= seconds <= 60:
            raise ValueError(f"rank {rank} must be in [0, {ep.world}) and the delay "
                             f"{seconds} s in [0, 60]")
        ep.pes[rank].delay_ns = int(seconds * 1e9)
        ep.pes[rank].make_layout()
