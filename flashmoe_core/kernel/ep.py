"""Expert parallelism: the per-peer protocol, the symmetric heap plan, and a simulated
transport that runs the protocol on CPU.

The fused kernel's expert-parallel protocol, stated as data (docs/design.md, "Expert
parallelism"):

1. Each rank gates its own tokens and builds its compact rows: every kept assignment,
   experts ascending, tokens ascending within an expert (exactly as on one GPU).
2. Header: rank r tells every peer p, for each of p's experts e (ascending), how many
   rows it sends (n) and where they start in r's compact rows (src_row0). Headers are
   exchanged first, so every rank knows all it will receive before any row moves:
   that fixes its task count and its termination.
3. Dispatch: the rows for p travel in tiles of at most 128 rows, expert by expert,
   into r's slot of p's receive buffer (slot rows = tokens * min(top_k, max local
   experts), the most any source can send one peer); tile i of the r -> p stream
   lands at slot offset of its expert + 128 * chunk and sets dispatch signal [r][i].
   Only real rows travel, no padding.
4. The owner runs the up and down tasks of each arrived tile and returns the result
   rows in one put per tile to the source's y_expert at src_row0 + 128 * chunk,
   setting return signal [p][i] on the source.
5. The source combines when every row of a token tile (local and returned) is done.

Rows of local experts never leave the rank. Everything here is plain NumPy so the
accounting (per-peer tiles, task totals, termination counts) and the buffer offsets
can be checked on CPU ranks against the distributed oracle.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Sequence, Tuple

import numpy as np

from ..config import MoEConfig
from ..numerics import itemsize, storage_dtype
from .plan import TILE, max_peer_tiles, plan_layer, slot_rows
from ..oracle.reference import (Routing, combine, dispatch_lists, expert_ffn, route_tokens,
                                shared_experts)
from ..weights import check_weights

__all__ = ["HeapPlan", "plan_heap", "PeerTile", "SendPlan", "RecvPlan", "plan_send",
           "plan_recv", "TaskCounts", "task_counts", "simulate", "slot_rows", "max_peer_tiles"]


# ------------------------------------------------------------------------------ heap
@dataclasses.dataclass(frozen=True)
class HeapPlan:
    """The symmetric allocations of one layer (identical on every PE).

    Attributes
    ----------
    symmetric : dict
        Name -> bytes of each NVSHMEM symmetric buffer.
    local : dict
        Name -> bytes of each ordinary device buffer (the single-GPU workspace plus the
        owner-side scratch of received rows).
    """

    symmetric: Dict[str, int]
    local: Dict[str, int]

    @property
    def symmetric_bytes(self) -> int:
        return sum(self.symmetric.values())

    @property
    def total_bytes(self) -> int:
        return self.symmetric_bytes + sum(self.local.values())

    def describe(self) -> str:
        lines = [f"{'buffer':<18}{'kind':<11}{'MiB':>11}"]
        for kind, group in (("symmetric", self.symmetric), ("local", self.local)):
            for name, n in group.items():
                lines.append(f"{name:<18}{kind:<11}{n / 2**20:>11.2f}")
        lines.append(f"{'total':<18}{'':<11}{self.total_bytes / 2**20:>11.2f}")
        return "\n".join(lines)


def plan_heap(cfg: MoEConfig) -> HeapPlan:
    """Symmetric heap and local buffers of one rank of an expert-parallel layer."""
    w, h, f = cfg.world_size, cfg.hidden, cfg.ffn
    b = itemsize(cfg.dtype)
    slots = slot_rows(cfg)
    tiles = max_peer_tiles(cfg)
    el = cfg.max_local_experts
    base = plan_layer(cfg, local_experts=el)
    symmetric = {
        "recv_rows": w * slots * h * b,          # [source][slot rows][H] dispatched tokens
        "send_rows": cfg.tokens * cfg.top_k * h * b,  # gathered rows in compact order
        "y_expert": cfg.tokens * cfg.top_k * h * b,   # results, written by owners
        "headers": w * el * 8,                   # [source][local expert] {n, src_row0}
        "headers_out": w * el * 8,               # [peer][its expert] what we tell each peer
        "header_sig": w * 8,                     # one per source
        "dispatch_sig": w * tiles * 8,           # [source][tile]
        "return_sig": w * tiles * 8,             # [owner][tile]
        "done_sig": w * 8,                       # [peer] finished its last launch
        # Put sources must be registered with NVSHMEM for network transports.
        "y_remote": w * slots * h * b,           # owner-side results before the return put
        # The kernel's state words: peers read each other's progress (bounded waits).
        "state": base.workspace["state"],
    }
    local = {k: v for k, v in base.workspace.items() if k not in ("y_expert", "state")}
    local.update(base.weights)
    local["z_remote"] = w * slots * f * b       # owner-side up outputs of received rows
    local["dep_remote"] = w * tiles * 4 * 2     # up / down tiles done per received tile
    local["expert_owner"] = cfg.experts * 4
    local["expert_local"] = cfg.experts * 4
    return HeapPlan(symmetric=symmetric, local=local)


# ------------------------------------------------------------------------------ plans
@dataclasses.dataclass(frozen=True)
class PeerTile:
    """One tile of a source -> owner stream."""

    index: int       # position in the stream (signal index)
    expert: int      # global expert id
    local: int       # expert's position among the owner's experts
    chunk: int       # 128-row chunk of the expert's rows
    rows: int        # 1..128
    src_row: int     # first row in the source's compact rows
    dst_row: int     # first row in the source's slot of the owner's receive buffer


@dataclasses.dataclass
class SendPlan:
    """What one source rank sends: headers and tiles per peer."""

    rank: int
    compact_offsets: np.ndarray          # [E + 1] first compact row of each expert
    headers: Dict[int, np.ndarray]       # peer -> int64 [max local experts, 2] {n, src_row0}
    tiles: Dict[int, List[PeerTile]]     # peer -> tiles in stream order (remote peers)
    local_rows: int                      # rows of this rank's own experts


def _tiles_for(cfg: MoEConfig, peer: int, header: np.ndarray) -> List[PeerTile]:
    tiles, dst = [], 0
    for le, e in enumerate(cfg.local_experts(peer)):
        n, src0 = int(header[le, 0]), int(header[le, 1])
        for c in range(math.ceil(n / TILE)):
            rows = min(TILE, n - c * TILE)
            tiles.append(PeerTile(len(tiles), e, le, c, rows, src0 + c * TILE, dst + c * TILE))
        dst += n
    return tiles


def plan_send(cfg: MoEConfig, routing: Routing, rank: int) -> SendPlan:
    """The send side of one rank from its routing (kept assignments only)."""
    lists = dispatch_lists(cfg, routing)
    counts = np.array([tok.size for tok, _ in lists], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    headers, tiles = {}, {}
    el = cfg.max_local_experts
    for p in range(cfg.world_size):
        hdr = np.zeros((el, 2), dtype=np.int64)
        for le, e in enumerate(cfg.local_experts(p)):
            hdr[le] = (counts[e], offsets[e])
        headers[p] = hdr
        if p != rank:
            tiles[p] = _tiles_for(cfg, p, hdr)
    local = int(sum(counts[e] for e in cfg.local_experts(rank)))
    return SendPlan(rank, offsets, headers, tiles, local)


@dataclasses.dataclass
class RecvPlan:
    """What one owner rank receives: per source, the tiles announced by its header."""

    rank: int
    tiles: Dict[int, List[PeerTile]]   # source -> tiles (remote sources)


def plan_recv(cfg: MoEConfig, rank: int, headers_from: Dict[int, np.ndarray]) -> RecvPlan:
    """The receive side of one rank from the headers every source sent it."""
    return RecvPlan(rank, {s: _tiles_for(cfg, rank, h) for s, h in headers_from.items()
                           if s != rank})


@dataclasses.dataclass(frozen=True)
class TaskCounts:
    """Work and events of one rank in one forward pass (the termination bound)."""

    send_tiles: int       # tiles put to peers
    local_rowtiles: int   # row tiles of own experts (own tokens)
    recv_tiles: int       # tiles arriving from peers (one row tile each)
    return_tiles: int     # result tiles coming back from peers (== send_tiles)
    up_tasks: int
    down_tasks: int
    combine_tasks: int

    @property
    def total_tasks(self) -> int:
        return self.send_tiles + self.up_tasks + self.down_tasks + self.combine_tasks

    @property
    def subscriber_events(self) -> int:
        """Signals the subscriber consumes: arrivals plus returns."""
        return self.recv_tiles + self.return_tiles


def task_counts(cfg: MoEConfig, send: SendPlan, recv: RecvPlan, tokens: int) -> TaskCounts:
    """Every task and signal one rank handles (what its kernel waits for before exiting)."""
    lay = plan_layer(cfg)
    local_rt = sum(math.ceil(int(send.headers[send.rank][le, 0]) / TILE)
                   for le in range(len(cfg.local_experts(send.rank))))
    n_send = sum(len(t) for t in send.tiles.values())
    n_recv = sum(len(t) for t in recv.tiles.values())
    rowtiles = local_rt + n_recv
    return TaskCounts(send_tiles=n_send, local_rowtiles=local_rt, recv_tiles=n_recv,
                      return_tiles=n_send, up_tasks=rowtiles * lay.up_tiles,
                      down_tasks=rowtiles * lay.down_tiles,
                      combine_tasks=math.ceil(tokens / TILE) * lay.down_tiles)


# ------------------------------------------------------------------------------ simulation
def simulate(cfg: MoEConfig, weights, xs: Sequence[np.ndarray]) -> Tuple[list, list, list]:
    """Run the protocol for every rank in one process, moving rows through per-rank
    copies of the symmetric buffers exactly where the plans say.

    Parameters
    ----------
    weights : MoEWeights holding every expert (each owner uses its own).
    xs : one [t, hidden] array per rank.

    Returns
    -------
    ys, routings, counts : per rank.
    """
    check_weights(cfg, weights)
    w = cfg.world_size
    if len(xs) != w:
        raise ValueError(f"need {w} token blocks, got {len(xs)}")
    t = xs[0].shape[0]
    dt = storage_dtype(cfg.dtype)
    slots = slot_rows(cfg)
    recv_rows = [np.zeros((w, slots, cfg.hidden), dt) for _ in range(w)]
    y_expert = [np.zeros((t * cfg.top_k, cfg.hidden), dt) for _ in range(w)]
    routings, sends = [], []
    for r in range(w):
        routing = route_tokens(cfg, weights, xs[r], t)
        routings.append(routing)
        sends.append(plan_send(cfg, routing, r))
    # Headers first (what every owner learns about every source).
    recvs = [plan_recv(cfg, p, {s: sends[s].headers[p] for s in range(w)}) for p in range(w)]
    # Dispatch: gather the compact rows, put each tile into the owner's slot.
    gathered = []
    for r in range(w):
        lists = dispatch_lists(cfg, routings[r])
        tok = np.concatenate([lst[0] for lst in lists]) if lists else np.zeros(0, int)
        gathered.append(xs[r][tok])
        for p, tiles in sends[r].tiles.items():
            for tl in tiles:
                recv_rows[p][r, tl.dst_row:tl.dst_row + tl.rows] = \
                    gathered[r][tl.src_row:tl.src_row + tl.rows]
    # Owners: local experts on own rows; received tiles from their slots; return puts.
    for p in range(w):
        hdr = sends[p].headers[p]
        for le, e in enumerate(cfg.local_experts(p)):
            n, src0 = int(hdr[le, 0]), int(hdr[le, 1])
            if n:
                y_expert[p][src0:src0 + n] = expert_ffn(cfg, weights, e,
                                                        gathered[p][src0:src0 + n])
        for s, tiles in recvs[p].tiles.items():
            for tl in tiles:
                rows = recv_rows[p][s, tl.dst_row:tl.dst_row + tl.rows]
                y_expert[s][tl.src_row:tl.src_row + tl.rows] = \
                    expert_ffn(cfg, weights, tl.expert, rows)
    # Combine on each source from its y_expert.
    ys = []
    for r in range(w):
        lists = dispatch_lists(cfg, routings[r])
        out = np.zeros((t, cfg.top_k, cfg.hidden), dt)
        row = 0
        for tok, slot in lists:
            out[tok, slot] = y_expert[r][row:row + tok.size]
            row += tok.size
        ys.append(combine(cfg, routings[r], out, shared_experts(cfg, weights, xs[r])))
    counts = [task_counts(cfg, sends[r], recvs[r], t) for r in range(w)]
    return ys, routings, counts
