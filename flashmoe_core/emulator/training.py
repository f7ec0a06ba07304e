"""The backward pass on the CPU emulator: :class:`EmulatedMoELayer`'s training hooks.

The same kernel source as the GPU's (``kernels/moe_backward.cu``) built for the host;
save slots, the backward's buffers and its weights live in host memory laid out as on
a GPU. NumPy in and out; CPU DLPack tensors (anything ``np.from_dlpack`` takes) are
accepted too and come back as NumPy arrays.
"""

from __future__ import annotations

import ctypes
import types
from typing import Optional

import numpy as np

from ..kernel.training import (MoEGradients, TrainingMixin, backward_layout_record,
                               backward_weights, check_grad_output, grad_pointer_names,
                               gradient_shapes, numpy_grads_ok, routing_equal)
from ..host.abi import ABI_VERSION
from ..host.emulator import BufferSpan
from ..host.errors import FlashMoEError
from ..kernel.jit import emulator_library
from ..kernel.specs import moe_backward_spec
from ..kernel.contract import validate_input
from ..numerics import check_finite, round_to, storage_dtype
from ..kernel.plan import SAVED_ROUTING, plan_backward, saved_buffers
from ..oracle.reference import Routing

__all__ = ["EmulatedTraining"]

_P = ctypes.c_void_p


def _aligned(nbytes: int, fill: Optional[int] = None) -> np.ndarray:
    from . import _aligned as aligned

    return aligned(nbytes, fill)


def as_numpy(a, name: str) -> np.ndarray:
    """A NumPy view of a NumPy array or a CPU DLPack tensor."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "__dlpack__"):
        try:
            return np.from_dlpack(a)
        except (RuntimeError, TypeError, BufferError) as exc:
            raise TypeError(f"{name}: the emulator takes NumPy arrays or CPU DLPack tensors; "
                            f"np.from_dlpack refused this {type(a).__name__} ({exc})") from None
    raise TypeError(f"{name}: the emulator takes NumPy arrays or CPU DLPack tensors, got "
                    f"{type(a).__name__}")


def staged_input(cfg, x: np.ndarray, name: str, check: bool = False):
    """``x`` as the kernel reads it (float32 rounded to tf32 for a tfloat32 layer) and its
    token count, validated against the layer; ``check`` refuses non-finite values."""
    if cfg.dtype == "tfloat32" and x.dtype == np.float32:
        x = round_to(x, "tfloat32")
    t = validate_input(cfg, x.shape, x.dtype)
    if check:
        check_finite(name, x)
    return x, t


class _Slot:
    """One save slot in host memory (buffer name -> aligned bytes)."""

    def __init__(self, cfg, recompute: bool) -> None:
        self.kind = "light" if recompute else "full"
        self.owner = None
        # Garbage, as device memory starts: nothing may rely on it.
        self.buf = {n: _aligned(b, 0xA5) for n, b in saved_buffers(cfg, recompute).items()}

    def ptr(self, name: str) -> int:
        return int(self.buf[name].ctypes.data)

    def view(self, name: str, shape, dtype) -> np.ndarray:
        n = int(np.prod(shape))
        return self.buf[name].view(dtype)[:n].reshape(shape)

    def routing(self, cfg, tokens: int) -> dict:
        k, tt = cfg.top_k, -(-tokens // 128)
        shapes = {"topk_expert": ((tokens, k), np.int32), "topk_weight": ((tokens, k), np.float32),
                  "token_rows": ((tokens, k), np.int32), "row_token": ((tokens * k,), np.int32),
                  "expert_kept": ((cfg.experts,), np.int32), "tile_kept": ((tt,), np.int32)}
        return {n: self.view(n, *shapes[n]) for n in SAVED_ROUTING}


def _spans(prefix: str, arrays) -> list:
    """BufferSpans of PE 0 for named arrays (names prefixed; empty arrays skipped)."""
    return [BufferSpan((prefix + n).strip(), int(a.ctypes.data), int(a.nbytes), 0, False)
            for n, a in arrays.items() if a is not None and a.nbytes]


class _BackwardLauncher:
    """The backward kernel's emulator library for one configuration."""

    def __init__(self, cfg, on_report=None) -> None:
        self.on_report = on_report  # the owning layer's recovery after an emulator report
        self.spec = moe_backward_spec(cfg)
        self._libs = {}
        self._load(False)

    def _load(self, checked: bool):
        """The library (and its entry) of a plain or a checked build (the memory model)."""
        if checked not in self._libs:
            lib = emulator_library(self.spec, checked)
            abi = lib.function("emu_moe_backward_abi", [], ctypes.c_uint)()
            if abi != ABI_VERSION:
                raise FlashMoEError(f"emulator backward kernel ABI {abi} differs from host "
                                    f"ABI {ABI_VERSION}; clear the kernel cache "
                                    f"(FLASHMOE_CACHE_DIR)")
            fn = lib.function("emu_moe_backward", [ctypes.c_int, _P, _P, _P, _P, _P, _P, _P, _P,
                                                   ctypes.c_int, ctypes.c_int, _P,
                                                   ctypes.c_ulonglong])
            self._libs[checked] = (lib, fn)
        return self._libs[checked]

    @property
    def lib(self):
        return self._libs[False][0]

    def __call__(self, options, fwd, bwd, x, dy, dx, grads, tokens, launched, flags: int,
                 grid: int, heaps=(), heap_bytes: int = 0, buffers=()) -> None:
        """One launch on len(fwd) PEs (per-PE addresses; grads: BWD_GRAD_POINTERS per PE;
        flags: kernel.training.backward_flags; buffers: the BufferSpans the memory model
        checks)."""
        from . import recovering

        lib, fn = self._load(options.checked)
        arr = lambda t, vals: (t * len(vals))(*vals)  # noqa: E731
        with recovering(self.on_report):
            lib.launch(options, fn, len(fwd), arr(_P, fwd), arr(_P, bwd), arr(_P, x),
                            arr(_P, dy), arr(_P, dx), arr(_P, grads), arr(ctypes.c_int, tokens),
                            arr(ctypes.c_int, [int(bool(v)) for v in launched]), int(flags),
                            grid, arr(_P, [int(h.ctypes.data) for h in heaps]) if heaps else None,
                            heap_bytes, buffers=buffers)


class EmulatedTraining(TrainingMixin):
    """Training hooks of :class:`~flashmoe_core.emulator.EmulatedMoELayer` (one PE)."""

    _bw = None  # the backward's buffers, launcher and layout once a backward ran

    # ------------------------------------------------------------------ hooks
    def _expert_ids(self):
        return tuple(range(self.cfg.experts))

    def _tr_make_slot(self, recompute: bool) -> _Slot:
        return _Slot(self.cfg, recompute)

    def _slot_layout(self, slot: _Slot) -> np.ndarray:
        from ..kernel.contract import layout_record

        pe = self._pe
        rec = layout_record(self.cfg, pe.plan,
                            lambda n: slot.ptr(n) if n in slot.buf else pe.ptr(n),
                            fault=int(pe.fault.ctypes.data), timeout_s=pe.timeout_s, rank=0,
                            local_experts=len(pe.local_ids), delay_ns=pe.delay_ns)
        out = _aligned(rec.nbytes)
        out[...] = np.frombuffer(rec.tobytes(), np.uint8)
        return out

    def _forward_into(self, slot: _Slot, x_ptr: int, tokens: int, mode: str = "full") -> None:
        layout = self._slot_layout(slot)
        pe = self._pe
        # The layer's buffers and the slot's, named for the memory model.
        spans = list(pe.spans()) + _spans("saved layout", {"": layout}) + \
            _spans("saved ", slot.buf)
        self._launcher([types.SimpleNamespace(layout=layout)], [tokens], [True], mode,
                       self.grid, [x_ptr], [pe.ptr("y_stage")], spans=spans)
        self.check_fault()

    def _tr_forward(self, x, slot: _Slot, return_routing: bool = False, given=None):
        x, t = staged_input(self.cfg, as_numpy(x, "x"), "x", self.check_finite)
        slot.view("x", x.shape, x.dtype)[...] = x
        if given is not None:  # the caller's experts and weights, into the slot's routing
            k = self.cfg.top_k
            slot.view("topk_expert", (t, k), np.int32)[...] = given[0]
            slot.view("topk_weight", (t, k), np.float32)[...] = given[1]
        self._forward_into(slot, slot.ptr("x"), t, "full" if given is None else "routed")
        y = self._pe.view("y_stage", (t, self.cfg.hidden), storage_dtype(self.cfg.dtype)).copy()
        extra = ()
        if return_routing:
            r = slot.routing(self.cfg, t)
            extra = (Routing(r["topk_expert"].copy(), r["topk_weight"].copy(),
                             r["token_rows"] >= 0),)
        return y, t, extra

    # ------------------------------------------------------------------ backward
    def _ensure_backward(self):
        if self._bw is not None:
            return self._bw
        plan = plan_backward(self.cfg)
        buf = {n: _aligned(b, 0xA5) for n, b in plan.workspace.items()}
        buf["ring"][...] = 0
        launcher = _BackwardLauncher(self.cfg, self._recover_after_report)
        bw = types.SimpleNamespace(plan=plan, buf=buf, launcher=launcher,
                                   delay_ns=0, scratch=None, layout=None)
        self._bw = bw
        self._upload_backward_weights(self._weights)
        return bw

    def _upload_backward_weights(self, w) -> None:
        bw = self._bw
        for name, a in backward_weights(w).items():
            a = np.ascontiguousarray(a)
            bw.buf[name] = _aligned(a.nbytes)
            bw.buf[name][...] = a.reshape(-1).view(np.uint8)
        self._make_backward_layout()

    def _make_backward_layout(self) -> None:
        bw = self._bw
        rec = backward_layout_record(
            bw.plan, lambda n: int(bw.buf[n].ctypes.data) if n in bw.buf else 0,
            delay_ns=bw.delay_ns)
        bw.layout = _aligned(rec.nbytes)
        bw.layout[...] = np.frombuffer(rec.tobytes(), np.uint8)

    def _tr_backward(self, dy, slot: _Slot, tokens: int, grads_out, flags: int):
        cfg = self.cfg
        dy = as_numpy(dy, "dy")
        check_grad_output(cfg, dy.shape, dy.dtype, tokens, dy.flags.c_contiguous)
        bw = self._ensure_backward()
        fwd = slot
        if slot.kind == "light":
            # Only x and the routing were kept: the forward again, into a full slot.
            if bw.scratch is None:
                bw.scratch = _Slot(cfg, recompute=False)
            fwd = bw.scratch
            self._forward_into(fwd, slot.ptr("x"), tokens)
            if not routing_equal(fwd.routing(cfg, tokens), slot.routing(cfg, tokens)):
                raise FlashMoEError("the recomputed forward routed differently from the saved "
                                    "one: the forward kernel is not deterministic here (a bug)")
        dt = storage_dtype(cfg.dtype)
        dy_stage = bw.buf["dy_stage"].view(dt)[:dy.size].reshape(dy.shape)
        dy_stage[...] = dy
        if grads_out is None:
            grads = MoEGradients(cfg.mlp, self._expert_ids(), **{
                n: _aligned(int(np.prod(s)) * 4).view(np.float32).reshape(s)
                for n, s in gradient_shapes(cfg).items()})
        else:
            grads = grads_out
            for name, a in grads.arrays().items():
                if not isinstance(a, np.ndarray) or not numpy_grads_ok(a):
                    raise ValueError(f"grads_out.{name} must be a writable, C-contiguous, "
                                     "16-byte aligned float32 NumPy array (np.zeros gives one)")
        order = grad_pointer_names(cfg)
        ptrs = [0 if n is None else int(getattr(grads, n).ctypes.data) for n in order]
        fwd_layout = self._slot_layout(fwd)
        # Every buffer the backward touches, named, so that the memory model checks its
        # ordering as it checks the forward's.
        spans = list(self._pe.spans()) + _spans("saved layout", {"": fwd_layout}) + \
            _spans("saved ", fwd.buf) + _spans("backward layout", {"": bw.layout}) + \
            _spans("backward ", bw.buf) + _spans("grad ", grads.arrays())
        if fwd is not slot:  # recomputed: the light slot's x is read too
            spans += _spans("saved x ", {"x": slot.buf["x"]})
        bw.launcher(self.options, [int(fwd_layout.ctypes.data)], [int(bw.layout.ctypes.data)],
                    [slot.ptr("x")], [int(bw.buf["dy_stage"].ctypes.data)],
                    [int(bw.buf["dx_stage"].ctypes.data)], ptrs, [tokens], [True], flags,
                    self.grid, buffers=spans)
        self.check_fault()
        dx = bw.buf["dx_stage"].view(dt)[:dy.size].reshape(dy.shape).copy()
        if flags & 2:
            grads.routing_weights = bw.buf["d_weights"].view(np.float32)[
                :tokens * cfg.top_k].reshape(tokens, cfg.top_k).copy()
        return dx, grads

    # ------------------------------------------------------------------ weights
    def set_weights(self, weights) -> None:
        """Replace the layer's weights (same config): both the forward's and, once a
        backward ran, the backward's copies. Saved forwards of the old weights can no
        longer run their backward."""
        from ..weights import MoEWeights

        if not isinstance(weights, MoEWeights) or weights.cfg != self.cfg:
            raise ValueError("weights must be MoEWeights built for this same config")
        self._pe._upload_weights(weights)
        self._pe.make_layout()
        self._weights = weights
        self._weights_version += 1
        if self._bw is not None:
            self._upload_backward_weights(weights)

    def _inject_backward_delay(self, seconds: float) -> None:
        """Delay every later backward launch by ``seconds`` (fault injection)."""
        if not 0 <= seconds <= 60:
            raise ValueError(f"delay {seconds} s must be in [0, 60]")
        bw = self._ensure_backward()
        bw.delay_ns = int(seconds * 1e9)
        self._make_backward_layout()


# ------------------------------------------------------------------------- several PEs
def backward_symmetric(cfg) -> dict:
    """The backward's symmetric buffers (name -> bytes) an emulated expert-parallel layer
    reserves in every PE's heap."""
    return plan_backward(cfg, cfg.max_local_experts).symmetric


class _EpSlot:
    """A save slot of every PE at once (one per PE, same index on each); a light one
    (recompute) keeps each PE's x and routing only."""

    def __init__(self, cfg, world: int, recompute: bool = False) -> None:
        self.kind = "light" if recompute else "full"
        self.owner = None
        self.pes = [_Slot(cfg, recompute=recompute) for _ in range(world)]
        self.tokens = [0] * world


class EmulatedExpertParallelTraining:
    """``save_for_backward`` and ``backward`` of
    :class:`~flashmoe_core.emulator.EmulatedExpertParallel`: every PE at once, along
    the forward's routes. Each PE's gradients hold its own experts; its ``router``
    gradient is the partial over its own tokens (the router is replicated: sum the
    partials over PEs, as for any data-parallel weight)."""

    _bw_pes = None
    _ep_scratch = None  # the full slot a recomputing backward runs the forward into
    _weights_version = 0

    @property
    def _saved_pool(self):
        from ..kernel.training import SlotPool

        pool = self.__dict__.get("_slot_pool")
        if pool is None:
            pool = self.__dict__["_slot_pool"] = SlotPool(
                lambda recompute: _EpSlot(self.cfg, self.world, recompute))
        return pool

    def _ep_slot_layout(self, pe, slot: _Slot, saving: bool) -> np.ndarray:
        """PE pe's layout for one slot: while saving, owners put results into the
        layer's symmetric y_expert (copied into the slot after the launch) and the kernel
        keeps the x rows it received in the slot's recv_saved; for the backward the
        slot's copies stand in for the symmetric buffers."""
        from ..kernel.contract import layout_record

        own = set(slot.buf) - ({"y_expert"} if saving else set())
        rec = layout_record(self.cfg, pe.plan, lambda n: slot.ptr(n) if n in own else pe.ptr(n),
                            fault=int(pe.fault.ctypes.data), timeout_s=pe.timeout_s,
                            rank=pe.rank, local_experts=len(pe.local_ids),
                            delay_ns=pe.delay_ns)
        out = _aligned(rec.nbytes)
        out[...] = np.frombuffer(rec.tobytes(), np.uint8)
        return out

    def _raise_faults(self) -> None:
        from ..kernel.contract import fault_exception, recovery_state

        records = [pe.fault_info() for pe in self.pes]
        if any(records):
            words, epoch = recovery_state([pe.state()["epoch"] for pe in self.pes])
            for pe in self.pes:
                pe.recover(words, epoch)
            exc = fault_exception(next(r for r in records if r))
            exc.records = records
            raise exc

    def _saving_launch(self, slot: _EpSlot, x_ptrs, tokens) -> None:
        """The forward on every PE, writing what the backward needs into ``slot``."""
        layouts = [self._ep_slot_layout(pe, s, saving=True) for pe, s in zip(self.pes,
                                                                           slot.pes)]
        self._launcher([types.SimpleNamespace(layout=lay) for lay in layouts], tokens,
                       [True] * self.world, "full", self.grid, x_ptrs,
                       [pe.ptr("y_stage") for pe in self.pes], self._heaps, self.heap_bytes)
        self._raise_faults()
        for pe, s in zip(self.pes, slot.pes):  # the symmetric results the backward reads
            if "y_expert" in s.buf:
                s.buf["y_expert"][...] = pe.buf["y_expert"][:s.buf["y_expert"].size]
        slot.tokens = list(tokens)

    def _forward_saving_ep(self, xs, absent=(), return_routing: bool = False,
                           recompute: bool = False):
        from ..kernel.training import SavedForBackward

        if len(xs) != self.world:
            raise ValueError(f"xs has {len(xs)} arrays; expected one per PE ({self.world})")
        if absent:
            raise ValueError("save_for_backward=True runs every PE (absent= is for fault tests "
                             "of the plain forward)")
        slot = self._saved_pool.take(recompute)
        try:
            tokens = []
            for r, (x, s) in enumerate(zip(xs, slot.pes)):
                x, t = staged_input(self.cfg, as_numpy(x, f"xs[{r}]"), f"xs[{r}]",
                                    self.check_finite)
                s.view("x", x.shape, x.dtype)[...] = x
                tokens.append(t)
            self._saving_launch(slot, [s.ptr("x") for s in slot.pes], tokens)
        except BaseException:
            self._saved_pool.give(slot)
            raise
        dt = storage_dtype(self.cfg.dtype)
        ys = [pe.view("y_stage", (t, self.cfg.hidden), dt).copy()
              for pe, t in zip(self.pes, tokens)]
        saved = SavedForBackward(self, slot, max(tokens), recompute, self._weights_version,
                                 sum(sum(b.nbytes for b in s.buf.values()) for s in slot.pes))
        if return_routing:
            routings = []
            for s, t in zip(slot.pes, tokens):
                r = s.routing(self.cfg, t)
                routings.append(Routing(r["topk_expert"].copy(), r["topk_weight"].copy(),
                                        r["token_rows"] >= 0))
            return ys, saved, routings
        return ys, saved

    def _recomputed(self, slot: _EpSlot) -> _EpSlot:
        """A light slot's forward again, into the layer's full scratch slot; its routing
        must be the saved one (the forward is deterministic)."""
        if self._ep_scratch is None:
            self._ep_scratch = _EpSlot(self.cfg, self.world)
        full = self._ep_scratch
        self._saving_launch(full, [s.ptr("x") for s in slot.pes], slot.tokens)
        for r, (a, b, t) in enumerate(zip(full.pes, slot.pes, slot.tokens)):
            if not routing_equal(a.routing(self.cfg, t), b.routing(self.cfg, t)):
                raise FlashMoEError(f"the recomputed forward routed PE {r}'s tokens differently "
                                    "from the saved one: the forward kernel is not "
                                    "deterministic here (a bug)")
        return full

    def _ensure_backward_ep(self):
        if self._bw_pes is not None:
            return self._bw_pes
        cfg = self.cfg
        launcher = _BackwardLauncher(cfg, self._recover_after_report)
        out = []
        for pe in self.pes:
            plan = plan_backward(cfg, len(pe.local_ids))
            buf = {n: _aligned(b, 0xA5) for n, b in plan.workspace.items()}
            buf["ring"][...] = 0
            for name in plan.symmetric:  # in the heap: owners put into each other's
                buf[name] = pe.buf[name]
            out.append(types.SimpleNamespace(plan=plan, buf=buf, layout=None, pe=pe))
        self._bw_pes = types.SimpleNamespace(launcher=launcher, pes=out)
        self._upload_backward_weights_ep(self._weights)
        return self._bw_pes

    def _upload_backward_weights_ep(self, w) -> None:
        for bw in self._bw_pes.pes:
            for name, a in backward_weights(w.subset(bw.pe.local_ids)).items():
                a = np.ascontiguousarray(a)
                bw.buf[name] = _aligned(a.nbytes)
                bw.buf[name][...] = a.reshape(-1).view(np.uint8)
            rec = backward_layout_record(
                bw.plan, lambda n: int(bw.buf[n].ctypes.data) if n in bw.buf else 0)
            bw.layout = _aligned(rec.nbytes)
            bw.layout[...] = np.frombuffer(rec.tobytes(), np.uint8)

    def backward(self, dys, saved, absent=()):
        """Gradients of the expert-parallel forward that returned ``saved``.

        Parameters
        ----------
        dys : one [t_p, hidden] array per PE (the storage type; each PE's own tokens)
        saved : SavedForBackward of ``ep(xs, save_for_backward=True)``
        absent : PEs that do not launch (fault injection: the others time out)

        Returns
        -------
        dxs : list of arrays, one per PE
        grads : list of MoEGradients, one per PE: its own experts, and its partial
            router gradient (over its tokens)
        """
        from ..kernel.training import SavedForBackward

        if not isinstance(saved, SavedForBackward) or not isinstance(saved._slot, _EpSlot):
            raise TypeError("saved must come from ep(xs, save_for_backward=True)")
        if saved._layer() is not self:
            raise ValueError("saved comes from another layer's forward")
        if saved.released:
            raise ValueError("saved was already consumed (its backward ran); run the forward "
                             "again")
        if len(dys) != self.world:
            raise ValueError(f"dys has {len(dys)} arrays; expected one per PE ({self.world})")
        bad = [r for r in absent if not 0 <= r < self.world]
        if bad:
            raise ValueError(f"absent PEs {bad} are not in [0, {self.world})")
        cfg, slot = self.cfg, saved._slot
        dys = [as_numpy(dy, f"dys[{r}]") for r, dy in enumerate(dys)]
        for dy, t in zip(dys, slot.tokens):
            check_grad_output(cfg, dy.shape, dy.dtype, t, dy.flags.c_contiguous)
        st = self._ensure_backward_ep()
        fwd_slot = self._recomputed(slot) if slot.kind == "light" else slot
        dt = storage_dtype(cfg.dtype)
        order = grad_pointer_names(cfg)
        grads, ptrs, fwd = [], [], []
        for bw, s, dy in zip(st.pes, fwd_slot.pes, dys):
            bw.buf["dy_stage"].view(dt)[:dy.size].reshape(dy.shape)[...] = dy
            g = MoEGradients(cfg.mlp, bw.pe.local_ids, **{
                n: _aligned(int(np.prod(sh)) * 4).view(np.float32).reshape(sh)
                for n, sh in gradient_shapes(cfg, len(bw.pe.local_ids)).items()})
            grads.append(g)
            ptrs += [0 if n is None else int(getattr(g, n).ctypes.data) for n in order]
            fwd.append(self._ep_slot_layout(bw.pe, s, saving=False))
        launched = [r not in absent for r in range(self.world)]
        st.launcher(self.options, [int(f.ctypes.data) for f in fwd],
                    [int(bw.layout.ctypes.data) for bw in st.pes], [s.ptr("x") for s in slot.pes],
                    [int(bw.buf["dy_stage"].ctypes.data) for bw in st.pes],
                    [int(bw.buf["dx_stage"].ctypes.data) for bw in st.pes], ptrs, slot.tokens,
                    launched, False, self.grid, self._heaps, self.heap_bytes)
        self._raise_faults()
        saved.release()
        dxs = [bw.buf["dx_stage"].view(dt)[:dy.size].reshape(dy.shape).copy()
               for bw, dy in zip(st.pes, dys)]
        return dxs, grads
