"""Training: the layer's backward pass, shared by the GPU and emulator backends.

    y, saved = layer(x, save_for_backward=True)        # the forward keeps what it needs
    dx, grads = layer.backward(dy, saved)               # one fused backward launch
    layer.backward(dy, saved, grads_out=acc, accumulate=True)   # add into your buffers

``saved`` names a *save slot* of the layer: buffers of its own that the forward wrote
instead of the layer's workspace (routing, compact rows, the expert intermediates and
pre-activations, a copy of ``x``). Slots are reused, so a training loop allocates
nothing after its first step. ``recompute=True`` keeps only ``x`` and the routing; the
backward then runs the forward again first (it is deterministic: the routing is checked
to be the same). :func:`saved_bytes_per_token` says what each choice keeps.

Gradients are float32 in the layouts of :class:`~flashmoe_core.weights.MoEWeights`
(:class:`MoEGradients`); ``dx`` has the storage type of ``x``. The numerics are stated
next to :func:`flashmoe_core.oracle.reference.moe_backward`, the float64 oracle.

Bad use is a ``ValueError`` before anything runs: ``dy`` of the wrong shape or dtype,
``saved`` of another layer, a record already consumed (a second backward needs
``retain=True`` on the first), weights changed since the forward.
"""

from __future__ import annotations

import itertools
import math
import weakref
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

from ..config import MoEConfig
from ..host.abi import (BWD_GRAD_INDEX, BWD_GRAD_POINTERS, MOE_BACKWARD_EP_POINTERS,
                        MOE_BACKWARD_LAYOUT, MOE_BACKWARD_POINTERS,
                        MOE_BACKWARD_SHARED_POINTERS)
from ..numerics import storage_dtype
from .plan import SAVED_ROUTING, BackwardPlan, saved_buffers
from ..oracle.reference import given_routing
from ..weights import MoEWeights, expert_tensor_names, gradient_tensor_names

__all__ = ["MoEGradients", "SavedForBackward", "saved_bytes_per_token", "backward_weights",
           "backward_layout_record", "check_grad_output", "gradient_shapes",
           "grad_pointer_names"]


def gradient_shapes(cfg: MoEConfig, n_experts: Optional[int] = None) -> Dict[str, tuple]:
    """Name -> shape of every gradient (:func:`~flashmoe_core.weights.gradient_tensor_names`:
    the weights', router first, less the selection bias)."""
    shapes = MoEWeights.expected_shapes(cfg, n_experts)
    return {n: shapes[n] for n in gradient_tensor_names(cfg)}


def grad_pointer_names(cfg: MoEConfig) -> Tuple[Optional[str], ...]:
    """The gradient behind each of the backward kernel's gradient pointers (abi::BwdGrad
    order), ``None`` where the config has none."""
    vanilla = cfg.mlp == "vanilla"
    bias = not vanilla and cfg.mlp_bias
    mlp = {"up": "w1" if vanilla else "wg", "up2": "b1" if vanilla else "wu",
           "up_bias": "bg" if bias else None, "up2_bias": "bu" if bias else None,
           "down": "w2", "down_bias": "b2" if vanilla or bias else None}
    by_slot = {"router": "router", "router_bias": "router_bias" if cfg.router_bias else None,
               "shared_gate": "shared_gate" if cfg.n_shared and cfg.shared_gate else None,
               **mlp}
    for role, name in mlp.items():  # the shared MLP's tensors in the same roles
        by_slot["shared_" + role] = "shared_" + name if cfg.n_shared and name else None
    names: list = [None] * BWD_GRAD_POINTERS
    for slot, index in BWD_GRAD_INDEX.items():
        names[index] = by_slot[slot]
    return tuple(names)


class MoEGradients:
    """Gradients of a layer's weights: ``router`` [hidden, experts] (and ``router_bias``
    [experts] with one); vanilla ``w1, b1, w2, b2``; gated ``wg, wu, w2`` (and ``bg, bu,
    b2`` with biases); with shared experts the same names prefixed ``shared_`` (and
    ``shared_gate``); float32, shaped like the weights held (``expert_ids``).

    Each attribute is a NumPy array, or a GPU tensor of the caller's kind when the
    backward ran on DLPack tensors.

    Parameters
    ----------
    mlp : {"vanilla", "gated"}
    expert_ids : sequence of int
    **arrays
        One array per name in ``names``.
    """

    def __init__(self, mlp: str, expert_ids: Sequence[int], **arrays: Any) -> None:
        bias = mlp == "gated" and ("bg" in arrays or "bu" in arrays)
        shared = any(n.startswith("shared_") for n in arrays)
        names = ("router",) + (("router_bias",) if "router_bias" in arrays else ()) + \
            expert_tensor_names(mlp, bias)
        if shared:
            names += tuple("shared_" + n for n in expert_tensor_names(mlp, bias)) + \
                (("shared_gate",) if "shared_gate" in arrays else ())
        if set(arrays) != set(names):
            raise ValueError(f"MoEGradients for mlp={mlp!r} needs exactly {list(names)}, "
                             f"got {sorted(arrays)} (router_bias with a router bias; gated "
                             f"bg, bu, b2 with biases; shared_* with shared experts)")
        self.names: Tuple[str, ...] = names
        self.mlp = mlp
        self.expert_ids = tuple(int(e) for e in expert_ids)
        for name in self.names:
            setattr(self, name, arrays[name])
        #: [tokens, top_k] dL/d the caller's combine weights when the forward ran on
        #: ``routing=``; None otherwise (the router's gradient is then zero).
        self.routing_weights: Any = None

    @classmethod
    def zeros(cls, cfg: MoEConfig, expert_ids: Optional[Sequence[int]] = None) -> "MoEGradients":
        """float32 NumPy zeros for a layer holding ``expert_ids`` (default: all experts)."""
        ids = tuple(range(cfg.experts)) if expert_ids is None else tuple(expert_ids)
        return cls(cfg.mlp, ids, **{n: np.zeros(s, np.float32)
                                    for n, s in gradient_shapes(cfg, len(ids)).items()})

    def arrays(self) -> Dict[str, Any]:
        """Name -> gradient, router first (the order of ``MoEWeights.arrays``)."""
        return {n: getattr(self, n) for n in self.names}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.names)
        return f"MoEGradients({self.mlp}, experts={len(self.expert_ids)}, {shapes})"


_serials = itertools.count(1)


class SavedForBackward:
    """What ``layer(x, save_for_backward=True)`` returns beside ``y``: a handle on the
    save slot that holds the forward's activations. Pass it to ``layer.backward``.

    The slot goes back to the layer when the backward consumes the record (unless
    ``retain=True``), when :meth:`release` is called, or when the record is garbage.

    Attributes
    ----------
    tokens : int
        Tokens of the forward (``dy`` must have this many rows).
    recompute : bool
        Whether only ``x`` and the routing were kept.
    nbytes : int
        Device (or emulator) memory the slot holds.
    """

    def __init__(self, layer: Any, slot: Any, tokens: int, recompute: bool,
                 weights_version: int, nbytes: int, given: bool = False) -> None:
        self._layer = weakref.ref(layer)
        self._slot = slot
        self.serial = next(_serials)
        slot.owner = self.serial
        self.tokens = int(tokens)
        self.recompute = bool(recompute)
        self.weights_version = weights_version
        self.nbytes = int(nbytes)
        self.given = bool(given)  # the forward ran on the caller's routing

    @property
    def released(self) -> bool:
        """True once the slot went back to the layer (the record is spent)."""
        return self._slot is None or self._slot.owner != self.serial

    def release(self) -> None:
        """Give the slot back to the layer now (the record can no longer be used)."""
        slot, self._slot = self._slot, None
        layer = self._layer()
        if slot is not None and slot.owner == self.serial:
            slot.owner = None
            if layer is not None:
                layer._saved_pool.give(slot)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: nothing left to give back to
            pass

    def __repr__(self) -> str:
        state = "released" if self.released else "live"
        return (f"SavedForBackward(tokens={self.tokens}, recompute={self.recompute}, "
                f"{self.nbytes / 2**20:.2f} MiB, {state})")


class SlotPool:
    """Free save slots of one layer by kind ("full" or "light"), reused before new ones
    are made."""

    def __init__(self, make: Callable[[bool], Any]) -> None:
        self._make = make
        self._free: Dict[str, list] = {"full": [], "light": []}
        self._all: list = []

    @property
    def slots(self) -> int:
        """Slots made so far (free or held by a SavedForBackward)."""
        return len(self._all)

    def take(self, recompute: bool) -> Any:
        kind = "light" if recompute else "full"
        if self._free[kind]:
            return self._free[kind].pop()
        slot = self._make(recompute)
        self._all.append(slot)
        return slot

    def give(self, slot: Any) -> None:
        if any(slot is s for s in self._all):
            self._free[slot.kind].append(slot)

    def drain(self):
        """Every slot, free or held (the layer is closing: records still held are spent)."""
        out, self._all = self._all, []
        self._free = {"full": [], "light": []}
        for slot in out:
            slot.owner = None
        return out


def saved_bytes_per_token(cfg: MoEConfig, recompute: bool = False) -> float:
    """Bytes one token's saved forward keeps (the per-layer tables excluded): ``x``,
    its routing (``16 * top_k``: expert, weight, compact row and the row's token), and
    without ``recompute`` the expert intermediate, output and pre-activation rows."""
    per = {n: b for n, b in saved_buffers(cfg, recompute).items()
           if n not in ("expert_kept", "tile_kept")}
    return sum(per.values()) / cfg.tokens


def backward_weights(w: MoEWeights) -> Dict[str, np.ndarray]:
    """The weights in the layouts the backward GEMMs read (C = A B^T, both K-major):
    ``router_b`` [hidden, ceil8(experts + gate)] (the router, then the shared experts'
    gate as column ``experts`` when there is one, zero-padded columns), ``w_up_b``
    vanilla ``w1`` [E, hidden, ffn] / gated ``[wg | wu]`` [E, hidden, 2 ffn], ``w_down_b``
    ``w2`` [E, ffn, hidden]; with shared experts ``ws_up_b`` (``shared_w1`` or
    ``[shared_wg | shared_wu]``) and ``ws_down_b`` (``shared_w2``): the user layouts."""
    cfg = w.cfg
    gate = bool(cfg.n_shared and cfg.shared_gate)
    ep = math.ceil((cfg.experts + gate) / 8) * 8
    router = np.zeros((cfg.hidden, ep), storage_dtype(cfg.dtype))
    router[:, :cfg.experts] = w.router
    if gate:  # the shared experts' gate is the router's column E, as in the forward
        router[:, cfg.experts] = w.shared_gate
    up = w.w1 if cfg.mlp == "vanilla" else np.concatenate([w.wg, w.wu], axis=2)
    out = {"router_b": router, "w_up_b": np.ascontiguousarray(up),
           "w_down_b": np.ascontiguousarray(w.w2)}
    if cfg.n_shared:
        up = w.shared_w1 if cfg.mlp == "vanilla" else \
            np.concatenate([w.shared_wg, w.shared_wu], axis=1)
        out.update(ws_up_b=np.ascontiguousarray(up), ws_down_b=np.ascontiguousarray(w.shared_w2))
    return out


def backward_layout_record(plan: BackwardPlan, ptr: Callable[[str], int],
                           delay_ns: int = 0) -> np.ndarray:
    """The MoeBackwardLayout a layer hands its backward kernel (``ptr``: buffer name ->
    address)."""
    rec = np.zeros((), dtype=MOE_BACKWARD_LAYOUT)
    for name in MOE_BACKWARD_POINTERS + MOE_BACKWARD_EP_POINTERS + MOE_BACKWARD_SHARED_POINTERS:
        rec[name] = ptr(name)
    rec["delay_ns"] = int(delay_ns)
    rec["ring_capacity"] = plan.ring_capacity
    rec["rp_capacity"] = plan.rp_capacity
    rec["tp_capacity"] = plan.tp_capacity
    return rec


def check_grad_output(cfg: MoEConfig, shape, dtype, tokens: int,
                      contiguous: bool = True) -> None:
    """``dy`` must look like the forward's ``y``: [tokens, hidden] of the storage type."""
    want = storage_dtype(cfg.dtype)
    if tuple(shape) != (tokens, cfg.hidden):
        raise ValueError(f"dy has shape {tuple(shape)}; expected ({tokens}, {cfg.hidden}), the "
                         f"shape of this saved forward's y ({tokens} tokens)")
    if np.dtype(dtype) != want:
        raise ValueError(f"dy has dtype {np.dtype(dtype)}; expected {want}, the dtype of y "
                         f"(dtype={cfg.dtype!r}); convert it first")
    if not contiguous:
        raise ValueError("dy must be C-contiguous (rows of hidden elements)")


class TrainingMixin:
    """``save_for_backward`` and ``backward`` on top of a backend's hooks.

    A backend provides ``cfg``, ``_expert_ids()``, ``_tr_make_slot(recompute)``,
    ``_tr_forward(x, slot, **kw)`` (returns ``(y, tokens, extra)``) and
    ``_tr_backward(dy, slot, tokens, grads_out, accumulate, **kw)`` (returns
    ``(dx, grads)``).
    """

    _weights_version = 0

    @property
    def _saved_pool(self) -> SlotPool:
        pool = self.__dict__.get("_slot_pool")
        if pool is None:
            pool = self.__dict__["_slot_pool"] = SlotPool(self._tr_make_slot)
        return pool

    def saved_bytes(self, recompute: bool = False) -> int:
        """Bytes one save slot of this layer holds (sized for ``cfg.tokens``)."""
        return sum(saved_buffers(self.cfg, recompute).values())

    def _forward_saving(self, x, recompute: bool, routing=None, **kw):
        given = None
        if routing is not None:
            if recompute:
                raise ValueError("recompute=True with routing= is not supported: the "
                                 "backward would run the router's forward again; keep the "
                                 "activations (recompute=False)")
            shape = getattr(x, "shape", None)
            if shape is None or len(shape) != 2:
                raise ValueError("x must be [tokens, hidden] (routing= has a row per token)")
            given = given_routing(self.cfg, routing, int(shape[0]))
        slot = self._saved_pool.take(recompute)
        try:
            y, tokens, extra = self._tr_forward(x, slot, given=given, **kw)
        except BaseException:
            self._saved_pool.give(slot)
            raise
        saved = SavedForBackward(self, slot, tokens, recompute, self._weights_version,
                                 self.saved_bytes(recompute), given=given is not None)
        return (y, saved) + tuple(extra)

    def backward(self, dy, saved: SavedForBackward, grads_out: Optional[MoEGradients] = None,
                 accumulate: bool = False, retain: bool = False, **kw):
        """Gradients of the forward that returned ``saved``, for the upstream ``dy``.

        Parameters
        ----------
        dy : array, [tokens, hidden] of the storage type
            NumPy; on the GPU backend also any DLPack GPU tensor (then every result is
            a tensor of its kind, stream-ordered like the forward).
        saved : SavedForBackward
            From ``layer(x, save_for_backward=True)`` of this layer.
        grads_out : MoEGradients, optional
            float32 buffers to write the weight gradients into (same kind as ``dy``).
        accumulate : bool
            Add into ``grads_out`` instead of overwriting it (micro-batches).
        retain : bool
            Keep ``saved`` usable for another backward.
        **kw
            Backend options (GPU: ``stream=``).

        Returns
        -------
        dx : the gradient of ``x`` (storage type, the kind of ``dy``)
        grads : MoEGradients (``grads_out`` if given)
        """
        if not isinstance(saved, SavedForBackward):
            raise TypeError(f"saved must be the SavedForBackward of a forward with "
                            f"save_for_backward=True, got {type(saved).__name__}")
        if saved._layer() is not self:
            raise ValueError("saved comes from another layer's forward; pass it to the "
                             "backward of the layer that made it")
        if saved.released:
            raise ValueError("saved was already consumed: its backward ran (or release() was "
                             "called) and its slot was reused; run the forward again, or pass "
                             "retain=True to the first backward to run it twice")
        if saved.weights_version != self._weights_version:
            raise ValueError("the layer's weights changed (set_weights) after this forward; its "
                             "saved activations belong to the old weights: run the forward "
                             "again")
        if accumulate and grads_out is None:
            raise ValueError("accumulate=True adds into grads_out: pass the buffers to add to")
        if grads_out is not None:
            self._check_grads_out(grads_out)
        dx, grads = self._tr_backward(dy, saved._slot, saved.tokens, grads_out,
                                      backward_flags(accumulate, saved.given), **kw)
        if not retain:
            saved.release()
        return dx, grads

    def _check_grads_out(self, grads: MoEGradients) -> None:
        if not isinstance(grads, MoEGradients):
            raise TypeError(f"grads_out must be MoEGradients, got {type(grads).__name__}")
        ids = self._expert_ids()
        if grads.mlp != self.cfg.mlp or tuple(grads.expert_ids) != tuple(ids):
            raise ValueError(f"grads_out is for mlp={grads.mlp!r}, experts {grads.expert_ids}; "
                             f"this layer is {self.cfg.mlp!r} holding experts {tuple(ids)}")
        for name, shape in gradient_shapes(self.cfg, len(ids)).items():
            a = getattr(grads, name)
            got_shape = tuple(getattr(a, "shape", ()))
            if got_shape != shape:
                raise ValueError(f"grads_out.{name} has shape {got_shape}; expected {shape}")
            if isinstance(a, np.ndarray) and a.dtype != np.float32:
                raise ValueError(f"grads_out.{name} has dtype {a.dtype}; gradients are float32")


def backward_flags(accumulate: bool, given: bool) -> int:
    """The backward kernel's ``flags``: bit 0 adds into the gradients, bit 1 says the
    forward ran on the caller's routing."""
    return int(bool(accumulate)) | (int(bool(given)) << 1)


def numpy_grads_ok(a: np.ndarray) -> bool:
    """Whether the kernel can write a NumPy gradient in place (float32, C-contiguous,
    writable, 16-byte aligned)."""
    return (a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable
            and a.ctypes.data % 16 == 0)


def routing_equal(a: Dict[str, np.ndarray], b: Dict[str, np.ndarray]) -> bool:
    """Whether two routings (name -> array of SAVED_ROUTING) are identical."""
    return all(np.array_equal(a[n].view(np.uint8), b[n].view(np.uint8)) for n in SAVED_ROUTING)

