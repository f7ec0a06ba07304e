"""The distributed oracle: expert parallelism on CPU ranks over mpi4py.

Each rank owns its tokens and its experts (``cfg.expert_owner``). Dispatch and
combine are two ``Alltoallv`` exchanges; each rank gates its own tokens and applies
the capacity rule as a source rank. Because it calls the same functions as
:func:`flashmoe_core.oracle.reference.moe_forward`, whose matrix products give a row the same
bits whatever else shares the call, its output equals the single-process oracle's bit
for bit on the same global inputs, for any world size and placement.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..config import MoEConfig
from .reference import (Routing, check_routing, combine, dispatch_lists, expert_ffn, route_tokens,
                        shared_experts)
from ..numerics import storage_dtype
from ..weights import MoEWeights, check_weights

__all__ = ["moe_forward_distributed", "DispatchPlan", "plan_dispatch"]


class DispatchPlan:
    """What one source rank sends where, in the order it sends it.

    Attributes
    ----------
    order_tok, order_slot, order_expert : ndarray of int
        The kept assignments, grouped by destination rank, then expert, then in
        (token, slot) order.
    send_counts : ndarray of int, [world_size]
        Rows sent to each destination rank.
    """

    def __init__(self, cfg: MoEConfig, routing: Routing) -> None:
        owner = np.asarray(cfg.expert_owner)
        lists = dispatch_lists(cfg, routing)
        toks, slots, exps = [], [], []
        counts = np.zeros(cfg.world_size, dtype=np.int64)
        for dest in range(cfg.world_size):
            for e in np.nonzero(owner == dest)[0]:
                tok, slot = lists[e]
                toks.append(tok)
                slots.append(slot)
                exps.append(np.full(tok.size, e, dtype=np.int32))
                counts[dest] += tok.size
        cat = (lambda parts, dt: np.concatenate(parts).astype(dt) if parts
               else np.zeros(0, dtype=dt))
        self.order_tok = cat(toks, np.int64)
        self.order_slot = cat(slots, np.int64)
        self.order_expert = cat(exps, np.int32)
        self.send_counts = counts


def plan_dispatch(cfg: MoEConfig, routing: Routing) -> DispatchPlan:
    """The dispatch plan of one source rank for a routing of its own tokens."""
    return DispatchPlan(cfg, routing)


def _alltoallv(comm, send: np.ndarray, send_counts: np.ndarray, row_bytes: int,
               recv_counts: np.ndarray) -> np.ndarray:
    from mpi4py import MPI

    sbuf = np.ascontiguousarray(send).view(np.uint8).reshape(-1)
    rbuf = np.empty(int(recv_counts.sum()) * row_bytes, dtype=np.uint8)
    sc = (send_counts * row_bytes).astype(np.int64)
    rc = (recv_counts * row_bytes).astype(np.int64)
    sd = np.concatenate([[0], np.cumsum(sc)[:-1]]).astype(np.int64)
    rd = np.concatenate([[0], np.cumsum(rc)[:-1]]).astype(np.int64)
    comm.Alltoallv([sbuf, (sc, sd), MPI.BYTE], [rbuf, (rc, rd), MPI.BYTE])
    return rbuf


def moe_forward_distributed(cfg: MoEConfig, weights: MoEWeights, x: np.ndarray, comm=None,
                            routing: Optional[Routing] = None) -> Tuple[np.ndarray, Routing]:
    """One rank's share of the expert-parallel forward pass.

    Parameters
    ----------
    cfg : MoEConfig
        ``cfg.world_size`` must equal the communicator's size.
    weights : MoEWeights
        The router and at least this rank's experts.
    x : ndarray [t, hidden]
        This rank's tokens; every rank passes the same ``t``.
    comm : mpi4py communicator, optional
        Defaults to ``MPI.COMM_WORLD``.
    routing : Routing, optional
        This rank's routing to use instead of computing one.

    Returns
    -------
    y : ndarray [t, hidden] of the storage type
    routing : Routing of this rank's tokens
    """
    check_weights(cfg, weights)  # before MPI starts: a mismatch needs no communicator
    from mpi4py import MPI

    comm = MPI.COMM_WORLD if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    if size != cfg.world_size:
        raise ValueError(f"the communicator has {size} ranks but cfg.world_size="
                         f"{cfg.world_size}; launch with mpirun -np {cfg.world_size}")
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != cfg.hidden or not 1 <= x.shape[0] <= cfg.tokens:
        raise ValueError(f"rank {rank}: x has shape {x.shape}; expected [1..{cfg.tokens}, "
                         f"{cfg.hidden}]")
    t = x.shape[0]
    all_t = comm.allgather(t)
    if len(set(all_t)) != 1:
        raise ValueError(f"ranks carry different token counts {all_t}; the oracle needs equal "
                         "blocks")
    mine = set(cfg.local_experts(rank))
    missing = sorted(mine - set(weights.expert_ids))
    if missing:
        raise ValueError(f"rank {rank} owns experts {missing} but its weights lack them")

    if routing is None:
        routing = route_tokens(cfg, weights, x, t)
    else:
        routing = check_routing(cfg, routing, t)
    plan = plan_dispatch(cfg, routing)

    # Dispatch: token rows plus the expert each row is for.
    recv_counts = np.asarray(comm.alltoall(plan.send_counts.tolist()), dtype=np.int64)
    dt = storage_dtype(cfg.dtype)
    row_bytes = cfg.hidden * dt.itemsize
    rows = _alltoallv(comm, x[plan.order_tok], plan.send_counts, row_bytes, recv_counts)
    rows = rows.view(dt).reshape(-1, cfg.hidden)
    rexp = _alltoallv(comm, plan.order_expert, plan.send_counts, 4, recv_counts).view(np.int32)

    # Expert compute on the owner, results in arrival order.
    results = np.empty_like(rows)
    for e in sorted(mine):
        idx = np.nonzero(rexp == e)[0]
        if idx.size:
            results[idx] = expert_ffn(cfg, weights, int(e), rows[idx])

    # Combine: results travel back along the reverse counts, in the order sent.
    back = _alltoallv(comm, results, recv_counts, row_bytes, plan.send_counts)
    back = back.view(dt).reshape(-1, cfg.hidden)
    out = np.zeros((t, cfg.top_k, cfg.hidden), dtype=dt)
    out[plan.order_tok, plan.order_slot] = back
    return combine(cfg, routing, out, shared_experts(cfg, weights, x)), routing
