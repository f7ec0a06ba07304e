"""The GPU layer: one persistent fused kernel per forward pass.

    layer = MoELayer(cfg, weights)          # compiles (first time), uploads weights once
    y = layer(x)                            # NumPy in -> NumPy out (copies)
    y = layer(x_gpu, stream=s)              # DLPack GPU tensor in -> same kind out (no copy)
    y, routing = layer(x, return_routing=True)

Inputs are validated before anything is launched. The DLPack path with ``stream=`` is
stream-ordered and never synchronises the host, so it can be captured in a CUDA graph
(pass ``out`` so no allocation happens inside the capture); without ``stream=`` it
returns once the kernel is done, since the consumer's stream is unknown.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .. import env
from ..config import MoEConfig
from ..host import launch as _launch
from ..host import memory
from ..host.abi import (ABI_VERSION, FAULT_RECORD, MODES, STATE, STATE_WORDS, TRACE_RECORD,
                        decode_fault)
from ..host.device import get_device
from ..host.errors import FlashMoEError
from ..host.tensors import export_tensor, is_dlpack_gpu_tensor, view_tensor
from ..kernel.jit import compile_kernel, target_arch
from ..kernel.contract import (check_ranks_agree, check_weights_finite, fault_exception,
                               kernel_weights, layout_record, overlaps, placement_tables,
                               ranks_sharing, recovery_state, tensor_maps, validate_input)
from ..kernel.specs import moe_spec
from .training import GpuTraining
from ..numerics import check_finite, round_to, storage_dtype
from ..kernel.ep import plan_heap
from ..kernel.plan import plan_layer
from ..oracle.reference import Routing, given_routing
from ..weights import MoEWeights, check_weights

__all__ = ["MoELayer"]


class MoELayer(GpuTraining):
    """A Mixture-of-Experts layer on one GPU, or one rank of an expert-parallel layer.

    Parameters
    ----------
    cfg : MoEConfig
        ``cfg.tokens`` is the largest token count a call may carry (per rank).
    weights : MoEWeights
        Uploaded once (transposed to K-major for the tensor cores). One GPU: every
        expert. Several ranks: at least this rank's experts (``cfg.local_experts``).
    device : int, optional
        GPU ordinal (default: one GPU, the current one or 0; several ranks, the node-
        local rank modulo the GPU count).
    timeout_s : float, optional
        Bound of every device-side wait (default ``FLASHMOE_TIMEOUT_S`` or 5 s).
    comm : mpi4py communicator, optional
        Required when ``cfg.world_size > 1``: the ranks sharing the experts (one PE per
        process; NVSHMEM is initialised over it on first use).
    max_blocks : int, optional
        Cap the persistent grid (default: every co-resident block, divided by the number
        of ranks sharing this GPU).
    trace_capacity : int
        Record up to this many task/phase spans per launch (``trace()`` reads them; see
        :mod:`flashmoe_core.gpu.trace`). 0, the default, records nothing.
    backend : {"gpu", "emulator"}
        ``"emulator"`` returns an :class:`~flashmoe_core.emulator.EmulatedMoELayer`: the
        same kernel compiled for the host and run on the CPU emulator (NumPy in and out;
        ``max_blocks`` is its grid, ``emulator_options`` its scheduling knobs).
    emulator_options : EmulatorOptions, optional
        Only with ``backend="emulator"``.
    check_finite : bool
        Refuse non-finite values with a ValueError naming the tensor and its first bad
        element: the weights when the layer is built, ``x`` before every launch (a GPU
        tensor is copied to the host for that, so the call synchronises and cannot be
        captured in a graph). Off by default: then NaN and infinities follow the
        oracle's policy (:mod:`flashmoe_core.oracle.reference`, rules 10-12).
    """

    def __new__(cls, cfg: MoEConfig = None, weights: MoEWeights = None, *args,
                backend: str = "gpu", **kwargs):
        if backend == "gpu":
            if kwargs.get("emulator_options") is not None:
                raise ValueError("emulator_options= is for backend='emulator'")
            return super().__new__(cls)
        if backend != "emulator":
            raise ValueError(f"backend={backend!r}: expected 'gpu' or 'emulator'")
        return _emulated_layer(cfg, weights, *args, **kwargs)

    def __init__(self, cfg: MoEConfig, weights: MoEWeights, device: Optional[int] = None,
                 timeout_s: Optional[float] = None, comm=None,
                 max_blocks: Optional[int] = None, trace_capacity: int = 0,
                 backend: str = "gpu", emulator_options=None, check_finite: bool = False) -> None:
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        check_weights(cfg, weights)
        self.cfg = cfg
        self.world = cfg.world_size
        if self.world > 1:
            if comm is None or comm.Get_size() != self.world:
                got = "no communicator" if comm is None else f"{comm.Get_size()} ranks"
                raise ValueError(f"cfg.world_size={self.world} needs comm= with that many "
                                 f"ranks (got {got}); launch with mpirun -np {self.world}")
            self.rank = int(comm.Get_rank())
        else:
            self.rank = 0
        self.local_ids = cfg.local_experts(self.rank)
        problem = None
        try:
            missing = sorted(set(self.local_ids) - set(weights.expert_ids))
            if missing:
                raise ValueError(f"rank {self.rank} owns experts {missing} but the weights "
                                 "lack them")
            if max_blocks is not None and max_blocks < 2:
                raise ValueError(f"max_blocks={max_blocks} must be at least 2")
            if not 0 <= int(trace_capacity) <= 1 << 26:
                raise ValueError(f"trace_capacity={trace_capacity} must be in [0, 2**26]")
            self._timeout_s = env.timeout_s() if timeout_s is None else float(timeout_s)
            if not 0 < self._timeout_s <= 3600:
                raise ValueError(f"timeout_s={timeout_s} must be in (0, 3600] seconds")
            self.check_finite = bool(check_finite)
            if self.check_finite:
                check_weights_finite(weights)
        except ValueError as exc:
            if self.world == 1:
                raise
            problem = str(exc)
        if self.world > 1:  # collective: every rank fails alike instead of hanging later
            check_ranks_agree(comm, cfg, problem)
        self.trace_capacity = int(trace_capacity)
        self._max_blocks = max_blocks
        self._weights = weights  # the backward uploads its own layouts when first needed
        self.plan = plan_layer(cfg, local_experts=len(self.local_ids))
        self.heap = plan_heap(cfg) if self.world > 1 else None
        self._comm = comm if self.world > 1 else None
        if self._comm is not None and device is None:
            from ..host.device import device_count

            device = _node_rank(self._comm) % max(device_count(), 1)
        self.device = get_device(device)
        sharing = 1
        if self._comm is not None:
            # Ranks that see one GPU each (CUDA_VISIBLE_DEVICES) share nothing: count the
            # ranks on this very GPU, by host and device UUID.
            from socket import gethostname

            keys = self._comm.allgather((gethostname(), str(self.device.uuid)))
            sharing = ranks_sharing(keys, self.rank)
        self._sharing = sharing
        self.arch = target_arch(self.device)
        self._stream = self.device.create_stream()
        self._dtype = storage_dtype(cfg.dtype)
        self._delay_ns = 0
        self._failed = None  # why the layer awaits recover() (expert parallelism)
        self._last_stream = None  # where the last launch ran

        spec = moe_spec(cfg)
        kernel = compile_kernel(spec, self.arch)
        if self.world > 1:
            from ..host import bootstrap

            bootstrap.init(self.device, self._comm, heap_bytes=self._heap_bytes())
        self._module = _launch.Module(kernel.cubin, name="moe_fused", nvshmem=spec.nvshmem)
        abi = int(self._module.read_global("flashmoe_moe_abi", np.uint32)[0])
        if abi != ABI_VERSION:
            raise FlashMoEError(f"kernel ABI {abi} differs from host ABI {ABI_VERSION}; "
                                "clear the kernel cache (FLASHMOE_CACHE_DIR)")
        self._kernel = self._module.kernel("flashmoe_moe_forward")
        # sm_90a builds of 16-bit types load weight tiles by TMA: they read tensor maps.
        self._tma = bool(self._module.read_global("flashmoe_moe_tma", np.int32)[0])
        # Expert parallelism adds two prefix tables over peers to the kernel's tables.
        self.smem = int(self._module.read_global("flashmoe_moe_smem", np.int32)[0]) + \
            (2 * (self.world + 1) * 4 if self.world > 1 else 0)
        self._module.ensure_smem(self._kernel, self.smem, self.device)
        # 128 threads, or 160 in warp-specialised builds (a producer warp beside them).
        self.threads = int(self._module.read_global("flashmoe_moe_threads", np.int32)[0])
        resident, self.blocks_per_sm = _launch.resident_grid(self._kernel, self.device,
                                                             self.threads, self.smem)
        # Ranks sharing a GPU run their kernels side by side: each gets its share of the
        # resident blocks, so that every block of every kernel is resident at once.
        self.grid = max(2, resident // max(sharing, 1))
        if max_blocks is not None:
            self.grid = min(self.grid, int(max_blocks))
        self._check_memory()
        self._buffers = {}
        self._upload_weights(weights.subset(self.local_ids) if self.world > 1 else weights)
        self._allocate_workspace()
        if self.trace_capacity:
            self._buffers["trace"] = memory.alloc(self.device,
                                                  self.trace_capacity * TRACE_RECORD.itemsize,
                                                  self._stream)
        self._fault = memory.PinnedArray(FAULT_RECORD)
        self._layout = self._make_layout()

    # ------------------------------------------------------------------ setup
    def _heap_bytes(self) -> int:
        # Room for every symmetric buffer, the backward's included (allocated at the first
        # backward; the heap's size is set once, when NVSHMEM starts), plus NVSHMEM's own
        # bookkeeping and alignment.
        from ..kernel.plan import plan_backward

        backward = sum(plan_backward(self.cfg, self.cfg.max_local_experts).symmetric.values())
        need = int((self.heap.symmetric_bytes + backward) * 1.05) + 256 * 2**20
        user = env.nvshmem_symmetric_size()
        return max(need, user or 0)

    def _check_memory(self) -> None:
        from cuda.bindings import driver

        from ..host.driver import check

        free, total = check(driver.cuMemGetInfo(), "querying GPU memory")
        need = self.plan.total_bytes if self.heap is None else self.heap.total_bytes
        if need > 0.95 * free:
            table = self.plan.describe() if self.heap is None else self.heap.describe()
            raise FlashMoEError(
                f"the layer needs {need / 2**30:.2f} GiB of GPU memory, {free / 2**30:.2f} GiB "
                f"of {total / 2**30:.2f} GiB is free; lower MoEConfig.tokens (the bound) or "
                f"the layer size\n{table}")

    def describe(self) -> str:
        """Buffers this layer allocates (the --verbose plan)."""
        return self.plan.describe() if self.heap is None else self.heap.describe()

    def _upload(self, name: str, array: np.ndarray) -> None:
        self._buffers[name] = memory.upload(self.device, np.ascontiguousarray(array),
                                            self._stream)

    def _upload_weights(self, w: MoEWeights) -> None:
        for name, array in kernel_weights(w).items():
            self._upload(name, array)
        if self._tma:
            from ..host.tma import encode_tiled

            self._upload("tensor_maps", tensor_maps(self.cfg, self._ptr, encode_tiled,
                                                    len(self.local_ids)))

    def _allocate_workspace(self) -> None:
        if self.heap is None:
            local, symmetric = self.plan.workspace, {}
        else:
            local = {k: v for k, v in self.heap.local.items() if k not in self.plan.weights}
            symmetric = self.heap.symmetric
        for name, nbytes in local.items():
            self._buffers[name] = memory.alloc(self.device, nbytes, self._stream)
        self._symmetric = []
        if symmetric:
            from ..host import bootstrap

            self._stream.sync()
            for name, nbytes in symmetric.items():  # collective: same order on every PE
                self._buffers[name] = buf = bootstrap.symmetric_alloc(nbytes)
                self._symmetric.append(buf)
                memory.zero(buf, self._stream)
            for name, table in placement_tables(self.cfg).items():
                memory.copy_in(self._buffers[name], table, self._stream)
        for name in ("state", "ring", "dep_rowtile", "dep_combine"):
            memory.zero(self._buffers[name], self._stream)
        self._stream.sync()
        if symmetric:
            self._comm.Barrier()  # every PE's signals are zero before anyone launches

    def _ptr(self, name: str) -> int:
        buf = self._buffers.get(name)
        return 0 if buf is None else int(buf.handle)

    def _make_layout(self):
        rec = layout_record(self.cfg, self.plan, self._ptr, fault=self._fault.ptr,
                            timeout_s=self._timeout_s, rank=self.rank,
                            local_experts=len(self.local_ids), delay_ns=self._delay_ns,
                            trace_capacity=self.trace_capacity)
        data = np.frombuffer(rec.tobytes(), np.uint8)
        if getattr(self, "_layout", None) is not None:
            memory.copy_in(self._layout, data, self._stream)
            return self._layout
        return memory.upload(self.device, data, self._stream)

    # ------------------------------------------------------------------ calls
    def _validate(self, shape, dtype, contiguous: bool = True) -> int:
        return validate_input(self.cfg, shape, dtype, contiguous)

    def check_fault(self) -> None:
        """Raise the fault a previous launch recorded, if any (reads pinned memory).

        One GPU: the layer recovers at once. Several ranks: recovery is collective, so
        the layer stays failed (every call raises) until :meth:`recover` has been
        called on every rank.
        """
        if self._failed is not None:
            raise FlashMoEError(f"a previous launch of this expert-parallel layer failed "
                                f"({self._failed}); call layer.recover() on every rank first")
        rec = self._fault.array
        if int(rec["code"][0]) == 0:
            return
        exc = fault_exception(decode_fault(rec.tobytes()))
        if self.world > 1:
            self._failed = f"{type(exc).__name__}: {exc}"
        else:
            self.recover()
        raise exc

    def recover(self) -> None:
        """Make the layer usable again after a failed launch.

        Counters are cleared and the epoch moves past every epoch used so far, on every
        rank alike, so signals a failed launch left in peers' memory (tagged with its
        epoch) can never satisfy a later wait. With several ranks this is collective:
        call it on every rank, after each rank's failed call returned.
        """
        self._sync_streams()  # the failed launch may have run on the caller's stream
        state = memory.download(self._buffers["state"], (STATE_WORDS,), np.uint32,
                                self._stream)
        epochs = [int(state[STATE["epoch"]])]
        if self._comm is not None:
            epochs = self._comm.allgather(epochs[0])
        words, epoch = recovery_state(epochs)
        for name in ("ring", "dep_rowtile", "dep_combine"):
            memory.zero(self._buffers[name], self._stream)
        memory.copy_in(self._buffers["state"], words, self._stream)
        if self._comm is not None:
            # Every peer's previous launch counts as done: the next launch waits for that.
            memory.copy_in(self._buffers["done_sig"], np.full(self.world, epoch, np.uint64),
                           self._stream)
        self._stream.sync()
        if self._comm is not None:
            self._comm.Barrier()
        self._fault.array[...] = np.zeros((), FAULT_RECORD)
        self._failed = None

    def _sync_streams(self) -> None:
        """Wait for the layer's own stream and the one its last launch ran on."""
        self._stream.sync()
        if self._last_stream is not None and self._last_stream is not self._stream:
            self._last_stream.sync()

    def _launch(self, stream, x_ptr: int, y_ptr: int, tokens: int, mode: str) -> None:
        # Launches share the layer's workspace and counters: one on another stream must
        # start after the previous one ended (a capture orders itself).
        if type(stream).__name__ != "GraphBuilder":
            if self._last_stream is not None and self._last_stream is not stream:
                stream.wait(self._last_stream)
            self._last_stream = stream
        cap = self.cfg.capacity(tokens)
        args = (np.uint64(int(self._layout.handle)), np.uint64(x_ptr), np.uint64(y_ptr),
                np.int32(tokens), np.int32(-1 if cap is None else cap), np.int32(MODES[mode]))
        _launch.launch_kernel(stream, self._kernel, (self.grid, 1, 1), (self.threads, 1, 1), args,
                              smem=self.smem)

    def __call__(self, x: Any, out: Any = None, stream: Any = None,
                 return_routing: bool = False, routing=None, save_for_backward: bool = False,
                 recompute: bool = False):
        """Forward pass.

        Parameters
        ----------
        x : numpy.ndarray or DLPack GPU tensor, [t, hidden], the storage dtype
            ``1 <= t <= cfg.tokens``.
        out : same kinds as x, optional
            Where to write y (GPU tensors only); required for CUDA-graph capture.
        stream : cuda.core Stream (or anything with ``__cuda_stream__``), optional
            Stream to run on (DLPack path), which then orders the result for the caller.
            Without it the layer runs on its own stream and returns once the kernel is
            done, since the consumer's stream is unknown.
        return_routing : bool
            Also return the kernel's Routing (synchronises).
        routing : Routing or (experts, weights), optional
            Use these expert ids and combine weights (NumPy [t, top_k]) instead of the
            router, for routers the config cannot express; the capacity rule still
            applies. Validated before launch (ids in range, finite weights). Its
            backward gives ``grads.routing_weights`` and no router gradient.
        save_for_backward : bool
            Run into a save slot and also return a SavedForBackward for
            :meth:`backward` (``y, saved[, routing]``); see :mod:`flashmoe_core.kernel.training`.
        recompute : bool
            With ``save_for_backward``: keep only x and the routing; the backward runs
            the forward again.

        Returns
        -------
        y (and the Routing): NumPy for NumPy input; for GPU input ``out`` if given, else a
        new tensor of x's kind where possible (CuPy, PyTorch, JAX), else a DLPack view.
        """
        if save_for_backward or recompute:
            if not save_for_backward:
                raise ValueError("recompute=True is an option of save_for_backward=True")
            return self._forward_saving(x, recompute, routing, out=out, stream=stream,
                                        return_routing=return_routing)
        self.check_fault()
        given = None
        if routing is not None:
            shape = getattr(x, "shape", None)
            if shape is None or len(shape) != 2:
                raise ValueError("x must be [tokens, hidden] (routing= has a row per token)")
            given = given_routing(self.cfg, routing, int(shape[0]))
        if isinstance(x, np.ndarray):
            return self._call_numpy(x, out, return_routing, given)
        if not is_dlpack_gpu_tensor(x):
            raise TypeError(f"x must be a NumPy array or a DLPack GPU tensor, got "
                            f"{type(x).__name__}")
        return self._call_device(x, out, stream, return_routing, given)

    def _forward(self, stream, x_ptr: int, y_ptr: int, tokens: int, given=None) -> None:
        """The full pass, on the router's routing or the caller's ``given`` (experts,
        weights)."""
        if given is None:
            self._launch(stream, x_ptr, y_ptr, tokens, "full")
            return
        experts, weights = given
        memory.copy_in(self._buffers["topk_expert"], experts, stream)
        memory.copy_in(self._buffers["topk_weight"], weights, stream)
        self._launch(stream, x_ptr, y_ptr, tokens, "routed")

    def _call_numpy(self, x: np.ndarray, out, return_routing: bool, given=None):
        if out is not None:
            raise ValueError("out= is for GPU tensors; NumPy input returns a new array")
        if self.cfg.dtype == "tfloat32" and x.dtype == np.float32:
            x = round_to(x, "tfloat32")
        t = self._validate(x.shape, x.dtype)
        if self.check_finite:
            check_finite("x", x)
        x = np.ascontiguousarray(x)
        memory.copy_in(self._buffers["x_stage"], x, self._stream)
        self._forward(self._stream, self._ptr("x_stage"), self._ptr("y_stage"), t, given)
        y = memory.download(self._buffers["y_stage"], (t, self.cfg.hidden), self._dtype,
                            self._stream)
        self.check_fault()
        if return_routing:
            return y, self.routing(t)
        return y

    def _call_device(self, x, out, stream, return_routing: bool, given=None):
        s, stream_ptr, capturing = _resolve_stream(self.device, self._stream, stream)
        if capturing and (out is None or return_routing):
            raise ValueError("while capturing a CUDA graph pass out= (no allocation inside "
                             "the capture) and return_routing=False (no synchronisation)")
        if capturing and self.check_finite:
            raise ValueError("check_finite=True copies x to the host to check it, which a "
                             "CUDA graph capture cannot do; build the layer without it")
        xv = view_tensor(x, stream_ptr)
        t = self._validate(xv.shape, xv.dtype, xv.is_c_contiguous)
        self._check_device(xv, "x")
        if self.check_finite:
            check_finite("x", memory.download_from(xv.ptr, xv.shape, xv.dtype, s))
        if out is not None:
            if not is_dlpack_gpu_tensor(out):
                raise TypeError("out must be a DLPack GPU tensor like x")
            ov = view_tensor(out, stream_ptr)
            if tuple(ov.shape) != (t, self.cfg.hidden) or ov.dtype != self._dtype or \
                    not ov.is_c_contiguous or ov.readonly:
                raise ValueError(f"out must be a writable C-contiguous [{t}, {self.cfg.hidden}] "
                                 f"{self._dtype} tensor; got {ov.shape} {ov.dtype}")
            self._check_device(ov, "out")
            nbytes = t * self.cfg.hidden * self._dtype.itemsize
            if overlaps(xv.ptr, nbytes, ov.ptr, nbytes):
                raise ValueError("out overlaps x: the kernel reads x until its last task, "
                                 "so it cannot write y over it; pass a separate out tensor")
            y_ptr, result = ov.ptr, out
        else:
            buf = memory.alloc(self.device, t * self.cfg.hidden * self._dtype.itemsize, s)
            y_ptr, result = int(buf.handle), None
        self._forward(s, xv.ptr, y_ptr, t, given)
        if stream is None or return_routing:
            s.sync()  # no consumer stream to order the result on: finish here
            self.check_fault()
        if result is None:
            result = export_tensor(buf, (t, self.cfg.hidden), self._dtype, like=x)
        if return_routing:
            return result, self.routing(t)
        return result

    def _check_device(self, view, name: str) -> None:
        if view.device_id != self.device.device_id:
            raise ValueError(f"{name} lives on GPU {view.device_id}; this layer runs on GPU "
                             f"{self.device.device_id}")
        if view.ptr % 16:
            raise ValueError(f"{name} must be 16-byte aligned (it is at {view.ptr:#x})")

    def routing(self, tokens: int) -> Routing:
        """The routing of the last forward pass of ``tokens`` tokens (synchronises)."""
        k = self.cfg.top_k
        s = self._stream
        experts = memory.download(self._buffers["topk_expert"], (tokens, k), np.int32, s)
        weights = memory.download(self._buffers["topk_weight"], (tokens, k), np.float32, s)
        rows = memory.download(self._buffers["token_rows"], (tokens, k), np.int32, s)
        return Routing(experts, weights, rows >= 0)

    def synchronize(self) -> None:
        """Wait for the layer's launches and raise any fault its kernels recorded."""
        self._sync_streams()
        self.check_fault()

    @property
    def stream(self):
        """The layer's own stream."""
        return self._stream

    @property
    def testing(self) -> "LayerTesting":
        """Test, benchmark and fault-injection hooks (staged buffers, components on their
        own, workspace access, state words); not part of the everyday interface."""
        return LayerTesting(self)

    def trace(self) -> np.ndarray:
        """The last launch's task and phase records (synchronises); see flashmoe_core.gpu.trace."""
        if not self.trace_capacity:
            raise ValueError("this layer records no trace; build it with trace_capacity > 0")
        n = min(self.testing.state()["traced"], self.trace_capacity)
        return self.testing.workspace("trace", (n,), TRACE_RECORD)

    def close(self) -> None:
        """Free the layer's GPU memory. With several ranks this is collective: every
        rank must close its layer."""
        if not self._buffers:
            return
        self._stream.sync()
        self._close_training()
        sym = {id(b) for b in getattr(self, "_symmetric", [])}
        for buf in self._buffers.values():
            if id(buf) not in sym:
                buf.close()
        if sym:
            import nvshmem.core as shmem

            self._comm.Barrier()
            for buf in self._symmetric:
                shmem.free(buf)
            self._symmetric = []
        self._buffers.clear()
        self._fault.close()
        self._module.close()


class LayerTesting:
    """The hooks of ``MoELayer.testing``: what tests, benchmarks and fault injection
    need from a layer beyond a forward pass."""

    def __init__(self, layer: MoELayer) -> None:
        self._layer = layer

    def stage(self, x: np.ndarray) -> int:
        """Copy x into the layer's input buffer; returns its token count."""
        L = self._layer
        t = L._validate(x.shape, x.dtype)
        memory.copy_in(L._buffers["x_stage"], np.ascontiguousarray(x), L._stream)
        return t

    def launch(self, tokens: int, mode: str = "full", stream=None) -> None:
        """Launch on the staged input and output buffers, stream-ordered."""
        L = self._layer
        L._launch(L._stream if stream is None else stream, L._ptr("x_stage"), L._ptr("y_stage"),
                  tokens, mode)

    def output(self, tokens: int) -> np.ndarray:
        """The staged output buffer as NumPy (synchronises, raises recorded faults)."""
        L = self._layer
        y = memory.download(L._buffers["y_stage"], (tokens, L.cfg.hidden), L._dtype, L._stream)
        L.check_fault()
        return y

    def buffer_ptr(self, name: str) -> int:
        """Device address of a weight or workspace buffer (plan names)."""
        L = self._layer
        if name not in L._buffers:
            raise KeyError(f"no buffer {name!r}; known: {sorted(L._buffers)}")
        return L._ptr(name)

    def run_mode(self, x: np.ndarray, mode: str) -> None:
        """Run a component on its own: ``gate_only`` or ``dispatch_only``."""
        t = self.stage(x)
        self.launch(t, mode)
        self._layer.synchronize()

    def workspace(self, name: str, shape, dtype) -> np.ndarray:
        """Copy a workspace buffer out."""
        L = self._layer
        return memory.download(L._buffers[name], shape, dtype, L._stream)

    def fill_workspace(self, name: str, array: np.ndarray) -> None:
        """Copy an array into a workspace buffer."""
        L = self._layer
        memory.copy_in(L._buffers[name], np.ascontiguousarray(array), L._stream)

    def combine_only(self, tokens: int) -> np.ndarray:
        """Run only the combine on token_rows/topk_weight/y_expert as filled."""
        L = self._layer
        L._launch(L._stream, 0, L._ptr("y_stage"), tokens, "combine_only")
        return self.output(tokens)

    def state(self) -> dict:
        """The kernel's state words (epoch, counters)."""
        L = self._layer
        words = memory.download(L._buffers["state"], (STATE_WORDS,), np.uint32, L._stream)
        return {k: int(words[v]) for k, v in STATE.items()}

    def inject_delay(self, seconds: float) -> None:
        """Delay every later launch of this rank by ``seconds`` (fault injection)."""
        if not 0 <= seconds <= 60:
            raise ValueError(f"delay {seconds} s must be in [0, 60]")
        L = self._layer
        L._delay_ns = int(seconds * 1e9)
        L._stream.sync()
        L._layout = L._make_layout()

    def inject_backward_delay(self, seconds: float) -> None:
        """Delay every later backward launch of this rank by ``seconds``."""
        self._layer._inject_backward_delay(seconds)

    def training_launches(self, x: np.ndarray, dy: np.ndarray):
        """(forward, backward) callables that launch a saving forward of staged ``x`` and
        its backward for staged ``dy`` on the layer's stream (benchmarks)."""
        return self._layer._training_launches(x, dy)


def _emulated_layer(cfg, weights, device=None, timeout_s=None, comm=None, max_blocks=None,
                    trace_capacity=0, emulator_options=None, check_finite=False):
    from ..emulator import DEFAULT_GRID, EmulatedMoELayer, EmulatedRank, EmulatorOptions

    multi = isinstance(cfg, MoEConfig) and cfg.world_size > 1
    if multi and comm is None:
        raise ValueError("the emulator runs expert parallelism either with one PE per MPI "
                         "process (pass comm=, launch with mpirun -np world_size) or with "
                         "every PE in one process: flashmoe_core.emulator."
                         "EmulatedExpertParallel(cfg, weights)")
    unused = [name for name, v in (("device", device),) if v is not None]
    if comm is not None and not multi:
        unused.append("comm")
    if trace_capacity:
        unused.append("trace_capacity")
    if unused:
        raise ValueError(f"{', '.join(unused)} do not apply to backend='emulator'")
    options = emulator_options or EmulatorOptions()
    if multi:
        return EmulatedRank(cfg, weights, comm, grid=3 if max_blocks is None else max_blocks,
                            timeout_s=timeout_s, options=options, check_finite=check_finite)
    return EmulatedMoELayer(cfg, weights, grid=DEFAULT_GRID if max_blocks is None else max_blocks,
                            timeout_s=timeout_s, options=options, check_finite=check_finite)


def _node_rank(comm) -> int:
    """The calling rank's index among the ranks of its node."""
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return node.Get_rank()
    finally:
        node.Free()


def _resolve_stream(device, default, stream):
    """(launch target, consumer stream pointer for DLPack, capturing a graph?)."""
    if stream is None:
        return default, int(default.handle), False
    from cuda.core import Stream

    if type(stream).__name__ == "GraphBuilder":
        return stream, -1, True  # ordering inside a capture is the capturer's business
    if isinstance(stream, Stream):
        return stream, int(stream.handle), False
    if hasattr(stream, "__cuda_stream__"):
        s = device.create_stream(stream)
        return s, int(s.handle), False
    raise TypeError(f"stream must be a cuda.core Stream or GraphBuilder, or expose "
                    f"__cuda_stream__; got {type(stream).__name__}")
