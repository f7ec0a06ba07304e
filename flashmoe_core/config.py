"""The MoE layer configuration: one frozen, validated value object.

Every field is checked on construction; an impossible or unsupported value raises
``ValueError`` naming the field, the value and what is allowed, so bad input is
rejected before anything touches a GPU.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from typing import Any, Optional, Tuple

import numpy as np

__all__ = ["MoEConfig", "MLP_KINDS", "ACTIVATIONS", "DTYPES", "MAX_TOP_K", "MAX_EXPERTS",
           "SCORINGS", "ROUTER_LOGITS", "CAPACITY_ORDERS", "MAX_SHARED"]

MLP_KINDS = ("vanilla", "gated")
ACTIVATIONS = ("relu", "gelu", "silu", "swiglu_clamped")
DTYPES = ("float32", "tfloat32", "bfloat16", "float16")
# Each token's choices live in registers of the one warp that routes it (and a
# caller-routed forward counts one slot per lane): 16 covers the models in use
# (Qwen3-Next routes 10 of 512) with room; the kernels assert the same bound.
MAX_TOP_K = 16
MAX_EXPERTS = 1024
MAX_TOKENS = 1 << 20
# Rows travel and stream through shared memory in 16-byte vectors: 8 elements of a
# 16-bit type, 4 of a 32-bit one. A multiple of 8 works for every dtype.
ROW_ALIGN = 8
MAX_WORLD_SIZE = 1024
SCORINGS = ("softmax", "sigmoid")
ROUTER_LOGITS = ("float32", "storage")
CAPACITY_ORDERS = ("token", "slot")
MAX_SHARED = 64


def _fail(field: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"MoEConfig.{field}={value!r} is not allowed: {allowed}")


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def _is_int(value: Any) -> bool:
    """Python and NumPy integers alike (np.int64 from an array is as good as an int)."""
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def _check_int(field: str, value: Any, lo: int, hi: int, extra: str = "") -> int:
    """The value as a Python int, if it is an integer (Python or NumPy) in [lo, hi]."""
    if not _is_int(value) or not lo <= value <= hi:
        raise _fail(field, value, f"an int in [{lo}, {hi}]{extra}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Shape, numerics and placement of one MoE layer.

    Parameters
    ----------
    tokens : int
        Tokens per rank. For the GPU layer this is an upper bound: a forward pass
        may carry any token count from 1 to ``tokens`` without recompiling.
    hidden : int
        Model width (a multiple of 8).
    ffn : int
        Expert intermediate width (a multiple of 8).
    experts : int
        Number of experts in the whole layer (all ranks together).
    top_k : int
        Experts per token, 1..16 (``MAX_TOP_K``: each token's choices live in the
        registers of the warp that routes it) and at most ``experts``.
    mlp : {"vanilla", "gated"}
        ``"vanilla"``: ``act(x W1 + b1) W2 + b2``. ``"gated"``: ``(act(x Wg) * (x Wu)) W2``.
    activation : {"relu", "gelu", "silu", "swiglu_clamped"}
        ``gelu`` is the exact erf form, ``silu`` is ``x * sigmoid(x)``.
        ``swiglu_clamped`` (gated MLP only; GPT-OSS) replaces ``act(g) * u`` by
        ``g' * sigmoid(alpha * g') * (u' + 1)`` with ``g' = min(g, limit)`` and ``u'`` =
        ``u`` clamped to ``[-limit, limit]`` (``swiglu_alpha``, ``swiglu_limit``).
    dtype : {"float32", "tfloat32", "bfloat16", "float16"}
        Storage type of activations and weights. ``tfloat32`` stores float32 arrays
        whose values are rounded to TF32 (10-bit mantissa). Accumulation is float32.
    capacity_factor : float or None
        ``None`` is dropless. Otherwise each (expert, source rank) pair accepts at
        most ``ceil(capacity_factor * tokens * top_k / experts)`` assignments.
    capacity_order : {"token", "slot"}
        Which assignments an expert keeps when it is over capacity: the first in token
        order, then slot order (``"token"``), or slot-major: every token's first choice
        before any second choice, tokens in order within a slot (``"slot"``, NLLB-MoE).
    renormalize_after_drop : bool
        Scale each token's kept weights to sum to ``routed_scaling`` after the capacity
        drop (NLLB-MoE normalises after dropping): a token that lost a slot puts its
        whole weight on the others.
    renormalize : bool
        Scale each token's top-k weights to sum to 1.
    world_size : int
        Number of ranks (GPUs) sharing the experts.
    placement : tuple of int or None
        Owner rank of every expert. ``None`` gives contiguous blocks, the first
        ``experts % world_size`` ranks holding one expert more.

    Routing rules (defaults: softmax over all experts, then top-k, as Mixtral, Qwen
    and OLMoE; the oracle :mod:`flashmoe_core.oracle.reference` states each as a formula):

    scoring : {"softmax", "sigmoid"}
        Scores from the logits: a softmax over all experts, or a per-expert sigmoid
        (DeepSeek-V3).
    softmax_after_topk : bool
        Choose the top-k by logit, then weight them by a softmax over the k chosen
        logits (GPT-OSS). Needs ``scoring="softmax"``; ``renormalize`` changes nothing.
    router_bias : bool
        A bias per expert added to the logits (GPT-OSS): ``MoEWeights.router_bias``.
    selection_bias : bool
        A bias per expert added to the scores only to choose the experts, not to
        weight them (DeepSeek-V3's score correction): ``MoEWeights.selection_bias``.
    n_group, topk_group : int
        Group-limited top-k (DeepSeek-V3): experts form ``n_group`` contiguous groups;
        a group's score is the sum of its two best selection scores; experts outside
        the ``topk_group`` best groups are not eligible. ``1, 1`` is off.
    routed_scaling : float
        Every combine weight is multiplied by this after renormalisation (DeepSeek).
    router_logits : {"float32", "storage"}
        Keep the router logits in float32 (DeepSeek, Switch), or round them to the
        storage type before scoring (as Mixtral and Qwen compute them in bf16).
    mlp_bias : bool
        Gated MLP with biases on its three projections (GPT-OSS): ``MoEWeights.bg``,
        ``bu`` [E, ffn] and ``b2`` [E, hidden]. The vanilla MLP always has its biases.
    swiglu_alpha, swiglu_limit : float
        The constants of ``activation="swiglu_clamped"`` (GPT-OSS: 1.702 and 7.0).

    Shared experts (always on, every token; DeepSeek-V3, Qwen2-MoE):

    n_shared : int
        Number of shared experts (0: none). They have the routed experts' MLP kind,
        activation and biases, and run as one MLP of width ``n_shared * shared_ffn`` (their
        intermediates side by side, one down projection), as the models implement them;
        the output adds to the routed experts' combine.
    shared_ffn : int or None
        Intermediate width of each shared expert (a multiple of 8); ``None``: ``ffn``.
    shared_gate : bool
        Scale the shared output per token by ``sigmoid(x . w)`` (Qwen2-MoE's
        ``shared_expert_gate``): ``MoEWeights.shared_gate`` [hidden].
    """

    tokens: int
    hidden: int
    ffn: int
    experts: int
    top_k: int = 2
    mlp: str = "vanilla"
    activation: str = "relu"
    dtype: str = "bfloat16"
    capacity_factor: Optional[float] = None
    renormalize: bool = True
    world_size: int = 1
    placement: Optional[Tuple[int, ...]] = None
    scoring: str = "softmax"
    softmax_after_topk: bool = False
    router_bias: bool = False
    selection_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    router_logits: str = "float32"
    mlp_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    n_shared: int = 0
    shared_ffn: Optional[int] = None
    shared_gate: bool = False
    capacity_order: str = "token"
    renormalize_after_drop: bool = False

    def __post_init__(self) -> None:
        # Integer fields are stored as Python ints whatever integer type came in, so
        # that equal configs compare, hash and serialise alike.
        self._set("tokens", _check_int("tokens", self.tokens, 1, MAX_TOKENS))
        for name in ("hidden", "ffn"):
            value = _check_int(name, getattr(self, name), ROW_ALIGN, 1 << 16,
                               f" and a multiple of {ROW_ALIGN}")
            if value % ROW_ALIGN:
                raise _fail(
                    name, value,
                    f"a multiple of {ROW_ALIGN} (rows move as 16-byte vectors); "
                    f"pad it to {math.ceil(value / ROW_ALIGN) * ROW_ALIGN}")
            self._set(name, value)
        self._set("experts", _check_int("experts", self.experts, 1, MAX_EXPERTS))
        self._set("top_k", _check_int("top_k", self.top_k, 1, MAX_TOP_K))
        if self.top_k > self.experts:
            raise _fail("top_k", self.top_k, f"at most experts={self.experts}")
        if self.mlp not in MLP_KINDS:
            raise _fail("mlp", self.mlp, f"one of {MLP_KINDS}")
        if self.activation not in ACTIVATIONS:
            raise _fail("activation", self.activation, f"one of {ACTIVATIONS}")
        if self.dtype not in DTYPES:
            raise _fail("dtype", self.dtype, f"one of {DTYPES}")
        cf = self.capacity_factor
        if cf is not None:
            if _is_bool(cf) or not isinstance(cf, numbers.Real) or not math.isfinite(cf) \
                    or cf <= 0:
                raise _fail("capacity_factor", cf, "None (dropless) or a finite number > 0")
            self._set("capacity_factor", float(cf))
        if not _is_bool(self.renormalize):
            raise _fail("renormalize", self.renormalize, "True or False")
        self._set("renormalize", bool(self.renormalize))
        self._set("world_size", _check_int("world_size", self.world_size, 1, MAX_WORLD_SIZE))
        if self.tokens * self.world_size * self.top_k >= 1 << 31:
            raise _fail("tokens", self.tokens,
                        "tokens * world_size * top_k below 2**31 (32-bit assignment indices)")
        if self.placement is not None:
            placement = self.placement
            if isinstance(placement, (str, bytes)) or not hasattr(placement, "__len__"):
                raise _fail("placement", placement, "None or a sequence of owner ranks")
            placement = tuple(placement)
            if len(placement) != self.experts:
                raise _fail("placement", self.placement,
                            f"one owner rank per expert ({self.experts} entries), "
                            f"got {len(placement)}")
            for e, owner in enumerate(placement):
                if not _is_int(owner) or not 0 <= owner < self.world_size:
                    raise _fail("placement", self.placement,
                                f"owner ranks in [0, {self.world_size}); expert {e} has {owner!r}")
            self._set("placement", tuple(int(owner) for owner in placement))
        self._check_routing_rules()
        self._check_shared()
        if self.capacity_order not in CAPACITY_ORDERS:
            raise _fail("capacity_order", self.capacity_order, f"one of {CAPACITY_ORDERS}")
        if not _is_bool(self.renormalize_after_drop):
            raise _fail("renormalize_after_drop", self.renormalize_after_drop, "True or False")
        self._set("renormalize_after_drop", bool(self.renormalize_after_drop))

    def _check_shared(self) -> None:
        self._set("n_shared", _check_int("n_shared", self.n_shared, 0, MAX_SHARED))
        if not _is_bool(self.shared_gate):
            raise _fail("shared_gate", self.shared_gate, "True or False")
        self._set("shared_gate", bool(self.shared_gate))
        if self.n_shared == 0:
            if self.shared_ffn is not None:
                raise _fail("shared_ffn", self.shared_ffn, "None without shared experts "
                            "(n_shared=0)")
            if self.shared_gate:
                raise _fail("shared_gate", True, "False without shared experts (n_shared=0)")
            return
        sf = self.ffn if self.shared_ffn is None else self.shared_ffn
        sf = _check_int("shared_ffn", sf, ROW_ALIGN, 1 << 16, f" and a multiple of {ROW_ALIGN}")
        if sf % ROW_ALIGN:
            raise _fail("shared_ffn", sf, f"a multiple of {ROW_ALIGN} (rows move as 16-byte "
                        f"vectors); pad it to {math.ceil(sf / ROW_ALIGN) * ROW_ALIGN}")
        if self.n_shared * sf > 1 << 16:
            raise _fail("shared_ffn", sf, f"n_shared * shared_ffn at most {1 << 16} (the "
                        f"shared MLP's width), got {self.n_shared} * {sf}")
        self._set("shared_ffn", sf)

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    def _check_routing_rules(self) -> None:
        if self.scoring not in SCORINGS:
            raise _fail("scoring", self.scoring, f"one of {SCORINGS}")
        for name in ("softmax_after_topk", "router_bias", "selection_bias"):
            v = getattr(self, name)
            if not (isinstance(v, bool) or type(v).__name__ == "bool_"):  # NumPy's too
                raise _fail(name, v, "True or False")
            object.__setattr__(self, name, bool(v))
        if self.softmax_after_topk and self.scoring != "softmax":
            raise _fail("softmax_after_topk", True,
                        f"only with scoring='softmax' (it is a softmax over the chosen "
                        f"logits), not scoring={self.scoring!r}")
        for name in ("n_group", "topk_group"):
            v = getattr(self, name)
            if isinstance(v, bool) or not hasattr(v, "__index__"):
                raise _fail(name, v, f"an int in [1, {self.experts}]")
            object.__setattr__(self, name, int(v))
            if not 1 <= getattr(self, name) <= self.experts:
                raise _fail(name, v, f"an int in [1, {self.experts}]")
        if self.n_group > 32:
            raise _fail("n_group", self.n_group,
                        "at most 32 (the fused kernel keeps one group score per register)")
        if self.experts % self.n_group:
            raise _fail("n_group", self.n_group,
                        f"a divisor of experts={self.experts} (groups are equal and "
                        "contiguous)")
        if self.n_group > 1 and self.experts // self.n_group < 2:
            raise _fail("n_group", self.n_group,
                        "at most experts / 2: a group's score is its two best experts")
        if self.topk_group > self.n_group:
            raise _fail("topk_group", self.topk_group, f"at most n_group={self.n_group}")
        if self.n_group > 1 and self.topk_group * (self.experts // self.n_group) < self.top_k:
            raise _fail("topk_group", self.topk_group,
                        f"enough groups for top_k={self.top_k}: topk_group * experts / "
                        f"n_group >= top_k")
        if self.n_group > 1 and self.softmax_after_topk:
            raise _fail("n_group", self.n_group, "1 with softmax_after_topk")
        rs = self.routed_scaling
        try:
            ok = not isinstance(rs, (bool, str)) and math.isfinite(float(rs)) and float(rs) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise _fail("routed_scaling", rs, "a finite number > 0")
        object.__setattr__(self, "routed_scaling", float(rs))
        if self.router_logits not in ROUTER_LOGITS:
            raise _fail("router_logits", self.router_logits, f"one of {ROUTER_LOGITS}")
        if not (isinstance(self.mlp_bias, bool) or type(self.mlp_bias).__name__ == "bool_"):
            raise _fail("mlp_bias", self.mlp_bias, "True or False")
        object.__setattr__(self, "mlp_bias", bool(self.mlp_bias))
        if self.mlp_bias and self.mlp != "gated":
            raise _fail("mlp_bias", True, "only with mlp='gated' (the vanilla MLP always "
                        "has its biases)")
        if self.activation == "swiglu_clamped" and self.mlp != "gated":
            raise _fail("activation", self.activation, "only with mlp='gated'")
        for name in ("swiglu_alpha", "swiglu_limit"):
            v = getattr(self, name)
            try:
                ok = not isinstance(v, (bool, str)) and math.isfinite(float(v)) and float(v) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise _fail(name, v, "a finite number > 0")
            object.__setattr__(self, name, float(v))

    @property
    def default_routing(self) -> bool:
        """True when the routing is the plain softmax-then-top-k family (capacity drops
        in token order, no renormalisation after them)."""
        return (self.scoring == "softmax" and not self.softmax_after_topk
                and not self.router_bias and not self.selection_bias and self.n_group == 1
                and self.routed_scaling == 1.0 and self.router_logits == "float32"
                and self.capacity_order == "token" and not self.renormalize_after_drop)

    # ----------------------------------------------------------------- derived values
    @property
    def expert_owner(self) -> Tuple[int, ...]:
        """Owner rank of each expert (``placement``, or contiguous blocks)."""
        if self.placement is not None:
            return self.placement
        base, extra = divmod(self.experts, self.world_size)
        owners = []
        for rank in range(self.world_size):
            owners += [rank] * (base + (1 if rank < extra else 0))
        return tuple(owners)

    def local_experts(self, rank: int) -> Tuple[int, ...]:
        """Global ids of the experts owned by ``rank``, ascending."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank={rank} is outside [0, world_size={self.world_size})")
        return tuple(e for e, r in enumerate(self.expert_owner) if r == rank)

    @property
    def max_local_experts(self) -> int:
        """The most experts any rank owns (sizes per-rank buffers identically)."""
        counts = [0] * self.world_size
        for r in self.expert_owner:
            counts[r] += 1
        return max(counts)

    def capacity(self, tokens: Optional[int] = None) -> Optional[int]:
        """Assignments one source rank may send one expert; ``None`` when dropless.

        Parameters
        ----------
        tokens : int, optional
            Tokens on the source rank in this pass (defaults to ``self.tokens``).
        """
        if self.capacity_factor is None:
            return None
        t = self.tokens if tokens is None else tokens
        return math.ceil(self.capacity_factor * t * self.top_k / self.experts)

    @property
    def shared_width(self) -> int:
        """Intermediate width of the shared MLP: ``n_shared * shared_ffn`` (0: none)."""
        return self.n_shared * (self.shared_ffn or 0)

    @property
    def storage_dtype(self) -> str:
        """NumPy-side storage type: tfloat32 values live in float32 arrays."""
        return "float32" if self.dtype == "tfloat32" else self.dtype

    def flops(self, tokens: Optional[int] = None, kept: Optional[int] = None) -> int:
        """Useful FLOPs of one forward pass on one rank: the router GEMM, the expert
        GEMMs of the ``kept`` assignments (default: all ``tokens * top_k``; dropped
        assignments do no useful work) and the shared experts' over every token."""
        t = self.tokens if tokens is None else tokens
        k = t * self.top_k if kept is None else int(kept)
        gemms = 3 if self.mlp == "gated" else 2
        shared = gemms * 2 * t * self.hidden * self.shared_width + \
            (2 * t * self.hidden if self.shared_gate else 0)
        return 2 * t * self.hidden * self.experts + gemms * 2 * k * self.hidden * self.ffn + \
            shared

    def replace(self, **changes: Any) -> "MoEConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["placement"] is not None:
            d["placement"] = list(d["placement"])
        return d

    def to_json(self, **kwargs: Any) -> str:
        """Serialise to JSON (``from_json`` reads it back to an equal config)."""
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_dict(cls, d: dict) -> "MoEConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a MoEConfig JSON document must be an object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown MoEConfig field(s) {unknown}; known fields: {sorted(known)}")
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"MoEConfig JSON lacks required field(s) {missing}")
        d = dict(d)
        if d.get("placement") is not None and isinstance(d["placement"], list):
            d["placement"] = tuple(d["placement"])
        return cls(**d)

    @classmethod
    def from_hf_config(cls, hf: dict, tokens: int, dtype: Optional[str] = None,
                       **overrides: Any) -> "MoEConfig":
        """The config of a model's MoE layers from its ``config.json`` fields:
        :func:`flashmoe_core.checkpoint.config_from_hf` (which documents the families)."""
        from .checkpoint import config_from_hf  # the checkpoint module builds on this one

        return config_from_hf(hf, tokens, dtype, **overrides)

    @classmethod
    def from_json(cls, text: str) -> "MoEConfig":
        """Parse a config written by ``to_json`` (or by hand)."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"MoEConfig JSON is not valid JSON: {exc}") from None
        return cls.from_dict(d)
