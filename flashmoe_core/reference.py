"""The NumPy oracle: the exact semantics the GPU kernel implements.

Semantics, pinned (the kernel follows them; tests compare against them):

1. Inputs and weights are rounded to ``cfg.dtype`` (``tfloat32``: round half away
   from zero to a 10-bit mantissa, like ``cvt.rna.tf32.f32``).
2. Router logits ``x @ router`` with float32 accumulation. The oracle forms every dot
   product in float64 and rounds once to float32, i.e. an error-free float32
   accumulator; the GPU's float32 sums differ from it only by rounding.
3. Softmax over all experts (float64 from the float32 logits, rounded to float32).
4. Top-k by probability; equal probabilities go to the lower expert id.
5. Combine weights are the selected probabilities, divided by their sum when
   ``renormalize`` (computed in float64, rounded to float32).
6. Capacity (when ``capacity_factor`` is set) is per (expert, source rank):
   ``ceil(capacity_factor * t * top_k / experts)`` with ``t`` the source rank's token
   count. Assignments claim slots in token order, then slot order; those past the
   capacity are dropped and contribute zero (the kept ones are not renormalised).
7. Expert FFN with float32 accumulation; bias added to the float32 sum; activation
   in float32 (``gelu`` exact erf form, ``silu = x * sigmoid(x)``); the intermediate is
   rounded to ``cfg.dtype``. Gated: ``act(x Wg) * (x Wu)`` in float32, then rounded.
8. Each expert's output row is rounded to ``cfg.dtype`` (it travels in that type).
9. Combine: ``sum_j weight_j * y_j`` over the kept assignments in float32 (float64 in
   the oracle, rounded once), then rounded to ``cfg.dtype``.

Tokens of a multi-rank layer are given rank-major: ``x`` has ``world_size * t`` rows,
rows ``[r*t, (r+1)*t)`` belonging to rank ``r``.

Every product goes through :func:`matmul_f32`, which gives each output row the same
bits whatever other rows share the call; that is what lets the distributed oracle
equal this one bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import numpy as np

from .config import MoEConfig
from .numerics import activation, as_f32, round_to, storage_dtype
from .weights import MoEWeights

__all__ = ["Routing", "moe_forward", "gate", "route", "expert_ffn", "combine", "matmul_f32",
           "check_tokens"]


class Routing(NamedTuple):
    """Per-token expert choices.

    Attributes
    ----------
    experts : ndarray of int32, [T, k]
        Chosen expert ids, in descending probability.
    weights : ndarray of float32, [T, k]
        Combine weights (renormalised when the config says so).
    kept : ndarray of bool, [T, k]
        False where the capacity rule dropped the assignment.
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
    a64 = np.asarray(a).astype(np.float64)
    b64 = np.ascontiguousarray(np.asarray(b).astype(np.float64))
    m = a64.shape[0]
    out = np.empty((m, b64.shape[1]), dtype=np.float32)
    bias64 = None if bias is None else np.asarray(bias).astype(np.float64)
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
    """Router logits and softmax probabilities, both float32 [T, experts]."""
    xr = round_to(x, cfg.dtype)
    logits = matmul_f32(xr, weights.router)
    l64 = logits.astype(np.float64)
    e = np.exp(l64 - l64.max(axis=1, keepdims=True))
    probs = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return logits, probs


def route(cfg: MoEConfig, probs: np.ndarray, tokens_per_rank: Optional[int] = None) -> Routing:
    """Top-k, combine weights and the capacity rule for rank-major tokens."""
    t_all = probs.shape[0]
    t = t_all if tokens_per_rank is None else tokens_per_rank
    k = cfg.top_k
    # Stable sort of the negated probabilities: ties keep the lower expert id first.
    experts = np.argsort(-probs, axis=1, kind="stable")[:, :k].astype(np.int32)
    sel = np.take_along_axis(probs, experts, axis=1)
    if cfg.renormalize:
        s64 = sel.astype(np.float64)
        weights = (s64 / s64.sum(axis=1, keepdims=True)).astype(np.float32)
    else:
        weights = sel.astype(np.float32)
    kept = np.ones((t_all, k), dtype=bool)
    cap = cfg.capacity(t)
    if cap is not None:
        for start in range(0, t_all, t):
            kept[start:start + t] = _capacity_mask(experts[start:start + t], cap)
    return Routing(experts, weights, kept)


def _capacity_mask(experts: np.ndarray, cap: int) -> np.ndarray:
    """Keep the first ``cap`` assignments of each expert in (token, slot) order."""
    flat = experts.reshape(-1)
    order = np.argsort(flat, kind="stable")
    sorted_e = flat[order]
    starts = np.searchsorted(sorted_e, sorted_e, side="left")
    position = np.empty_like(flat)
    position[order] = np.arange(flat.size) - starts
    return (position < cap).reshape(experts.shape)


def expert_ffn(cfg: MoEConfig, weights: MoEWeights, expert: int, rows: np.ndarray) -> np.ndarray:
    """One expert applied to token rows; returns rows of the storage type."""
    i = weights.local_index(expert)
    xr = round_to(rows, cfg.dtype)
    if cfg.mlp == "vanilla":
        a = matmul_f32(xr, weights.w1[i], weights.b1[i])
        h = round_to(activation(cfg.activation, a), cfg.dtype)
        y = matmul_f32(h, weights.w2[i], weights.b2[i])
    else:
        g = matmul_f32(xr, weights.wg[i])
        u = matmul_f32(xr, weights.wu[i])
        h = round_to(activation(cfg.activation, g) * u, cfg.dtype)
        y = matmul_f32(h, weights.w2[i])
    return round_to(y, cfg.dtype)


def combine(cfg: MoEConfig, routing: Routing, expert_out: np.ndarray) -> np.ndarray:
    """Weighted sum of each token's kept expert outputs ([T, k, hidden] -> [T, hidden])."""
    w = np.where(routing.kept, routing.weights, 0.0).astype(np.float64)
    acc = np.zeros((expert_out.shape[0], expert_out.shape[2]), dtype=np.float64)
    for j in range(expert_out.shape[1]):  # slot order; each product is exact in float64
        acc += w[:, j, None] * as_f32(expert_out[:, j]).astype(np.float64)
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
    if experts.dtype.kind not in "iu" or experts.min() < 0 or experts.max() >= cfg.experts:
        raise ValueError(f"routing.experts must be integer ids in [0, {cfg.experts})")
    if kept.dtype != bool:
        raise ValueError(f"routing.kept must be bool, got {kept.dtype}")
    return Routing(experts.astype(np.int32), weights.astype(np.float32), kept)


def dispatch_lists(cfg: MoEConfig, routing: Routing):
    """Per expert: the (token, slot) pairs it serves, kept ones only, in token order."""
    tok, slot = np.nonzero(routing.kept)  # row-major: token order, then slot order
    e = routing.experts[tok, slot]
    order = np.argsort(e, kind="stable")
    tok, slot, e = tok[order], slot[order], e[order]
    bounds = np.searchsorted(e, np.arange(cfg.experts + 1))
    return [(tok[bounds[i]:bounds[i + 1]], slot[bounds[i]:bounds[i + 1]])
            for i in range(cfg.experts)]


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
    t = check_tokens(cfg, x)
    x = np.asarray(x)
    if routing is None:
        _, probs = gate(cfg, weights, x)
        routing = route(cfg, probs, t)
    else:
        routing = check_routing(cfg, routing, x.shape[0])
    out = np.zeros((x.shape[0], cfg.top_k, cfg.hidden), dtype=storage_dtype(cfg.dtype))
    for expert, (tok, slot) in enumerate(dispatch_lists(cfg, routing)):
        if tok.size:
            out[tok, slot] = expert_ffn(cfg, weights, expert, x[tok])
    return combine(cfg, routing, out), routing
