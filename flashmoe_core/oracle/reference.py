"""The NumPy oracle: the exact semantics the GPU kernel implements.

Semantics, pinned (the kernel follows them; tests compare against them):

1. Inputs and weights are rounded to ``cfg.dtype`` (``tfloat32``: round half away
   from zero to a 10-bit mantissa, like ``cvt.rna.tf32.f32``).
2. Router logits ``z = x @ router`` with float32 accumulation (plus ``router_bias``,
   added to the exact sum, when the config has one). The oracle forms every dot
   product in float64 and rounds once to float32, i.e. an error-free float32
   accumulator; the GPU's float32 sums differ from it only by rounding. With
   ``router_logits="storage"`` the logits are then rounded to the storage type.
3. Scores ``s``: ``softmax(z)`` over all experts, or ``sigmoid(z)`` per expert
   (``scoring``), in float64 from the float32 logits, rounded to float32.
4. Top-k by the selection key ``c`` (``c = s``; ``c = s + selection_bias`` with a
   selection bias, in float32; ``c = z`` with ``softmax_after_topk``); equal keys go to
   the lower expert id. Group-limited (``n_group > 1``): experts ``[g*E/G, (g+1)*E/G)``
   form group ``g``, a group's score is the float32 sum of its two largest ``c``, the
   ``topk_group`` best groups (ties to the lower group) stay eligible and every other
   expert's key is ``-inf``.
5. Combine weights: the chosen scores ``s[e_j]`` (never the selection key), divided by
   their sum when ``renormalize``; with ``softmax_after_topk`` a softmax over the k
   chosen logits instead (already normalised); then times ``routed_scaling``. In
   float64, rounded once to float32.
6. Capacity (when ``capacity_factor`` is set) is per (expert, source rank):
   ``ceil(capacity_factor * t * top_k / experts)`` with ``t`` the source rank's token
   count. Assignments claim places in token order, then slot order (``capacity_order=
   "token"``), or slot-major: slot 0 of every token in token order, then slot 1, ...
   (``"slot"``); those past the capacity are dropped and contribute zero. The kept ones
   keep their weights, unless ``renormalize_after_drop``: the combine then weighs kept
   slot j by ``routed_scaling * w_j / sum_kept w`` (in float32; 0 if nothing is kept),
   while ``routing.weights`` still reports the weights before the drop.
7. Expert FFN with float32 accumulation; bias added to the float32 sum; activation
   in float32 (``gelu`` exact erf form, ``silu = x * sigmoid(x)``); the intermediate is
   rounded to ``cfg.dtype``. Gated: ``act(x Wg) * (x Wu)`` in float32, then rounded
   (with ``mlp_bias``: ``g = x Wg + bg``, ``u = x Wu + bu``, output ``+ b2``; with the
   clamped SwiGLU: ``min(g, L) * sigmoid(a * min(g, L)) * (clip(u, -L, L) + 1)``).
8. Each expert's output row is rounded to ``cfg.dtype`` (it travels in that type).
9. Combine: ``sum_j weight_j * y_j`` over the kept assignments in float32 (float64 in
   the oracle, rounded once), then rounded to ``cfg.dtype``.

Non-finite values (NaN, +-inf), the same in the oracle, the fused kernel on a GPU and
on the CPU emulator:

10. A token is *marked* when any of its router logits is not finite. A NaN or an
    infinity anywhere in its ``x`` row always does that (it reaches every logit), a
    non-finite router weight does it for every token, and so does a logit beyond the
    float32 range. A marked token is not routed: ``routing.experts`` is -1,
    ``routing.weights`` NaN and ``routing.kept`` False in every slot; it claims no
    capacity, reaches no expert, and its output row is NaN in every column. No token is
    re-weighted or sent to an expert its logits did not choose.
11. A non-finite expert weight counts as NaN (an infinity times a zero is NaN in one
    summation order and an infinity in another; NaN is what every backend agrees on)
    and propagates through the float math to the rows that use it: a NaN in ``w1``,
    ``b1``, ``wg`` or ``wu`` of expert e makes every column of the output row of each
    token with a kept assignment to e NaN; one in column c of ``w2`` or ``b2`` makes
    column c of those rows NaN. Dropped assignments pass nothing on. The weight arrays
    themselves are left as given.
12. Finite inputs whose sums overflow (beyond float32, or beyond the storage type when
    an intermediate is rounded) give infinities by each backend's own rounding: the
    backends agree except at that boundary.

Shared experts:

13. With ``n_shared > 0``: one MLP of width ``S = n_shared * shared_ffn`` (the
    shared experts' intermediates side by side) applied to every token with rule 7's
    numerics, its output row rounded to ``cfg.dtype`` (``ys``). With ``shared_gate``,
    ``g = sigmoid(x . w_gate)`` per token (the dot product with a float32 accumulator,
    the sigmoid in float64 from it, rounded to float32); else ``g = 1``. The combine
    then adds ``g * ys`` after the slots: ``y = sum_j weight_j * y_j + g * ys`` in one
    float32 sum, rounded to ``cfg.dtype``. Shared experts take no capacity and are not
    scaled by ``routed_scaling``; a marked token's row stays NaN, and a NaN shared weight
    reaches every token as rule 11 says (its column for ``w2``, ``b2``).

Layers built with ``check_finite=True`` refuse non-finite input before the launch
instead, naming the tensor and its first non-finite element.

Tokens of a multi-rank layer are given rank-major: ``x`` has ``world_size * t`` rows,
rows ``[r*t, (r+1)*t)`` belonging to rank ``r``.

Every product goes through :func:`matmul_f32`, which gives each output row the same
bits whatever other rows share the call; that is what lets the distributed oracle
equal this one bit for bit.

:func:`moe_backward` is the matching gradient oracle: exact float64 math through the
same routing (held fixed), checked against finite differences.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..config import MoEConfig
from ..numerics import (activation, activation_grad, as_f32, erfc, gated, nonfinite_to_nan,
                        round_to, storage_dtype)
from ..weights import MoEWeights, check_weights, expert_tensor_names, gradient_tensor_names

__all__ = ["Routing", "moe_forward", "gate", "route", "route_tokens", "expert_ffn", "combine",
           "shared_experts",
           "matmul_f32", "given_routing", "with_capacity", "check_tokens", "marked_tokens",
           "moe_forward_exact", "MoEGrads", "moe_backward"]


class Routing(NamedTuple):
    """Per-token expert choices.

    Attributes
    ----------
    experts : ndarray of int32, [T, k]
        Chosen expert ids, in descending probability; -1 in every slot of a marked
        token (one with a non-finite router logit, see the module's rule 10).
    weights : ndarray of float32, [T, k]
        Combine weights (renormalised when the config says so); NaN for a marked token.
    kept : ndarray of bool, [T, k]
        False where the capacity rule dropped the assignment, and for a marked token.
    """

    experts: np.ndarray
    weights: np.ndarray
    kept: np.ndarray


# Every matrix product runs on row blocks of this fixed height (the last one padded),
# so a row's result never depends on how many rows share the call.
_ROW_BLOCK = 128


def matmul_f32(a: np.ndarray, b: np.ndarray, bias: Optional[np.ndarray] = None) -> np.ndarray:
    """``a @ b (+ bias)`` with an error-free float32 accumulator, rounded once.

    Parameters
    ----------
    a : ndarray [M, K], any float type
    b : ndarray [K, N], any float type
    bias : ndarray [N], optional
        Added to the exact sum before rounding.
    """
    a64 = np.asarray(a).astype(np.float64, copy=False)
    b64 = np.ascontiguousarray(np.asarray(b).astype(np.float64, copy=False))
    m = a64.shape[0]
    out = np.empty((m, b64.shape[1]), dtype=np.float32)
    bias64 = None if bias is None else np.asarray(bias).astype(np.float64, copy=False)
    block = np.zeros((_ROW_BLOCK, a64.shape[1]), dtype=np.float64)
    for start in range(0, m, _ROW_BLOCK):
        n = min(_ROW_BLOCK, m - start)
        block[:n] = a64[start:start + n]
        block[n:] = 0.0
        r = block @ b64
        if bias64 is not None:
            r += bias64
        out[start:start + n] = r[:n]
    return out


def _weight64(w: np.ndarray) -> np.ndarray:
    """A weight array as the oracle multiplies with it: float64, infinities as NaN
    (rule 11)."""
    return nonfinite_to_nan(np.asarray(w).astype(np.float64))


def marked_tokens(routing: Routing) -> np.ndarray:
    """bool [T]: the tokens a routing marks as not routed (rule 10: expert -1)."""
    return (np.asarray(routing.experts) < 0).any(axis=1)


def check_tokens(cfg: MoEConfig, x: np.ndarray) -> int:
    """Validate rank-major token rows; returns the tokens per rank."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != cfg.hidden:
        raise ValueError(f"x has shape {x.shape}; expected [world_size * tokens, hidden="
                         f"{cfg.hidden}]")
    rows = x.shape[0]
    if rows == 0 or rows % cfg.world_size:
        raise ValueError(f"x has {rows} rows; expected world_size={cfg.world_size} equal "
                         f"blocks of 1..{cfg.tokens} tokens (rank-major)")
    t = rows // cfg.world_size
    if t > cfg.tokens:
        raise ValueError(f"x carries {t} tokens per rank, above the configured bound "
                         f"tokens={cfg.tokens}; raise MoEConfig.tokens")
    if x.dtype.kind not in "fV":
        raise ValueError(f"x has dtype {x.dtype}; expected a floating type")
    return t


def gate(cfg: MoEConfig, weights: MoEWeights, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Router logits and scores (softmax probabilities or sigmoids), float32 [T, experts]
    (rules 2 and 3). A token whose logits are not all finite gets NaN scores (rule 10)."""
    check_weights(cfg, weights)
    xr = round_to(x, cfg.dtype)
    bias = _weight64(weights.router_bias) if cfg.router_bias else None
    logits = matmul_f32(xr, _weight64(weights.router), bias)
    if cfg.router_logits == "storage":
        logits = as_f32(round_to(logits, cfg.dtype))
    l64 = logits.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # marked rows are set below
        if cfg.scoring == "sigmoid":
            scores = (1.0 / (1.0 + np.exp(-l64))).astype(np.float32)
        else:
            e = np.exp(l64 - l64.max(axis=1, keepdims=True))
            scores = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    scores[~np.isfinite(logits).all(axis=1)] = np.nan
    return logits, scores


def _group_mask(cfg: MoEConfig, key: np.ndarray) -> np.ndarray:
    """Selection keys with every expert outside a token's ``topk_group`` best groups
    at -inf (rule 4)."""
    t, e = key.shape
    groups = key.reshape(t, cfg.n_group, e // cfg.n_group)
    top2 = -np.sort(-groups, axis=2)[:, :, :2]
    score = (top2[:, :, 0] + top2[:, :, 1]).astype(np.float32)
    best = np.argsort(-score, axis=1, kind="stable")[:, :cfg.topk_group]
    keep = np.zeros((t, cfg.n_group), dtype=bool)
    np.put_along_axis(keep, best, True, axis=1)
    return np.where(np.repeat(keep, e // cfg.n_group, axis=1), key,
                    np.float32(-np.inf)).astype(np.float32)


def route(cfg: MoEConfig, probs: np.ndarray, tokens_per_rank: Optional[int] = None, *,
          logits: Optional[np.ndarray] = None,
          selection_bias: Optional[np.ndarray] = None) -> Routing:
    """Top-k, combine weights and the capacity rule for rank-major tokens (rules 4-6).

    ``probs`` are the scores :func:`gate` returns; ``logits`` are needed with
    ``softmax_after_topk``, ``selection_bias`` with a selection bias. A token whose
    scores are not all finite is marked (rule 10): expert -1, weight NaN, nothing kept,
    no capacity claimed.
    """
    t_all = probs.shape[0]
    t = t_all if tokens_per_rank is None else tokens_per_rank
    k = cfg.top_k
    marked = ~np.isfinite(probs).all(axis=1)
    key = probs
    if cfg.softmax_after_topk:
        if logits is None:
            raise ValueError("softmax_after_topk routes by logit: pass logits=")
        key = logits
    elif cfg.selection_bias:
        if selection_bias is None:
            raise ValueError("this config has a selection bias: pass selection_bias=")
        key = (probs + np.asarray(selection_bias, np.float32)).astype(np.float32)
    key = np.where(marked[:, None], np.float32(0), key)  # any order: overwritten below
    if cfg.n_group > 1:
        key = _group_mask(cfg, key)
    # Stable sort of the negated keys: ties keep the lower expert id first.
    experts = np.argsort(-key, axis=1, kind="stable")[:, :k].astype(np.int32)
    if cfg.softmax_after_topk:
        z = np.take_along_axis(logits, experts, axis=1).astype(np.float64)
        with np.errstate(invalid="ignore"):
            e = np.exp(z - z.max(axis=1, keepdims=True))
            w64 = e / e.sum(axis=1, keepdims=True)
    else:
        w64 = np.take_along_axis(probs, experts, axis=1).astype(np.float64)
        if cfg.renormalize:
            with np.errstate(invalid="ignore", divide="ignore"):
                w64 = w64 / w64.sum(axis=1, keepdims=True)
    weights = (w64 * cfg.routed_scaling).astype(np.float32)
    experts[marked] = -1
    weights[marked] = np.nan
    return with_capacity(cfg, experts, weights, t)


def with_capacity(cfg: MoEConfig, experts: np.ndarray, weights: np.ndarray,
                  tokens_per_rank: Optional[int] = None) -> Routing:
    """The Routing of chosen experts and weights once the capacity rule (6) has dropped
    what does not fit (per source rank of ``tokens_per_rank`` tokens); marked tokens
    (expert -1) keep nothing."""
    t_all, k = experts.shape
    t = t_all if tokens_per_rank is None else tokens_per_rank
    kept = np.ones((t_all, k), dtype=bool)
    cap = cfg.capacity(t)
    if cap is not None:
        for start in range(0, t_all, t):
            # Marked tokens form a group of their own (-1) and take no expert's slots.
            kept[start:start + t] = _capacity_mask(experts[start:start + t], cap,
                                                   cfg.capacity_order == "slot")
    kept[(experts < 0).any(axis=1)] = False
    return Routing(experts, weights, kept)


def _capacity_mask(experts: np.ndarray, cap: int, slot_major: bool = False) -> np.ndarray:
    """Keep the first ``cap`` assignments of each expert in (token, slot) order, or
    (slot, token) order when ``slot_major``."""
    if slot_major:
        return _capacity_mask(np.ascontiguousarray(experts.T), cap).T
    flat = experts.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_e = flat[order]
    starts = np.searchsorted(sorted_e, sorted_e, side="left")
    position = np.empty_like(flat)
    position[order] = np.arange(flat.size) - starts
    return (position < cap).reshape(experts.shape)


def expert_ffn(cfg: MoEConfig, weights: MoEWeights, expert: int, rows: np.ndarray) -> np.ndarray:
    """One expert applied to token rows; returns rows of the storage type."""
    check_weights(cfg, weights)
    i = weights.local_index(expert)
    w = {n: _weight64(getattr(weights, n)[i])
         for n in expert_tensor_names(cfg.mlp, cfg.mlp_bias)}
    return _mlp(cfg, w, rows)


def shared_experts(cfg: MoEConfig, weights: MoEWeights,
                   x: np.ndarray) -> Optional[Tuple[Optional[np.ndarray], np.ndarray]]:
    """The shared experts on token rows (rule 13): ``(g, ys)`` with ``g`` the gate,
    float32 [T] (``None`` without ``shared_gate``), and ``ys`` [T, hidden] of the
    storage type; ``None`` when the config has no shared experts."""
    check_weights(cfg, weights)
    if cfg.n_shared == 0:
        return None
    w = {n: _weight64(getattr(weights, "shared_" + n))
         for n in expert_tensor_names(cfg.mlp, cfg.mlp_bias)}
    ys = _mlp(cfg, w, x)
    g = None
    if cfg.shared_gate:
        logit = matmul_f32(round_to(x, cfg.dtype), _weight64(weights.shared_gate)[:, None])[:, 0]
        with np.errstate(over="ignore"):
            g = (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32)
    return g, ys


def _mlp(cfg: MoEConfig, w: Mapping[str, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """Rule 7 on token rows with float64 weights ``w`` (an expert's, or the shared
    MLP's); rows of the storage type."""
    xr = round_to(rows, cfg.dtype)
    if cfg.mlp == "vanilla":
        a = matmul_f32(xr, w["w1"], w["b1"])
        h = round_to(activation(cfg.activation, a), cfg.dtype)
        y = matmul_f32(h, w["w2"], w["b2"])
    else:
        bias = cfg.mlp_bias
        g = matmul_f32(xr, w["wg"], w["bg"] if bias else None)
        u = matmul_f32(xr, w["wu"], w["bu"] if bias else None)
        h = round_to(gated(cfg, g, u), cfg.dtype)
        y = matmul_f32(h, w["w2"], w["b2"] if bias else None)
    return round_to(y, cfg.dtype)


def combine(cfg: MoEConfig, routing: Routing, expert_out: np.ndarray,
            shared: Optional[Tuple[Optional[np.ndarray], np.ndarray]] = None) -> np.ndarray:
    """Weighted sum of each token's kept expert outputs ([T, k, hidden] -> [T, hidden]),
    plus the shared experts' ``(g, ys)`` (:func:`shared_experts`) after the slots; NaN
    rows for marked tokens (rule 10)."""
    w = np.where(routing.kept, routing.weights, 0.0).astype(np.float64)
    if cfg.renormalize_after_drop:  # rule 6: the kept weights sum to routed_scaling
        total = w.astype(np.float32).sum(axis=1, dtype=np.float32).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            w = np.where(total[:, None] > 0, w * (cfg.routed_scaling / total[:, None]), 0.0)
    acc = np.zeros((expert_out.shape[0], expert_out.shape[2]), dtype=np.float64)
    for j in range(expert_out.shape[1]):  # slot order; each product is exact in float64
        acc += w[:, j, None] * as_f32(expert_out[:, j]).astype(np.float64)
    if shared is not None:
        g, ys = shared
        ys64 = as_f32(ys).astype(np.float64)
        acc += ys64 if g is None else g.astype(np.float64)[:, None] * ys64
    acc[marked_tokens(routing)] = np.nan
    return round_to(acc.astype(np.float32), cfg.dtype)


def check_routing(cfg: MoEConfig, routing: Routing, tokens: int) -> Routing:
    """Validate a caller-supplied routing; returns it with canonical dtypes."""
    if not isinstance(routing, tuple) or len(routing) != 3:
        raise ValueError("routing must be a Routing(experts, weights, kept) tuple")
    experts, weights, kept = (np.asarray(a) for a in routing)
    shape = (tokens, cfg.top_k)
    for name, a in (("experts", experts), ("weights", weights), ("kept", kept)):
        if a.shape != shape:
            raise ValueError(f"routing.{name} has shape {a.shape}, expected {shape}")
    if experts.dtype.kind not in "iu" or experts.min() < -1 or experts.max() >= cfg.experts:
        raise ValueError(f"routing.experts must be integer ids in [0, {cfg.experts}), or -1 "
                         "for a marked token")
    if kept.dtype != bool:
        raise ValueError(f"routing.kept must be bool, got {kept.dtype}")
    none = experts < 0
    bad = np.nonzero((none.any(axis=1) & ~none.all(axis=1)) | (none & kept).any(axis=1))[0]
    if bad.size:
        raise ValueError(f"routing of token {int(bad[0])}: expert -1 marks a whole token "
                         "(every slot -1, none kept), not one slot")
    return Routing(experts.astype(np.int32), weights.astype(np.float32), kept)


def given_routing(cfg: MoEConfig, routing, tokens: int) -> Tuple[np.ndarray, np.ndarray]:
    """Experts and combine weights a caller supplies for ``tokens`` tokens (a
    :class:`Routing`, whose ``kept`` is ignored: capacity decides, or an ``(experts,
    weights)`` pair); returns them as int32 and float32 [tokens, top_k].

    Raises
    ------
    ValueError
        For a wrong shape, an id outside ``[0, experts)`` or a non-finite weight.
    """
    if isinstance(routing, Routing) or (isinstance(routing, tuple) and len(routing) == 3):
        experts, weights = routing[0], routing[1]
    elif isinstance(routing, tuple) and len(routing) == 2:
        experts, weights = routing
    else:
        raise ValueError("routing must be a Routing or an (experts, weights) pair of "
                         f"[tokens, top_k={cfg.top_k}] arrays")
    experts, weights = np.asarray(experts), np.asarray(weights)
    shape = (tokens, cfg.top_k)
    for name, a in (("experts", experts), ("weights", weights)):
        if a.shape != shape:
            raise ValueError(f"routing {name} have shape {a.shape}; expected {shape} "
                             f"(one row per token of x, top_k={cfg.top_k} columns)")
    if experts.dtype.kind not in "iu" or (experts.size and (experts.min() < 0 or
                                                            experts.max() >= cfg.experts)):
        raise ValueError(f"routing experts must be integer ids in [0, {cfg.experts})")
    if weights.dtype.kind != "f" or not np.isfinite(weights).all():
        bad = np.argwhere(~np.isfinite(weights.astype(np.float64)))
        where = f" (first at {tuple(int(i) for i in bad[0])})" if bad.size else ""
        raise ValueError(f"routing weights must be finite floats{where}")
    return np.ascontiguousarray(experts, np.int32), np.ascontiguousarray(weights, np.float32)


def dispatch_lists(cfg: MoEConfig, routing: Routing):
    """Per expert: the (token, slot) pairs it serves, kept ones only, in token order."""
    tok, slot = np.nonzero(routing.kept)  # row-major: token order, then slot order
    e = routing.experts[tok, slot]
    order = np.argsort(e, kind="stable")
    tok, slot, e = tok[order], slot[order], e[order]
    bounds = np.searchsorted(e, np.arange(cfg.experts + 1))
    return [(tok[bounds[i]:bounds[i + 1]], slot[bounds[i]:bounds[i + 1]])
            for i in range(cfg.experts)]


def route_tokens(cfg: MoEConfig, weights: MoEWeights, x: np.ndarray,
                 tokens_per_rank: Optional[int] = None) -> Routing:
    """:func:`gate` then :func:`route` with everything the config's rules need."""
    logits, scores = gate(cfg, weights, x)
    return route(cfg, scores, tokens_per_rank, logits=logits,
                 selection_bias=weights.selection_bias if cfg.selection_bias else None)


def moe_forward(cfg: MoEConfig, weights: MoEWeights, x: np.ndarray,
                routing: Optional[Routing] = None) -> Tuple[np.ndarray, Routing]:
    """The MoE layer forward pass.

    Parameters
    ----------
    cfg : MoEConfig
    weights : MoEWeights
        Must hold every expert the routing reaches.
    x : ndarray [world_size * t, hidden]
        Token rows, rank-major, ``1 <= t <= cfg.tokens``.
    routing : Routing, optional
        Use this routing instead of computing one (e.g. the GPU kernel's, so that
        outputs can be compared on identical routing).

    Returns
    -------
    y : ndarray [world_size * t, hidden] of the storage type
    routing : Routing
    """
    check_weights(cfg, weights)
    t = check_tokens(cfg, x)
    x = np.asarray(x)
    if routing is None:
        routing = route_tokens(cfg, weights, x, t)
    else:
        routing = check_routing(cfg, routing, x.shape[0])
    out = np.zeros((x.shape[0], cfg.top_k, cfg.hidden), dtype=storage_dtype(cfg.dtype))
    for expert, (tok, slot) in enumerate(dispatch_lists(cfg, routing)):
        if tok.size:
            out[tok, slot] = expert_ffn(cfg, weights, expert, x[tok])
    return combine(cfg, routing, out, shared_experts(cfg, weights, x)), routing


# ============================================================================ backward

def _gradient_names(mlp: str, arrays: Mapping[str, np.ndarray]) -> Tuple[str, ...]:
    """The gradient tensor names that a set of arrays stands for, in the order of
    ``MoEWeights.names``: ``router`` and the MLP's tensors, with ``router_bias``, the gated
    biases and the shared MLP (and its gate) when their arrays are among them."""
    bias = mlp == "gated" and ("bg" in arrays or "shared_bg" in arrays)
    names = ("router",) + (("router_bias",) if "router_bias" in arrays else ()) + \
        expert_tensor_names(mlp, bias)
    if any(n.startswith("shared_") for n in arrays):
        names += tuple("shared_" + n for n in expert_tensor_names(mlp, bias)) + \
            (("shared_gate",) if "shared_gate" in arrays else ())
    return names


class MoEGrads:
    """Gradients of a scalar loss with respect to every trained tensor of a
    :class:`MoEWeights`.

    Each attribute is a float64 array with the shape of the weight of the same name; the
    names are :func:`flashmoe_core.weights.gradient_tensor_names` of the config (the
    weights' names without ``selection_bias``, which no gradient reaches): ``router``
    [hidden, experts] and ``router_bias`` [experts]; vanilla ``w1, b1, w2, b2``; gated
    ``wg, wu, w2`` and, with ``mlp_bias``, ``bg, bu, b2`` (leading dimension: the experts
    held, ``expert_ids``); with shared experts the ``shared_*`` tensors and
    ``shared_gate``, whole like their weights (not per expert).
    ``moe_backward(..., given_weights=True)`` also sets ``routing_weights`` [T, k].

    Parameters
    ----------
    mlp : str
        ``"vanilla"`` or ``"gated"``; fixes the MLP's tensor names.
    expert_ids : sequence of int
        Global ids of the experts the per-expert arrays hold, in order.
    **arrays : ndarray
        ``router`` and the per-expert tensors of ``mlp``, and the optional ones of a
        config that has them (``router_bias``; ``bg, bu, b2``; the shared MLP's): which
        are given decides ``names``, and they must be one config's complete set.
    """

    def __init__(self, mlp: str, expert_ids: Sequence[int], **arrays: np.ndarray) -> None:
        self.names: Tuple[str, ...] = _gradient_names(mlp, arrays)
        if set(arrays) != set(self.names):
            raise ValueError(f"MoEGrads for mlp={mlp!r} needs exactly {list(self.names)}, "
                             f"got {sorted(arrays)}")
        self.mlp = mlp
        self.expert_ids = tuple(int(e) for e in expert_ids)
        for name in self.names:
            setattr(self, name, np.asarray(arrays[name], dtype=np.float64))

    @classmethod
    def zeros_like(cls, weights: MoEWeights) -> "MoEGrads":
        """Zero gradients shaped like ``weights`` (the backward accumulates into them)."""
        names = gradient_tensor_names(weights.cfg)
        return cls(weights.cfg.mlp, weights.expert_ids,
                   **{n: np.zeros(getattr(weights, n).shape, dtype=np.float64)
                      for n in names})

    def arrays(self) -> Dict[str, np.ndarray]:
        """Name -> gradient array, router first (the order of ``MoEWeights.arrays``)."""
        return {n: getattr(self, n) for n in self.names}

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n}={tuple(getattr(self, n).shape)}" for n in self.names)
        return f"MoEGrads({self.mlp}, experts={len(self.expert_ids)}, {shapes})"


def _weights64(cfg: MoEConfig, weights: MoEWeights) -> Dict[str, np.ndarray]:
    """The weight values the forward oracle multiplies with, exactly, in float64."""
    # MoEWeights stores its arrays already rounded to cfg.dtype (tfloat32 included), and
    # the forward multiplies with them as stored: widening them (infinities as NaN, rule
    # 11) is all that is needed.
    return {n: _weight64(a) for n, a in weights.arrays().items()}


def _act64(name: str, a: np.ndarray) -> np.ndarray:
    """Activation in float64 without the forward's float32 rounding (exact-math twin of
    :func:`flashmoe_core.numerics.activation`, differentiated by ``activation_grad``)."""
    if name == "relu":
        return np.maximum(a, 0.0)
    if name == "gelu":
        return 0.5 * a * erfc(-a / np.sqrt(2.0))
    if name == "silu":
        with np.errstate(over="ignore"):  # exp(-a) -> inf for a << 0 gives the right 0
            return a / (1.0 + np.exp(-a))
    raise ValueError(f"unknown activation {name!r}; known: relu, gelu, silu")


def _sigmoid64(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # exp(-a) -> inf for a << 0 gives the right 0
        return 1.0 / (1.0 + np.exp(-a))


def _hidden64(cfg: MoEConfig, pre, need_grad: bool):
    """The MLP's hidden layer from its pre-activations in float64 (rule 7 without the
    rounding), and the local derivatives its backward needs.

    vanilla ``pre = a``: ``h = act(a)``, derivatives ``(act'(a),)``. Gated ``pre = (g,
    u)``: ``h = act(g) * u``, derivatives ``(dh/dg, dh/du) = (u act'(g), act(g))``;
    clamped SwiGLU: ``h = gc s (uc + 1)`` with ``gc = min(g, L)``, ``uc = clip(u, -L,
    L)``, ``s = sigmoid(alpha gc)``, derivatives ``[g <= L] (s + alpha gc s (1 - s))
    (uc + 1)`` and ``[-L <= u <= L] gc s`` (torch.clamp's inclusive convention at the
    limits). Returns ``(h, derivatives)``, the derivatives ``None`` unless ``need_grad``.
    """
    if cfg.mlp == "vanilla":
        h = _act64(cfg.activation, pre)
        if not need_grad:
            return h, None
        with np.errstate(over="ignore"):  # silu' at a << 0: exp(-a) -> inf gives the right 0
            return h, (activation_grad(cfg.activation, pre),)
    g, u = pre
    if cfg.activation != "swiglu_clamped":
        act = _act64(cfg.activation, g)
        h = act * u
        if not need_grad:
            return h, None
        with np.errstate(over="ignore"):
            return h, (u * activation_grad(cfg.activation, g), act)
    lim, alpha = cfg.swiglu_limit, cfg.swiglu_alpha
    gc = np.minimum(g, lim)
    uc = np.clip(u, -lim, lim)
    s = _sigmoid64(alpha * gc)
    h = gc * s * (uc + 1.0)
    if not need_grad:
        return h, None
    # The masks multiply (rather than select) so that a NaN stays NaN (rule 11).
    dh_dg = (g <= lim) * ((s + alpha * gc * s * (1.0 - s)) * (uc + 1.0))
    dh_du = ((u >= -lim) & (u <= lim)) * (gc * s)
    return h, (dh_dg, dh_du)


def _mlp_pre64(cfg: MoEConfig, w: Mapping[str, np.ndarray], rows: np.ndarray):
    """Pre-activations of one MLP (an expert's or the shared one) on float64 rows:
    vanilla ``x W1 + b1``; gated ``(x Wg (+ bg), x Wu (+ bu))``."""
    if cfg.mlp == "vanilla":
        return rows @ w["w1"] + w["b1"]
    if cfg.mlp_bias:
        return rows @ w["wg"] + w["bg"], rows @ w["wu"] + w["bu"]
    return rows @ w["wg"], rows @ w["wu"]


def _mlp_out64(cfg: MoEConfig, w: Mapping[str, np.ndarray], h: np.ndarray) -> np.ndarray:
    """Output rows of one MLP from its hidden layer: ``h W2 (+ b2)``."""
    if cfg.mlp == "vanilla" or cfg.mlp_bias:
        return h @ w["w2"] + w["b2"]
    return h @ w["w2"]


def _mlp_backward64(cfg: MoEConfig, w: Mapping[str, np.ndarray], rows: np.ndarray,
                    cache: tuple, dout: np.ndarray,
                    acc: Mapping[str, np.ndarray]) -> np.ndarray:
    """One MLP's backward: adds its weight gradients into the arrays of ``acc`` (views,
    by the MLP's tensor names) and returns d(rows). ``cache`` is ``(h,) + derivatives``
    from :func:`_hidden64`; ``dout`` the gradient of the output rows."""
    h, derivs = cache[0], cache[1:]
    acc["w2"] += h.T @ dout
    if cfg.mlp == "vanilla" or cfg.mlp_bias:
        acc["b2"] += dout.sum(axis=0)
    dh = dout @ w["w2"].T
    if cfg.mlp == "vanilla":
        da = dh * derivs[0]
        acc["w1"] += rows.T @ da
        acc["b1"] += da.sum(axis=0)
        return da @ w["w1"].T
    dg, du = dh * derivs[0], dh * derivs[1]
    acc["wg"] += rows.T @ dg
    acc["wu"] += rows.T @ du
    if cfg.mlp_bias:
        acc["bg"] += dg.sum(axis=0)
        acc["bu"] += du.sum(axis=0)
    return dg @ w["wg"].T + du @ w["wu"].T


class _ExpertRun(NamedTuple):
    """One expert's float64 pass over its kept assignments, and what its backward needs."""

    tok: np.ndarray    # token rows served, token order
    slot: np.ndarray   # their slots
    index: int         # local index into the per-expert arrays
    rows: np.ndarray   # input rows [n, hidden]
    out: np.ndarray    # output rows [n, hidden]
    cache: tuple       # (h,) + _hidden64's derivatives (when need_grad)


def _expert_weights(cfg: MoEConfig, w64: Mapping[str, np.ndarray],
                    index: int) -> Dict[str, np.ndarray]:
    return {n: w64[n][index] for n in expert_tensor_names(cfg.mlp, cfg.mlp_bias)}


def _run_experts64(cfg: MoEConfig, w64: Mapping[str, np.ndarray], x64: np.ndarray,
                   routing: Routing, local_index: Callable[[int], int],
                   need_grad: bool = False) -> List[_ExpertRun]:
    """Every expert on its kept rows in exact float64 math (no rounding).

    vanilla ``a = x W1 + b1``, ``h = act(a)``, ``out = h W2 + b2``; gated ``g = x Wg``,
    ``u = x Wu`` (``+ bg``, ``+ bu`` with ``mlp_bias``), ``h = act(g) * u`` or the
    clamped SwiGLU, ``out = h W2 (+ b2)``. ``local_index`` maps a global expert id to its
    position in the per-expert arrays; ``need_grad`` also keeps the hidden layer's local
    derivatives (:func:`_hidden64`).
    """
    jobs = [(tok, slot, local_index(e))
            for e, (tok, slot) in enumerate(dispatch_lists(cfg, routing)) if tok.size]
    ws = [_expert_weights(cfg, w64, i) for _, _, i in jobs]
    rows = [x64[tok] for tok, _, _ in jobs]
    pre = [_mlp_pre64(cfg, w, r) for w, r in zip(ws, rows)]
    # One activation call over the rows of all experts: the erfc behind gelu costs per
    # call far more than per element.
    if cfg.mlp == "vanilla":
        pre_all = np.concatenate(pre) if pre else np.zeros((0, cfg.ffn))
    else:
        pre_all = tuple(np.concatenate([p[n] for p in pre]) if pre else np.zeros((0, cfg.ffn))
                        for n in (0, 1))
    h_all, derivs_all = _hidden64(cfg, pre_all, need_grad)
    runs = []
    start = 0
    for (tok, slot, i), w, r in zip(jobs, ws, rows):
        part = slice(start, start + tok.size)
        start += tok.size
        h = h_all[part]
        cache = (h,) + (tuple(d[part] for d in derivs_all) if need_grad else ())
        runs.append(_ExpertRun(tok, slot, i, r, _mlp_out64(cfg, w, h), cache))
    return runs


def _expert_backward64(cfg: MoEConfig, w64: Mapping[str, np.ndarray], run: _ExpertRun,
                       dout: np.ndarray, grads: MoEGrads) -> np.ndarray:
    """Accumulate one expert's weight gradients into ``grads``; returns d(rows).

    ``dout`` is the gradient of the expert's output rows (already scaled by the
    combine weights); ``run`` must come from ``_run_experts64(..., need_grad=True)``.
    """
    names = expert_tensor_names(cfg.mlp, cfg.mlp_bias)
    acc = {n: getattr(grads, n)[run.index] for n in names}  # views into grads
    return _mlp_backward64(cfg, _expert_weights(cfg, w64, run.index), run.rows, run.cache,
                           dout, acc)


def _shared_weights(cfg: MoEConfig, w64: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return {n: w64["shared_" + n] for n in expert_tensor_names(cfg.mlp, cfg.mlp_bias)}


def _shared64(cfg: MoEConfig, w64: Mapping[str, np.ndarray], x64: np.ndarray,
              need_grad: bool = False):
    """Rule 13 in float64 on token rows: ``(gs, ys, cache)`` with the gate ``gs =
    sigmoid(x . shared_gate)`` [T] (ones without ``shared_gate``), the shared MLP's
    output ``ys`` [T, hidden] and its backward's cache (:func:`_hidden64`)."""
    w = _shared_weights(cfg, w64)
    h, derivs = _hidden64(cfg, _mlp_pre64(cfg, w, x64), need_grad)
    ys = _mlp_out64(cfg, w, h)
    if cfg.shared_gate:
        gs = _sigmoid64(x64 @ w64["shared_gate"])
    else:
        gs = np.ones(x64.shape[0])
    return gs, ys, (h,) + (derivs if need_grad else ())


def _shared_backward64(cfg: MoEConfig, w64: Mapping[str, np.ndarray], x64: np.ndarray,
                       dy64: np.ndarray, grads: MoEGrads) -> np.ndarray:
    """The shared experts' part of the backward on the rows given: adds the ``shared_*``
    gradients into ``grads``, returns their d(rows)."""
    gs, ys, cache = _shared64(cfg, w64, x64, need_grad=True)
    dx = np.zeros_like(x64)
    if cfg.shared_gate:
        d_gate_logit = np.einsum("th,th->t", dy64, ys) * gs * (1.0 - gs)
        grads.shared_gate += x64.T @ d_gate_logit
        dx += d_gate_logit[:, None] * w64["shared_gate"]
    acc = {n: getattr(grads, "shared_" + n) for n in expert_tensor_names(cfg.mlp, cfg.mlp_bias)}
    dx += _mlp_backward64(cfg, _shared_weights(cfg, w64), x64, cache, gs[:, None] * dy64, acc)
    return dx


def _softmax64(logits: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # rows of marked tokens: NaN is what they get
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)


def _logits64(cfg: MoEConfig, w64: Mapping[str, np.ndarray], x64: np.ndarray) -> np.ndarray:
    """``z = x R (+ router_bias)`` in float64; the ``router_logits="storage"`` rounding is
    left out (the backward treats it as the identity)."""
    z = x64 @ w64["router"]
    return z + w64["router_bias"] if cfg.router_bias else z


def _scores64(cfg: MoEConfig, z: np.ndarray) -> np.ndarray:
    """Rule 3 in float64: ``softmax(z)`` over the experts, or ``sigmoid(z)`` per expert."""
    return _sigmoid64(z) if cfg.scoring == "sigmoid" else _softmax64(z)


class _Combine(NamedTuple):
    """Combine weights in the form ``c_j = scale * m_j * a_j / n`` (rules 5 and 6), and
    what their gradient needs.

    With ``normalised``, ``n = sum_i m_i a_i`` and ``c = 0`` where ``n <= 0`` (nothing
    kept); otherwise ``n = 1``.
    """

    c: np.ndarray       # [T, k] the weights the kept expert rows are multiplied by
    a: np.ndarray       # [T, k] what is weighted: chosen scores, exp(chosen logits), given
    m: np.ndarray       # [T, k] 1.0 for the slots taking part, else 0.0
    n: np.ndarray       # [T, 1]
    scale: float
    normalised: bool


def _normalised_weights(a: np.ndarray, m: np.ndarray, normalised: bool,
                        scale: float) -> _Combine:
    # A slot outside m takes no part, whatever its value (as combine() zeroes it).
    ma = np.where(m > 0, a, 0.0)
    if not normalised:
        return _Combine(scale * ma, a, m, np.ones((a.shape[0], 1)), scale, False)
    n = ma.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        # n <= 0 only when nothing is kept (or given weights sum to <= 0): c = 0, as
        # combine() gives; a NaN n (marked token) stays NaN.
        c = np.where(n <= 0, 0.0, scale * ma / n)
    return _Combine(c, a, m, n, scale, True)


def _combine_weights64(cfg: MoEConfig, z: np.ndarray, routing: Routing) -> _Combine:
    """The combine weights as a differentiable function of the logits ``z`` [T, E]
    (routing fixed), exactly as :func:`route` and :func:`combine` form them.

    - ``softmax_after_topk``: ``a_j = exp(z[e_j])``, always normalised;
    - otherwise ``a_j = s[e_j]`` (the scores), normalised when ``renormalize`` (over all
      k slots, dropped ones included: the forward renormalises before the drop);
    - ``renormalize_after_drop``: normalised over the kept slots only (``m = kept``),
      whatever ``renormalize`` says (a renormalisation before the drop cancels);
    - ``scale = routed_scaling``.
    """
    experts = routing.experts.astype(np.intp)
    if cfg.softmax_after_topk:
        z_sel = np.take_along_axis(z, experts, axis=1)
        with np.errstate(invalid="ignore"):  # marked rows: NaN
            a = np.exp(z_sel - z_sel.max(axis=1, keepdims=True))
        normalised = True
    else:
        a = np.take_along_axis(_scores64(cfg, z), experts, axis=1)
        normalised = cfg.renormalize or cfg.renormalize_after_drop
    m = routing.kept.astype(np.float64) if cfg.renormalize_after_drop else np.ones(a.shape)
    return _normalised_weights(a, m, normalised, cfg.routed_scaling)


def _given_combine64(cfg: MoEConfig, given: np.ndarray, kept: np.ndarray) -> _Combine:
    """Caller-supplied weights as :func:`combine` applies them: as given, or with
    ``renormalize_after_drop`` ``routed_scaling * w_j / sum_kept w`` on the kept slots."""
    given = np.asarray(given, dtype=np.float64)
    if cfg.renormalize_after_drop:
        return _normalised_weights(given, kept.astype(np.float64), True, cfg.routed_scaling)
    return _normalised_weights(given, np.ones(given.shape), False, 1.0)


def _combine_vjp(comb: _Combine, g: np.ndarray) -> np.ndarray:
    """dL/da [T, k] from ``g = dL/dc`` (zero on dropped slots).

    normalised: ``m_i (scale / n) (g_i - sum_j g_j c_j / scale)``, zero where
    ``n <= 0``; else ``scale * m_i * g_i``.
    """
    if not comb.normalised:
        return comb.scale * comb.m * g
    inner = g - (g * comb.c).sum(axis=1, keepdims=True) / comb.scale
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(comb.n <= 0, 0.0, comb.m * (comb.scale / comb.n) * inner)


def _logits_vjp(cfg: MoEConfig, z: np.ndarray, routing: Routing, comb: _Combine,
                g: np.ndarray) -> np.ndarray:
    """dL/dz [T, E] from ``g = dL/dc``: through the combine weights, then (unless
    ``softmax_after_topk``) the scores."""
    da = _combine_vjp(comb, g)
    rows = np.arange(z.shape[0])[:, None]
    experts = routing.experts.astype(np.intp)
    dz = np.zeros_like(z)
    if cfg.softmax_after_topk:  # a_j = exp(z[e_j]) (its shift by the max cancels)
        np.add.at(dz, (rows, experts), da * comb.a)
        return dz
    # add.at: an explicit routing may name one expert twice for a token.
    np.add.at(dz, (rows, experts), da)
    s = _scores64(cfg, z)
    if cfg.scoring == "sigmoid":
        return dz * s * (1.0 - s)
    return s * (dz - (dz * s).sum(axis=1, keepdims=True))


def _index_of(expert_ids: Optional[Sequence[int]], cfg: MoEConfig) -> Callable[[int], int]:
    """Global expert id -> position in per-expert arrays holding ``expert_ids``."""
    index = {int(e): i for i, e in enumerate(range(cfg.experts) if expert_ids is None
                                             else expert_ids)}

    def local_index(expert: int) -> int:
        if expert not in index:
            raise KeyError(f"expert {expert} is not held here (held: {tuple(index)})")
        return index[expert]

    return local_index


def _forward_fixed_routing64(cfg: MoEConfig, weights64: Mapping[str, np.ndarray],
                             x64: np.ndarray, routing: Routing,
                             expert_ids: Optional[Sequence[int]] = None,
                             given_weights: Optional[np.ndarray] = None) -> np.ndarray:
    """The layer in exact float64 math with the routing held fixed: what
    :func:`moe_backward` differentiates.

    ``y_t = sum_j kept_tj * c_tj * f_{e_tj}(x_t) + gs_t * fs(x_t)`` with ``c``
    recomputed from the logits ``x R (+ router_bias)`` by the config's rules (see
    :func:`moe_backward`), or from ``given_weights``; ``routing.weights`` is ignored. The
    shared term is there with shared experts. No value is rounded, so finite differences
    of this function check the backward.

    Parameters
    ----------
    cfg : MoEConfig
    weights64 : mapping of str to float64 ndarray
        Every tensor of the weights (as ``MoEWeights.arrays``).
    x64 : float64 ndarray [T, hidden]
    routing : Routing
        Its ``experts`` and ``kept`` fix the choice; validated by :func:`check_routing`.
    expert_ids : sequence of int, optional
        Global ids of the experts the per-expert arrays hold (default: all, in order).
    given_weights : float64 ndarray [T, k], optional
        Caller-supplied combine weights (before the capacity drop, as
        ``routing.weights``), applied as :func:`combine` applies them.

    Returns
    -------
    y : float64 ndarray [T, hidden]
    """
    x64 = np.asarray(x64, dtype=np.float64)
    routing = check_routing(cfg, routing, x64.shape[0])
    if given_weights is None:
        comb = _combine_weights64(cfg, _logits64(cfg, weights64, x64), routing)
    else:
        comb = _given_combine64(cfg, given_weights, routing.kept)
    y = np.zeros((x64.shape[0], cfg.hidden), dtype=np.float64)
    for run in _run_experts64(cfg, weights64, x64, routing, _index_of(expert_ids, cfg)):
        # add.at: an explicit routing may name one expert twice for a token.
        np.add.at(y, run.tok, comb.c[run.tok, run.slot, None] * run.out)
    if cfg.n_shared:
        gs, ys, _ = _shared64(cfg, weights64, x64)
        y += gs[:, None] * ys
    y[marked_tokens(routing)] = np.nan
    return y


def moe_forward_exact(cfg: MoEConfig, weights: MoEWeights, x: np.ndarray,
                      routing: Routing) -> np.ndarray:
    """The layer in exact float64 math on a given routing: no rounding after the inputs.

    What :func:`moe_forward` computes, without its rounding to ``cfg.dtype`` and to
    float32 along the way (the combine weights come from the float64 scores, the shared
    experts' gate from a float64 sigmoid, and ``router_logits="storage"`` does not round
    the logits). The gap between the two is the oracle's rounding: ``python -m
    flashmoe_core.run --check`` on the reference backend measures it.

    Returns
    -------
    y : float64 ndarray [world_size * t, hidden]
    """
    check_weights(cfg, weights)
    check_tokens(cfg, x)
    x64 = round_to(np.asarray(x), cfg.dtype).astype(np.float64)
    return _forward_fixed_routing64(cfg, _weights64(cfg, weights), x64, routing,
                                    weights.expert_ids)


def _check_grad_output(cfg: MoEConfig, dy: np.ndarray, rows: int) -> np.ndarray:
    """Validate the upstream gradient; returns it as float64."""
    dy = np.asarray(dy)
    expected = (rows, cfg.hidden)
    if dy.shape != expected:
        raise ValueError(f"dy has shape {dy.shape}; expected {expected}, the shape of y "
                         f"(world_size * tokens rows of hidden={cfg.hidden})")
    if dy.dtype.kind not in "fV":
        raise ValueError(f"dy has dtype {dy.dtype}; expected a floating type")
    return dy.astype(np.float64)


def moe_backward(cfg: MoEConfig, weights: MoEWeights, x: np.ndarray, dy: np.ndarray,
                 routing: Optional[Routing] = None,
                 given_weights: bool = False) -> Tuple[np.ndarray, MoEGrads]:
    """The layer's backward pass: an exact-math (float64) reference for every rule.

    Differentiates, with the routing held fixed (``e_tj``, ``kept_tj``),

    - ``y_t = sum_j kept_tj * c_tj * f_{e_tj}(x_t) + gs_t * fs(x_t)`` (the last term only
      with shared experts);
    - logits ``z_t = x_t R (+ b_R)`` (``router_bias``); ``router_logits="storage"``
      rounds them in the forward, which the backward treats as the identity
      (straight-through);
    - scores ``s_t = softmax(z_t)`` over all experts, or ``s_te = sigmoid(z_te)``
      (``scoring="sigmoid"``);
    - combine weights ``c_tj = rho * a_tj / N_t`` with ``rho = routed_scaling`` and
      ``a_tj = s_t[e_tj]``: ``N_t = sum_{i<k} a_ti`` over all k slots, dropped ones
      included (the forward renormalises before the capacity drop), or ``N_t = 1``
      without ``renormalize``. ``softmax_after_topk``: ``a_tj = exp(z_t[e_tj])``, ``N_t =
      sum_{i<k} a_ti``. ``renormalize_after_drop``: ``c_tj = kept_tj * rho * a_tj /
      sum_{i kept} a_ti`` (``renormalize`` then makes no difference), 0 when nothing is
      kept;
    - experts: vanilla ``f(x) = act(x W1 + b1) W2 + b2``; gated ``f(x) = H(x Wg (+ bg),
      x Wu (+ bu)) W2 (+ b2)`` with ``H(g, u) = act(g) * u``, or with the clamped SwiGLU
      ``H = gc sigmoid(alpha gc) (uc + 1)``, ``gc = min(g, L)``, ``uc = clip(u, -L, L)``;
    - shared experts: ``fs`` the same MLP with the ``shared_*`` weights (width
      ``shared_width``), ``gs_t = sigmoid(x_t . w_gs)`` with ``shared_gate``, else 1.

    The selection bias and the group limit only choose the experts, which are held
    fixed: no gradient flows through them and ``selection_bias`` has no gradient entry.

    Router part, with ``G_tj = kept_tj * <dy_t, f_{e_tj}(x_t)>`` (the gradient of each
    combine weight; zero for a dropped assignment) and ``m_tj`` = 1, or ``kept_tj`` with
    ``renormalize_after_drop``:

    - ``dL/da_tj = m_tj (rho / N_t) (G_tj - sum_i G_ti c_ti / rho)`` when normalised
      (zero when nothing is kept), else ``rho * G_tj``;
    - scores: ``dL/ds_t[e_tj] += dL/da_tj`` (accumulated over slots naming one expert),
      ``dL/dz_t = s_t * (dL/ds_t - <dL/ds_t, s_t>)`` (softmax) or ``dL/dz_te = dL/ds_te *
      s_te (1 - s_te)`` (sigmoid); ``softmax_after_topk``: ``dL/dz_t[e_tj] += dL/da_tj *
      a_tj``;
    - ``dR = x^T dL/dz``, ``db_R = sum_t dL/dz_t``, ``dx_t += dL/dz_t R^T``.

    Each kept assignment sends ``d = kept_tj * c_tj * dy_t`` back through its expert:
    vanilla ``a = x W1 + b1``, ``h = act(a)``: ``dW2 += h^T d``, ``db2 += sum d``,
    ``da = (d W2^T) * act'(a)``, ``dW1 += x^T da``, ``db1 += sum da``,
    ``dx += da W1^T``; gated ``g = x Wg (+ bg)``, ``u = x Wu (+ bu)``, ``h = H(g, u)``:
    ``dW2 += h^T d`` (``db2 += sum d``), ``dh = d W2^T``, ``dg = dh * dH/dg``, ``du = dh
    * dH/du``, ``dWg += x^T dg``, ``dWu += x^T du`` (``dbg += sum dg``, ``dbu += sum
    du``), ``dx += dg Wg^T + du Wu^T``, where ``dH/dg = u act'(g)``, ``dH/du = act(g)``;
    clamped SwiGLU, with ``s = sigmoid(alpha gc)``: ``dH/dg = [g <= L] (s + alpha gc s
    (1 - s)) (uc + 1)``, ``dH/du = [-L <= u <= L] gc s`` (torch.clamp's inclusive
    convention at the limits). The shared MLP's backward is the same with ``d = gs_t *
    dy_t`` on every token, plus, with ``shared_gate``, ``dL/dl_t = <dy_t, fs(x_t)> gs_t (1
    - gs_t)`` for the gate logit ``l_t = x_t . w_gs``: ``dw_gs = x^T dL/dl``, ``dx_t +=
    dL/dl_t w_gs``.

    Values: ``x`` and the weights are rounded to ``cfg.dtype`` exactly as the forward
    oracle rounds them, then promoted to float64; everything after that (logits, scores,
    combine weights, expert and shared intermediates and outputs, ``dy``) is float64
    with no intermediate rounding. The input rounding is treated as the identity
    (``dx`` is the gradient with respect to the rounded ``x``). No gradient flows
    through the top-k choice or the capacity rule; ``act'(0) = 0`` for relu.

    Non-finite values follow the forward's rules 10-12: a marked token gets a NaN ``dx``
    row and makes the router gradient (and ``router_bias``'s) NaN (it used every router
    weight) but adds nothing to the expert gradients (it reached no expert) nor to the
    shared ones (its ``dy`` counts as zero on the shared path: its output is NaN
    whatever the shared weights); a NaN weight propagates through the float64 math to
    the gradients that depend on it.

    The fused kernel (``layer.backward``) computes the same gradients with the
    forward's rounding rules: ``w_tj dy_t`` per kept row, the saved intermediate and
    pre-activations (as the forward stored them), ``da`` (gated ``dg``, ``du``) and
    ``dL/dz`` are rounded to ``cfg.dtype`` where they feed tensor cores; ``w`` is the
    forward's float32 combine weight, ``g_tj = <dy_t, y_expert>`` uses the rounded expert
    output, softmax and the router terms are float32; every product accumulates in
    float32 in a fixed order (no atomics); weight gradients are float32 and ``dx`` sums
    the router term, then the slots in slot order, rounded once to ``cfg.dtype``.

    Parameters
    ----------
    cfg : MoEConfig
    weights : MoEWeights
        Must hold every expert a kept assignment reaches.
    x : ndarray [world_size * t, hidden]
        Token rows, rank-major, as for :func:`moe_forward`.
    dy : ndarray [world_size * t, hidden]
        Upstream gradient ``dL/dy``, any floating type.
    routing : Routing, optional
        The routing to hold fixed; by default the one :func:`moe_forward` computes.
        Only ``experts`` and ``kept`` are used: the combine weights are recomputed from
        the logits as above (``routing.weights`` would carry no gradient to the router),
        so they equal ``routing.weights`` only when those came from this ``x``, up to
        the forward's float32 rounding (and the ``router_logits="storage"`` rounding).
    given_weights : bool
        The caller supplied the routing (``layer(x, routing=...)``): its ``weights``
        ``w_tj`` are inputs, applied as :func:`combine` applies them: ``c_tj = w_tj``, or
        with ``renormalize_after_drop`` ``c_tj = kept_tj * rho * w_tj / sum_{i kept}
        w_ti`` (0 when that sum is <= 0). No gradient reaches the router (``grads.router``
        and ``grads.router_bias`` are zero); ``grads.routing_weights`` [T, k] holds
        ``dL/dw``: ``G_tj``, or with ``renormalize_after_drop`` ``kept_tj (rho / W_t)
        (G_tj - sum_i G_ti c_ti / rho)`` with ``W_t = sum_{i kept} w_ti`` (zero when
        ``W_t <= 0``); zero for a dropped assignment. A marked token (expert -1) gets a
        NaN ``dx`` row here too.

    Returns
    -------
    dx : float64 ndarray, the shape of ``x``
    grads : MoEGrads
        float64 gradients of every tensor but ``selection_bias``, shaped like
        ``weights``.
    """
    if given_weights and routing is None:
        raise ValueError("given_weights=True needs the routing= the forward used")
    check_weights(cfg, weights)
    t = check_tokens(cfg, x)
    x = np.asarray(x)
    dy64 = _check_grad_output(cfg, dy, x.shape[0])
    if routing is None:
        # The same choice as moe_forward makes (float32 logits and scores, every rule).
        routing = route_tokens(cfg, weights, x, t)
    else:
        routing = check_routing(cfg, routing, x.shape[0])
    x64 = round_to(x, cfg.dtype).astype(np.float64)
    w64 = _weights64(cfg, weights)
    grads = MoEGrads.zeros_like(weights)
    marked = marked_tokens(routing)

    if given_weights:
        comb = _given_combine64(cfg, routing.weights, routing.kept)
    else:
        z = _logits64(cfg, w64, x64)
        comb = _combine_weights64(cfg, z, routing)

    # Experts: their outputs give the combine-weight gradients G; the weighted dy goes
    # back through them.
    dx = np.zeros_like(x64)
    g = np.zeros(routing.experts.shape, dtype=np.float64)
    for run in _run_experts64(cfg, w64, x64, routing, weights.local_index, need_grad=True):
        tok, slot = run.tok, run.slot
        g[tok, slot] = np.einsum("rh,rh->r", dy64[tok], run.out)
        d_rows = _expert_backward64(cfg, w64, run, comb.c[tok, slot, None] * dy64[tok],
                                    grads)
        np.add.at(dx, tok, d_rows)  # add.at: a token may reach one expert twice

    if cfg.n_shared:
        # A marked token's output is NaN whatever the shared weights: it adds nothing
        # to their gradients (as it adds nothing to the experts').
        live = ~marked
        dx[live] += _shared_backward64(cfg, w64, x64[live], dy64[live], grads)

    if given_weights:
        grads.routing_weights = _combine_vjp(comb, g)
        dx[marked] = np.nan
        return dx, grads
    # Router: combine weights -> scores -> logits.
    d_logits = _logits_vjp(cfg, z, routing, comb, g)
    # A marked token's output is NaN whatever the weights (rule 10): its logits'
    # gradient is NaN, which makes its dx row and the whole router gradient NaN (it used
    # every router weight); it reached no expert, so the experts' gradients keep none.
    d_logits[marked] = np.nan
    grads.router += x64.T @ d_logits
    if cfg.router_bias:
        grads.router_bias += d_logits.sum(axis=0)
    dx += d_logits @ w64["router"].T
    return dx, grads
