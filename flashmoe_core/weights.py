"""Weights of one MoE layer as NumPy arrays in the configured storage type."""

from __future__ import annotations

import numbers
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from .config import MoEConfig
from .numerics import round_to, storage_dtype

__all__ = ["MoEWeights", "check_weights", "WEIGHT_FIELDS", "shared_tensor_names",
           "gradient_tensor_names"]

# The MoEConfig fields that fix what the weights are: their shapes and element type.
# Weights built for one config serve any config that agrees on these (the token bound,
# top_k, capacity, activation and placement do not change a weight).
WEIGHT_FIELDS = ("hidden", "ffn", "experts", "mlp", "dtype", "router_bias", "selection_bias",
                 "mlp_bias", "n_shared", "shared_ffn", "shared_gate")

# Draw order of the random generator; never reorder (it would change every seed).
_TENSOR_IDS = {"router": 0, "w1": 1, "b1": 2, "w2": 3, "b2": 4, "wg": 5, "wu": 6,
               "router_bias": 7, "selection_bias": 8, "bg": 9, "bu": 10,
               "shared_w1": 11, "shared_b1": 12, "shared_w2": 13, "shared_b2": 14,
               "shared_wg": 15, "shared_wu": 16, "shared_bg": 17, "shared_bu": 18,
               "shared_gate": 19}
# Kept in float32 whatever the storage type (a selection bias only ranks experts).
_FLOAT32 = ("selection_bias",)


def router_tensor_names(cfg: MoEConfig) -> Tuple[str, ...]:
    """The router's tensors for a config: ``router`` and the biases its rules name."""
    return ("router",) + (("router_bias",) if cfg.router_bias else ()) + \
        (("selection_bias",) if cfg.selection_bias else ())


def _count(name: str, value, lo: int = 0) -> int:
    """An integer argument (Python or NumPy) >= lo, as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) \
            or value < lo:
        raise ValueError(f"{name}={value!r} must be an integer >= {lo}")
    return int(value)


def expert_tensor_names(mlp: str, bias: bool = False) -> Tuple[str, ...]:
    """Per-expert tensor names for an MLP kind (and the gated MLP's biases), in a fixed
    order."""
    if mlp == "vanilla":
        return ("w1", "b1", "w2", "b2")
    return ("wg", "wu", "w2") + (("bg", "bu", "b2") if bias else ())


def shared_tensor_names(cfg: MoEConfig) -> Tuple[str, ...]:
    """The shared MLP's tensors (the routed experts' names prefixed ``shared_``) and its
    gate's; none without shared experts."""
    if cfg.n_shared == 0:
        return ()
    return tuple("shared_" + n for n in expert_tensor_names(cfg.mlp, cfg.mlp_bias)) + \
        (("shared_gate",) if cfg.shared_gate else ())


def gradient_tensor_names(cfg: MoEConfig) -> Tuple[str, ...]:
    """The tensors a loss has a gradient for: ``MoEWeights.names`` of the config, in
    that order, without ``selection_bias`` (it only ranks experts, so no gradient reaches
    it; DeepSeek-V3 updates it by its load-balancing rule instead)."""
    return tuple(n for n in router_tensor_names(cfg) if n != "selection_bias") + \
        expert_tensor_names(cfg.mlp, cfg.mlp_bias) + shared_tensor_names(cfg)


class MoEWeights:
    """Router and expert weights of one layer.

    Attributes are NumPy arrays of the config's storage type (``ml_dtypes.bfloat16``
    for bfloat16, ``float32`` for float32 and tfloat32, ``float16``):

    - ``router`` [hidden, experts]
    - vanilla MLP: ``w1`` [E, hidden, ffn], ``b1`` [E, ffn], ``w2`` [E, ffn, hidden],
      ``b2`` [E, hidden]
    - gated MLP: ``wg``, ``wu`` [E, hidden, ffn], ``w2`` [E, ffn, hidden]; with
      ``cfg.mlp_bias`` also ``bg``, ``bu`` [E, ffn] and ``b2`` [E, hidden]
    - with ``cfg.router_bias``: ``router_bias`` [experts]; with ``cfg.selection_bias``:
      ``selection_bias`` [experts], float32 whatever the storage type
    - with shared experts (``cfg.n_shared``), the shared MLP of width ``S =
      cfg.shared_width``, held whole on every rank: ``shared_w1`` [hidden, S],
      ``shared_b1`` [S], ``shared_w2`` [S, hidden], ``shared_b2`` [hidden] (vanilla), or
      ``shared_wg``, ``shared_wu`` [hidden, S], ``shared_w2`` [S, hidden] (gated; with
      ``cfg.mlp_bias`` also ``shared_bg``, ``shared_bu`` [S], ``shared_b2`` [hidden]);
      with ``cfg.shared_gate``: ``shared_gate`` [hidden]. Several shared experts are
      side by side along S.

    E is ``len(expert_ids)``: all experts by default, or the subset one rank owns.

    Arrays are kept as given, NaN and infinities included; every backend multiplies an
    infinite weight as NaN (:mod:`flashmoe_core.oracle.reference`, rule 11), and layers built
    with ``check_finite=True`` refuse non-finite weights.

    Parameters
    ----------
    cfg : MoEConfig
    expert_ids : sequence of int, optional
        Global ids of the experts held, ascending (default: all).
    cast : bool
        Round arrays of another floating type to the storage type instead of
        rejecting them.
    **arrays : numpy.ndarray
        ``router`` and the per-expert tensors of ``cfg.mlp``.
    """

    def __init__(self, cfg: MoEConfig, *, expert_ids: Optional[Sequence[int]] = None,
                 cast: bool = False, **arrays: np.ndarray) -> None:
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        ids = tuple(range(cfg.experts)) if expert_ids is None else tuple(int(e) for e in expert_ids)
        if list(ids) != sorted(set(ids)) or any(not 0 <= e < cfg.experts for e in ids):
            raise ValueError(f"expert_ids={ids} must be distinct, ascending ids in [0, {cfg.experts})")
        self.expert_ids = ids
        expected = self.expected_shapes(cfg, len(ids))
        unknown = sorted(set(arrays) - set(expected))
        if unknown:
            raise ValueError(f"unexpected weight(s) {unknown} for mlp={cfg.mlp!r}; "
                             f"expected {sorted(expected)}")
        missing = sorted(set(expected) - set(arrays))
        if missing:
            raise ValueError(f"missing weight(s) {missing} for mlp={cfg.mlp!r}")
        for name, shape in expected.items():
            a = np.asarray(arrays[name])
            if a.shape != shape:
                raise ValueError(f"weight {name!r} has shape {a.shape}, expected {shape} "
                                 f"for {cfg}")
            f32 = name in _FLOAT32
            want = np.dtype(np.float32) if f32 else storage_dtype(cfg.dtype)
            if a.dtype != want:
                if not cast:
                    raise ValueError(
                        f"weight {name!r} has dtype {a.dtype}, expected {want} for "
                        f"dtype={cfg.dtype!r}; pass cast=True to round it")
            if f32:
                a = a.astype(np.float32)
            elif cast or cfg.dtype == "tfloat32":
                a = round_to(a, cfg.dtype)
            setattr(self, name, np.ascontiguousarray(a))

    # ------------------------------------------------------------------ shapes
    @staticmethod
    def expected_shapes(cfg: MoEConfig, n_experts: Optional[int] = None) -> Dict[str, tuple]:
        """Name -> shape of every array for ``cfg`` with ``n_experts`` experts held."""
        e = cfg.experts if n_experts is None else n_experts
        h, f = cfg.hidden, cfg.ffn
        shapes = {"router": (h, cfg.experts)}
        for name in router_tensor_names(cfg)[1:]:
            shapes[name] = (cfg.experts,)
        if cfg.mlp == "vanilla":
            shapes.update(w1=(e, h, f), b1=(e, f), w2=(e, f, h), b2=(e, h))
        else:
            shapes.update(wg=(e, h, f), wu=(e, h, f), w2=(e, f, h))
            if cfg.mlp_bias:
                shapes.update(bg=(e, f), bu=(e, f), b2=(e, h))
        s = cfg.shared_width
        per = {"w1": (h, s), "b1": (s,), "w2": (s, h), "b2": (h,), "wg": (h, s),
               "wu": (h, s), "bg": (s,), "bu": (s,), "gate": (h,)}
        for name in shared_tensor_names(cfg):
            shapes[name] = per[name[len("shared_"):]]
        return shapes

    @property
    def names(self) -> Tuple[str, ...]:
        return router_tensor_names(self.cfg) + expert_tensor_names(
            self.cfg.mlp, self.cfg.mlp_bias) + shared_tensor_names(self.cfg)

    def arrays(self) -> Dict[str, np.ndarray]:
        """Name -> array, router first."""
        return {n: getattr(self, n) for n in self.names}

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())

    def local_index(self, expert: int) -> int:
        """Position of a global expert id in the per-expert arrays."""
        try:
            return self.expert_ids.index(expert)
        except ValueError:
            raise KeyError(f"expert {expert} is not held here (held: {self.expert_ids})") from None

    def subset(self, expert_ids: Iterable[int]) -> "MoEWeights":
        """The same weights restricted to some experts (router kept whole)."""
        ids = tuple(sorted(set(int(e) for e in expert_ids)))
        rows = [self.local_index(e) for e in ids]
        arrays = {n: getattr(self, n)
                  for n in router_tensor_names(self.cfg) + shared_tensor_names(self.cfg)}
        for n in expert_tensor_names(self.cfg.mlp, self.cfg.mlp_bias):
            arrays[n] = getattr(self, n)[rows]
        return MoEWeights(self.cfg, expert_ids=ids, **arrays)

    # ------------------------------------------------------------------ random
    @classmethod
    def from_checkpoint(cls, cfg: MoEConfig, tensors, layer: int, naming: str) -> "MoEWeights":
        """One layer's weights from a mapping of checkpoint tensors (by published name):
        :func:`flashmoe_core.checkpoint.weights_from_checkpoint`, whose docstring and the
        README's table give every naming."""
        from .checkpoint import weights_from_checkpoint  # it builds on this module

        return weights_from_checkpoint(cfg, tensors, layer, naming)

    @classmethod
    def random(cls, cfg: MoEConfig, seed: int = 0,
               expert_ids: Optional[Sequence[int]] = None) -> "MoEWeights":
        """Deterministic random weights scaled so layer outputs are O(1).

        Every (tensor, expert) pair has its own random stream keyed by ``seed``, so a
        rank that materialises only its own experts gets exactly the same values as a
        process that materialises all of them.
        """
        seed = _count("seed", seed)
        ids = tuple(range(cfg.experts)) if expert_ids is None else tuple(sorted(expert_ids))
        h, f = cfg.hidden, cfg.ffn
        gain = 2.0 if cfg.activation == "relu" else 2.5

        def draw(name: str, shape: tuple, scale: float, expert: int = 0) -> np.ndarray:
            rng = np.random.default_rng([int(seed), _TENSOR_IDS[name], expert])
            return round_to(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale),
                            cfg.dtype)

        arrays = {"router": draw("router", (h, cfg.experts), 1.0 / np.sqrt(h))}
        if cfg.router_bias:
            arrays["router_bias"] = draw("router_bias", (cfg.experts,), 0.5)
        if cfg.selection_bias:
            rng = np.random.default_rng([int(seed), _TENSOR_IDS["selection_bias"], 0])
            arrays["selection_bias"] = rng.standard_normal(cfg.experts, dtype=np.float32) \
                * np.float32(0.05)
        per_expert = {
            "w1": ((h, f), 1.0 / np.sqrt(h)),
            "b1": ((f,), 0.1),
            "w2": ((f, h), np.sqrt(gain / f)),
            "b2": ((h,), 0.1),
            "wg": ((h, f), 1.0 / np.sqrt(h)),
            "wu": ((h, f), 1.0 / np.sqrt(h)),
        }
        if cfg.mlp == "gated":
            per_expert["w2"] = ((f, h), np.sqrt(2.0 * gain / f))
        per_expert.update(bg=((f,), 0.1), bu=((f,), 0.1))
        for name in expert_tensor_names(cfg.mlp, cfg.mlp_bias):
            shape, scale = per_expert[name]
            arrays[name] = np.stack([draw(name, shape, scale, e) for e in ids]) if ids else \
                np.zeros((0,) + shape, dtype=storage_dtype(cfg.dtype))
        s = cfg.shared_width
        shared = {"w1": ((h, s), 1.0 / np.sqrt(h)), "b1": ((s,), 0.1),
                  "w2": ((s, h), np.sqrt((2.0 if cfg.mlp == "gated" else 1.0) * gain / max(s, 1))),
                  "b2": ((h,), 0.1), "wg": ((h, s), 1.0 / np.sqrt(h)),
                  "wu": ((h, s), 1.0 / np.sqrt(h)), "bg": ((s,), 0.1), "bu": ((s,), 0.1),
                  "gate": ((h,), 1.0 / np.sqrt(h))}
        for name in shared_tensor_names(cfg):
            shape, scale = shared[name[len("shared_"):]]
            arrays[name] = draw(name, shape, scale)
        return cls(cfg, expert_ids=ids, **arrays)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.names)
        return f"MoEWeights({self.cfg.dtype}, experts={len(self.expert_ids)}, {shapes})"


def check_weights(cfg: MoEConfig, weights: MoEWeights) -> MoEWeights:
    """Check that ``weights`` fit ``cfg``; every entry point calls this before using them.

    The weights must have been built for a config that agrees with ``cfg`` on
    :data:`WEIGHT_FIELDS`, and their arrays must still have the shapes and storage type
    that config gives them (an attribute replaced after construction is caught too).

    Raises
    ------
    TypeError
        When ``weights`` is not a :class:`MoEWeights`.
    ValueError
        Naming the field or array that differs, what it is and what ``cfg`` needs.
    """
    if not isinstance(weights, MoEWeights):
        raise TypeError(f"weights must be MoEWeights, got {type(weights).__name__}")
    for field in WEIGHT_FIELDS:
        built, here = getattr(weights.cfg, field), getattr(cfg, field)
        if built != here:
            raise ValueError(
                f"the weights were built for MoEConfig.{field}={built!r}, but this config has "
                f"{field}={here!r}; build them for this config (MoEWeights.random(cfg, seed) "
                "or MoEWeights(cfg, ...))")
    for name, shape in MoEWeights.expected_shapes(cfg, len(weights.expert_ids)).items():
        want = np.dtype(np.float32) if name in _FLOAT32 else storage_dtype(cfg.dtype)
        a = getattr(weights, name, None)
        if not isinstance(a, np.ndarray) or a.shape != shape or a.dtype != want:
            got = (f"{a.shape} {a.dtype}" if isinstance(a, np.ndarray)
                   else type(a).__name__)
            raise ValueError(f"weights.{name} is {got}, but this config needs {shape} {want} "
                             f"({len(weights.expert_ids)} experts held); build the weights "
                             "again instead of replacing their arrays")
    return weights


def random_tokens(cfg: MoEConfig, seed: int = 0, tokens: Optional[int] = None,
                  rank: int = 0) -> np.ndarray:
    """Deterministic N(0, 1) activations [tokens, hidden] for one rank, rounded to dtype."""
    t = cfg.tokens if tokens is None else _count("tokens", tokens, 1)
    rng = np.random.default_rng([_count("seed", seed), 1000, _count("rank", rank)])
    return round_to(rng.standard_normal((t, cfg.hidden), dtype=np.float32), cfg.dtype)
