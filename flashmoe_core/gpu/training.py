"""The backward pass on the GPU: :class:`~flashmoe_core.gpu.layer.MoELayer`'s training hooks.

Save slots are device buffers of their own (routing, compact rows, ``z``, ``y_expert``,
pre-activations, a copy of ``x``), each with its own MoeLayout in device memory: a
saving forward launches the same forward kernel with the slot's layout, so nothing is
copied afterwards. The backward kernel, its weights (the user layouts, a second copy
of the weights) and its workspace are built at the first backward.

Expert parallelism: the owners put results into the layer's symmetric ``y_expert``,
so a saving forward's layout keeps that one and a stream-ordered device copy moves it
into the slot after the launch (peers write it again only after this rank's next
dispatch, which that copy precedes); the rows the rank received as an owner go into
the slot inside the launch (a peer may send its next rows as soon as the launch is
done). The backward's symmetric buffers (``dxe``, ``dxe_remote``) are allocated
collectively at the first backward, in room the heap reserved for them; every rank
must then run its backward (each one's gradients hold its own experts and its partial
router gradient over its own tokens: sum those over ranks, as for any replicated
weight).

NumPy in, NumPy out (copies, synchronising), or DLPack GPU tensors in and tensors of
the same kind out, stream-ordered like the forward: with ``stream=`` nothing
synchronises the host; without it the call returns once the kernel is done.
"""

from __future__ import annotations


import numpy as np

from ..kernel.training import (MoEGradients, TrainingMixin, backward_layout_record,
                               backward_weights, check_grad_output, grad_pointer_names,
                               gradient_shapes, routing_equal)
from ..host import memory
from ..host.abi import ABI_VERSION
from ..host.errors import FlashMoEError
from ..numerics import check_finite, round_to
from ..kernel.plan import SAVED_ROUTING, plan_backward, saved_buffers
from ..oracle.reference import Routing

__all__ = ["GpuTraining"]

_F32 = np.dtype(np.float32)


class _GpuSlot:
    """One save slot: device buffers and the MoeLayout that points at them."""

    def __init__(self, layer, recompute: bool) -> None:
        self.kind = "light" if recompute else "full"
        self.owner = None
        self.nbytes = saved_buffers(layer.cfg, recompute)
        self.buf = {n: memory.alloc(layer.device, b, layer._stream)
                    for n, b in self.nbytes.items()}
        self._layouts = {}  # "save" / "use" -> [record bytes, device buffer]

    def ptr(self, name: str) -> int:
        return int(self.buf[name].handle)

    def layout_ptr(self, layer, saving: bool = False) -> int:
        """The slot's MoeLayout (the layer's, with this slot's per-call buffers). With
        expert parallelism a saving forward's keeps the layer's symmetric y_expert,
        which peers put into (copied into the slot after the launch)."""
        from ..kernel.contract import layout_record

        keep = {"y_expert"} if saving and layer.world > 1 else set()
        key = "save" if keep else "use"
        rec = layout_record(layer.cfg, layer.plan,
                            lambda n: self.ptr(n) if n in self.buf and n not in keep
                            else layer._ptr(n),
                            fault=layer._fault.ptr, timeout_s=layer._timeout_s, rank=layer.rank,
                            local_experts=len(layer.local_ids), delay_ns=layer._delay_ns,
                            trace_capacity=layer.trace_capacity).tobytes()
        entry = self._layouts.setdefault(key, [None, None])
        if rec != entry[0]:  # first use, or the layer's layout changed (delays)
            data = np.frombuffer(rec, np.uint8)
            if entry[1] is None:
                entry[1] = memory.upload(layer.device, data, layer._stream)
            else:
                layer._sync_streams()
                memory.copy_in(entry[1], data, layer._stream)
            entry[0] = rec
        return int(entry[1].handle)

    def routing(self, layer, tokens: int) -> dict:
        k, s = layer.cfg.top_k, layer._stream
        shapes = {"topk_expert": ((tokens, k), np.int32), "topk_weight": ((tokens, k), np.float32),
                  "token_rows": ((tokens, k), np.int32), "row_token": ((tokens * k,), np.int32),
                  "expert_kept": ((layer.cfg.experts,), np.int32),
                  "tile_kept": ((-(-tokens // 128),), np.int32)}
        return {n: memory.download(self.buf[n], *shapes[n], s) for n in SAVED_ROUTING}

    def close(self) -> None:
        for b in self.buf.values():
            b.close()
        for _, layout in self._layouts.values():
            if layout is not None:
                layout.close()
        self.buf, self._layouts = {}, {}


class GpuTraining(TrainingMixin):
    """Training hooks of MoELayer (one GPU, or one rank of an expert-parallel layer)."""

    _bw = None  # the backward's kernel, buffers and layout, once a backward ran
    _backward_delay_ns = 0  # injected (fault tests)

    # ------------------------------------------------------------------ hooks
    def _expert_ids(self):
        return tuple(self.local_ids)

    def _tr_make_slot(self, recompute: bool) -> _GpuSlot:
        return _GpuSlot(self, recompute)

    def _order_on(self, stream) -> None:
        # One layer's launches share its workspace and state words: a launch on another
        # stream starts after the previous one (a graph capture orders itself).
        if type(stream).__name__ != "GraphBuilder":
            if self._last_stream is not None and self._last_stream is not stream:
                stream.wait(self._last_stream)
            self._last_stream = stream

    def _forward_slot(self, stream, slot: _GpuSlot, x_ptr: int, y_ptr: int, tokens: int,
                      mode: str = "full") -> None:
        from ..host import launch as _launch
        from ..host.abi import MODES

        layout = slot.layout_ptr(self, saving=True)
        self._order_on(stream)
        cap = self.cfg.capacity(tokens)
        args = (np.uint64(layout), np.uint64(x_ptr), np.uint64(y_ptr), np.int32(tokens),
                np.int32(-1 if cap is None else cap), np.int32(MODES[mode]))
        _launch.launch_kernel(stream, self._kernel, (self.grid, 1, 1), (128, 1, 1), args,
                              smem=self.smem)
        if self.world > 1 and "y_expert" in slot.buf:  # the owners' results, into the slot
            memory.copy_device(slot.ptr("y_expert"), self._ptr("y_expert"),
                               slot.nbytes["y_expert"], stream)

    def _tr_forward(self, x, slot: _GpuSlot, out=None, stream=None, return_routing: bool = False,
                    given=None):
        from ..host.tensors import export_tensor, is_dlpack_gpu_tensor, view_tensor
        from .layer import _resolve_stream, overlaps

        self.check_fault()
        h, nb = self.cfg.hidden, self._dtype.itemsize
        mode = "full" if given is None else "routed"

        def put_given(stream_) -> None:  # the caller's experts and weights, into the slot
            if given is not None:
                memory.copy_in(slot.buf["topk_expert"], np.ascontiguousarray(given[0], np.int32),
                               stream_)
                memory.copy_in(slot.buf["topk_weight"],
                               np.ascontiguousarray(given[1], np.float32), stream_)

        if isinstance(x, np.ndarray):
            if out is not None or stream is not None:
                raise ValueError("out= and stream= are for GPU tensors; NumPy input returns "
                                 "NumPy")
            if self.cfg.dtype == "tfloat32" and x.dtype == np.float32:
                x = round_to(x, "tfloat32")
            t = self._validate(x.shape, x.dtype)
            if self.check_finite:
                check_finite("x", x)
            memory.copy_in(slot.buf["x"], np.ascontiguousarray(x), self._stream)
            put_given(self._stream)
            self._forward_slot(self._stream, slot, slot.ptr("x"), self._ptr("y_stage"), t, mode)
            y = memory.download(self._buffers["y_stage"], (t, h), self._dtype, self._stream)
            self.check_fault()
        else:
            if not is_dlpack_gpu_tensor(x):
                raise TypeError(f"x must be a NumPy array or a DLPack GPU tensor, got "
                                f"{type(x).__name__}")
            s, stream_ptr, capturing = _resolve_stream(self.device, self._stream, stream)
            if capturing and (out is None or return_routing):
                raise ValueError("while capturing a CUDA graph pass out= and "
                                 "return_routing=False")
            xv = view_tensor(x, stream_ptr)
            t = self._validate(xv.shape, xv.dtype, xv.is_c_contiguous)
            self._check_device(xv, "x")
            if self.check_finite:
                if capturing:
                    raise ValueError("check_finite=True copies x to the host to check it, "
                                     "which a CUDA graph capture cannot do; build the layer "
                                     "without it")
                check_finite("x", memory.download_from(xv.ptr, xv.shape, xv.dtype, s))
            if out is not None:
                ov = view_tensor(out, stream_ptr)
                if tuple(ov.shape) != (t, h) or ov.dtype != self._dtype or \
                        not ov.is_c_contiguous or ov.readonly:
                    raise ValueError(f"out must be a writable C-contiguous [{t}, {h}] "
                                     f"{self._dtype} tensor; got {ov.shape} {ov.dtype}")
                self._check_device(ov, "out")
                if overlaps(xv.ptr, t * h * nb, ov.ptr, t * h * nb):
                    raise ValueError("out overlaps x; pass a separate out tensor")
                y_ptr, y = ov.ptr, out
            else:
                buf = memory.alloc(self.device, t * h * nb, s)
                y_ptr, y = int(buf.handle), None
            # The slot keeps its own x: the caller may reuse theirs before the backward.
            self._order_on(s)
            memory.copy_device(slot.ptr("x"), xv.ptr, t * h * nb, s)
            put_given(s)
            self._forward_slot(s, slot, slot.ptr("x"), y_ptr, t, mode)
            if stream is None or return_routing:
                s.sync()
                self.check_fault()
            if y is None:
                y = export_tensor(buf, (t, h), self._dtype, like=x)
        extra = ()
        if return_routing:
            r = slot.routing(self, t)
            extra = (Routing(r["topk_expert"], r["topk_weight"], r["token_rows"] >= 0),)
        return y, t, extra

    # ------------------------------------------------------------------ backward
    def _ensure_backward(self):
        if self._bw is not None:
            return self._bw
        import types

        from ..host import launch as _launch
        from ..kernel.jit import compile_kernel
        from ..kernel.specs import moe_backward_spec

        ep = self.world > 1
        plan = plan_backward(self.cfg, len(self.local_ids))
        module, problem = None, None
        try:
            module = _launch.Module(compile_kernel(moe_backward_spec(self.cfg), self.arch).cubin,
                                    name="moe_backward", nvshmem=ep)
            abi = int(module.read_global("flashmoe_moe_backward_abi", np.uint32)[0])
            if abi != ABI_VERSION:
                raise FlashMoEError(f"backward kernel ABI {abi} differs from host ABI "
                                    f"{ABI_VERSION}; clear the kernel cache (FLASHMOE_CACHE_DIR)")
            kernel = module.kernel("flashmoe_moe_backward")
            # Expert parallelism adds the forward's two prefix tables over peers.
            smem = int(module.read_global("flashmoe_moe_backward_smem", np.int32)[0]) + \
                (2 * (self.world + 1) * 4 if ep else 0)
            module.ensure_smem(kernel, smem, self.device)
            resident, _ = _launch.resident_grid(kernel, self.device, 128, smem)
            # Ranks sharing a GPU run side by side, as in the forward.
            grid = max(2, resident // max(self._sharing, 1))
            if self._max_blocks is not None:
                grid = min(grid, self._max_blocks)
            self._check_backward_memory(plan)
        except Exception as exc:  # noqa: BLE001 (with peers: report, never leave them waiting)
            if not ep:
                raise
            problem = f"{type(exc).__name__}: {exc}"
        if ep:  # collective: no rank goes on to allocate symmetric memory alone
            failed = [(r, p) for r, p in enumerate(self._comm.allgather(problem)) if p]
            if failed:
                if module is not None:
                    module.close()
                raise FlashMoEError("building the expert-parallel backward failed on rank(s) " +
                                    "; ".join(f"{r}: {p}" for r, p in failed))
        buf = {n: memory.alloc(self.device, b, self._stream) for n, b in plan.workspace.items()}
        buf.update({f"g_{n}": memory.alloc(self.device, int(np.prod(s)) * 4, self._stream)
                    for n, s in gradient_shapes(self.cfg, len(self.local_ids)).items()})
        memory.zero(buf["ring"], self._stream)
        symmetric = []
        if ep:
            from ..host import bootstrap

            self._stream.sync()
            for name, nbytes in plan.symmetric.items():  # collective: same order everywhere
                buf[name] = b = bootstrap.symmetric_alloc(nbytes)
                symmetric.append(b)
                memory.zero(b, self._stream)
            self._stream.sync()
            self._comm.Barrier()
        self._bw = types.SimpleNamespace(plan=plan, buf=buf, module=module, kernel=kernel,
                                         smem=smem, grid=grid, delay_ns=self._backward_delay_ns,
                                         scratch=None, layout=None, symmetric=symmetric)
        self._upload_backward_weights(self._weights)
        return self._bw

    def _check_backward_memory(self, plan) -> None:
        from cuda.bindings import driver

        from ..host.driver import check

        free, _ = check(driver.cuMemGetInfo(), "querying GPU memory")
        grads_bytes = sum(int(np.prod(s)) * 4
                          for s in gradient_shapes(self.cfg, len(self.local_ids)).values())
        # The symmetric part lives in the heap the layer reserved at its start.
        need = plan.total_bytes - sum(plan.symmetric.values()) + grads_bytes + \
            self.saved_bytes()
        if need > 0.95 * free:
            raise FlashMoEError(f"the backward needs {need / 2**30:.2f} GiB of GPU memory "
                                f"(workspace, a second copy of the weights, one save slot), "
                                f"{free / 2**30:.2f} GiB is free; lower MoEConfig.tokens")

    def _upload_backward_weights(self, w) -> None:
        bw = self._bw
        local = w.subset(self.local_ids) if self.world > 1 else w
        for name, a in backward_weights(local).items():
            if name in bw.buf:
                memory.copy_in(bw.buf[name], np.ascontiguousarray(a), self._stream)
            else:
                bw.buf[name] = memory.upload(self.device, np.ascontiguousarray(a), self._stream)
        self._make_backward_layout()

    def _make_backward_layout(self) -> None:
        bw = self._bw
        rec = backward_layout_record(bw.plan,
                                     lambda n: int(bw.buf[n].handle) if n in bw.buf else 0,
                                     delay_ns=bw.delay_ns)
        data = np.frombuffer(rec.tobytes(), np.uint8)
        if bw.layout is None:
            bw.layout = memory.upload(self.device, data, self._stream)
        else:
            self._sync_streams()
            memory.copy_in(bw.layout, data, self._stream)

    def _launch_backward(self, stream, slot_layout: int, x_ptr: int, dy_ptr: int, dx_ptr: int,
                         grad_ptrs, tokens: int, flags: int) -> None:
        from ..host import launch as _launch

        bw = self._bw
        self._order_on(stream)
        args = (np.uint64(slot_layout), np.uint64(int(bw.layout.handle)), np.uint64(x_ptr),
                np.uint64(dy_ptr), np.uint64(dx_ptr), *(np.uint64(p) for p in grad_ptrs),
                np.int32(tokens), np.int32(flags))
        _launch.launch_kernel(stream, bw.kernel, (bw.grid, 1, 1), (128, 1, 1), args,
                              smem=bw.smem)

    def _forward_source(self, stream, slot: _GpuSlot, tokens: int, check: bool) -> _GpuSlot:
        """The full slot the backward reads: the saved one, or (recompute) a scratch slot
        the forward runs into again from the saved x."""
        if slot.kind == "full":
            return slot
        bw = self._bw
        if bw.scratch is None:
            bw.scratch = _GpuSlot(self, recompute=False)
        self._forward_slot(stream, bw.scratch, slot.ptr("x"), self._ptr("y_stage"), tokens)
        if check:  # synchronising callers only: compare the routing (it must be the same)
            stream.sync()
            self.check_fault()
            if not routing_equal(bw.scratch.routing(self, tokens), slot.routing(self, tokens)):
                raise FlashMoEError("the recomputed forward routed differently from the saved "
                                    "one: the forward kernel is not deterministic here (a bug)")
        return bw.scratch

    def _grad_order(self):
        return grad_pointer_names(self.cfg)

    def _tr_backward(self, dy, slot: _GpuSlot, tokens: int, grads_out, flags: int,
                     stream=None):
        from ..host.tensors import export_tensor, is_dlpack_gpu_tensor, view_tensor
        from .layer import _resolve_stream

        self.check_fault()
        cfg, h = self.cfg, self.cfg.hidden
        bw = self._ensure_backward()
        accumulate = bool(flags & 1)
        rw_shape = (tokens, cfg.top_k)
        if isinstance(dy, np.ndarray):
            if stream is not None:
                raise ValueError("stream= is for GPU tensors; NumPy dy returns NumPy")
            check_grad_output(cfg, dy.shape, dy.dtype, tokens)
            if grads_out is not None and not all(isinstance(a, np.ndarray)
                                                 for a in grads_out.arrays().values()):
                raise ValueError("with NumPy dy, grads_out must hold NumPy arrays")
            s = self._stream
            src = self._forward_source(s, slot, tokens, check=True)
            memory.copy_in(bw.buf["dy_stage"], np.ascontiguousarray(dy), s)
            if accumulate:
                for n, a in grads_out.arrays().items():
                    memory.copy_in(bw.buf[f"g_{n}"], np.ascontiguousarray(a, np.float32), s)
            ptrs = [0 if n is None else int(bw.buf[f"g_{n}"].handle) for n in self._grad_order()]
            self._launch_backward(s, src.layout_ptr(self), slot.ptr("x"),
                                  int(bw.buf["dy_stage"].handle), int(bw.buf["dx_stage"].handle),
                                  ptrs, tokens, flags)
            dx = memory.download(bw.buf["dx_stage"], (tokens, h), self._dtype, s)
            self.check_fault()
            shapes = gradient_shapes(cfg, len(self.local_ids))
            got = {n: memory.download(bw.buf[f"g_{n}"], shapes[n], np.float32, s) for n in shapes}
            if grads_out is None:
                grads = MoEGradients(cfg.mlp, self._expert_ids(), **got)
            else:
                grads = grads_out
                for n, a in grads_out.arrays().items():
                    a[...] = got[n]
            if flags & 2:
                grads.routing_weights = memory.download(bw.buf["d_weights"], rw_shape,
                                                        np.float32, s)
            return dx, grads
        if not is_dlpack_gpu_tensor(dy):
            raise TypeError(f"dy must be a NumPy array or a DLPack GPU tensor, got "
                            f"{type(dy).__name__}")
        s, stream_ptr, capturing = _resolve_stream(self.device, self._stream, stream)
        if capturing and grads_out is None:
            raise ValueError("while capturing a CUDA graph pass grads_out= (no allocation "
                             "inside the capture)")
        dv = view_tensor(dy, stream_ptr)
        check_grad_output(cfg, dv.shape, dv.dtype, tokens, dv.is_c_contiguous)
        self._check_device(dv, "dy")
        shapes = gradient_shapes(cfg, len(self.local_ids))
        owned = {}
        if grads_out is None:
            owned = {n: memory.alloc(self.device, int(np.prod(sh)) * 4, s)
                     for n, sh in shapes.items()}
            gptr = {n: int(b.handle) for n, b in owned.items()}
        else:
            gptr = {}
            for n, a in grads_out.arrays().items():
                if not is_dlpack_gpu_tensor(a):
                    raise ValueError(f"with GPU dy, grads_out.{n} must be a DLPack GPU tensor")
                v = view_tensor(a, stream_ptr)
                if tuple(v.shape) != shapes[n] or v.dtype != _F32 or not v.is_c_contiguous \
                        or v.readonly:
                    raise ValueError(f"grads_out.{n} must be a writable C-contiguous "
                                     f"{list(shapes[n])} float32 tensor; got {v.shape} {v.dtype}")
                self._check_device(v, f"grads_out.{n}")
                gptr[n] = v.ptr
        dx_buf = memory.alloc(self.device, tokens * h * self._dtype.itemsize, s)
        src = self._forward_source(s, slot, tokens, check=False)
        ptrs = [0 if n is None else gptr[n] for n in self._grad_order()]
        self._launch_backward(s, src.layout_ptr(self), slot.ptr("x"), dv.ptr, int(dx_buf.handle),
                              ptrs, tokens, flags)
        rw = None
        if flags & 2:  # out of the layer's workspace, before the next backward reuses it
            nbytes = tokens * cfg.top_k * 4
            rw = memory.alloc(self.device, nbytes, s)
            memory.copy_device(int(rw.handle), int(bw.buf["d_weights"].handle), nbytes, s)
        if stream is None:
            s.sync()
            self.check_fault()
        dx = export_tensor(dx_buf, (tokens, h), self._dtype, like=dy)
        if grads_out is None:
            grads = MoEGradients(cfg.mlp, self._expert_ids(), **{
                n: export_tensor(b, shapes[n], _F32, like=dy) for n, b in owned.items()})
        else:
            grads = grads_out
        if rw is not None:
            grads.routing_weights = export_tensor(rw, rw_shape, _F32, like=dy)
        return dx, grads

    def _training_launches(self, x: np.ndarray, dy: np.ndarray):
        """(forward, backward): launches on the layer's stream over staged buffers, for
        timing (a saving forward into one slot, the backward of that slot into the
        layer's own gradient buffers); nothing synchronises."""
        t = self._validate(x.shape, x.dtype)
        check_grad_output(self.cfg, dy.shape, dy.dtype, t)
        bw = self._ensure_backward()
        slot = self.__dict__.setdefault("_timing_slot", _GpuSlot(self, recompute=False))
        memory.copy_in(slot.buf["x"], np.ascontiguousarray(x), self._stream)
        memory.copy_in(bw.buf["dy_stage"], np.ascontiguousarray(dy), self._stream)
        ptrs = [0 if n is None else int(bw.buf[f"g_{n}"].handle) for n in self._grad_order()]
        s = self._stream

        def forward():
            self._forward_slot(s, slot, slot.ptr("x"), self._ptr("y_stage"), t)

        def backward():
            self._launch_backward(s, slot.layout_ptr(self), slot.ptr("x"),
                                  int(bw.buf["dy_stage"].handle), int(bw.buf["dx_stage"].handle),
                                  ptrs, t, False)
        return forward, backward

    # ------------------------------------------------------------------ weights
    def set_weights(self, weights) -> None:
        """Replace the layer's weights (same config, stream-ordered after every launch so
        far): the forward's copies and, once a backward ran, the backward's. Saved
        forwards of the old weights can no longer run their backward."""
        from ..kernel.contract import kernel_weights
        from ..weights import MoEWeights

        if not isinstance(weights, MoEWeights) or weights.cfg != self.cfg:
            raise ValueError("weights must be MoEWeights built for this same config")
        missing = sorted(set(self.local_ids) - set(weights.expert_ids))
        if missing:
            raise ValueError(f"rank {self.rank} owns experts {missing} but the weights lack them")
        self._sync_streams()
        local = weights.subset(self.local_ids) if self.world > 1 else weights
        for name, array in kernel_weights(local).items():
            memory.copy_in(self._buffers[name], np.ascontiguousarray(array), self._stream)
        self._weights = weights
        self._weights_version += 1
        if self._bw is not None:
            self._upload_backward_weights(weights)

    def _inject_backward_delay(self, seconds: float) -> None:
        if not 0 <= seconds <= 60:
            raise ValueError(f"delay {seconds} s must be in [0, 60]")
        self._backward_delay_ns = int(seconds * 1e9)
        if self._bw is not None:  # else the first backward builds with it (building is
            self._bw.delay_ns = self._backward_delay_ns  # collective: one rank may not)
            self._make_backward_layout()

    def _close_training(self) -> None:
        """Free the save slots and the backward's buffers (MoELayer.close)."""
        pool = self.__dict__.get("_slot_pool")
        if pool is not None:
            for slot in pool.drain():
                slot.close()
        timing = self.__dict__.pop("_timing_slot", None)
        if timing is not None:
            timing.close()
        bw, self._bw = self._bw, None
        if bw is not None:
            if bw.scratch is not None:
                bw.scratch.close()
            sym = {id(b) for b in bw.symmetric}
            for b in bw.buf.values():
                if id(b) not in sym:
                    b.close()
            if bw.symmetric:  # collective, as the layer's own symmetric buffers
                import nvshmem.core as shmem

                self._comm.Barrier()
                for b in bw.symmetric:
                    shmem.free(b)
            if bw.layout is not None:
                bw.layout.close()
            bw.module.close()
