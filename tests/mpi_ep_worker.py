"""Run under mpirun: each rank plans its side of the expert-parallel protocol from its
own routing; headers travel by Alltoall as they do in the kernel; every rank checks that
what it expects to receive is exactly what its peers send, that returns match sends, and
that the protocol's result equals the distributed oracle bit for bit."""

import sys

import numpy as np
from mpi4py import MPI

from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.oracle.distributed import moe_forward_distributed
from flashmoe_core.kernel.ep import plan_recv, plan_send, simulate, task_counts

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
failures = 0
for kw in (dict(experts=2 * size), dict(experts=2 * size + 1, top_k=3, capacity_factor=0.75),
           dict(experts=size + 2, placement=tuple((3 * e) % size for e in range(size + 2)))):
    cfg = MoEConfig(tokens=96, hidden=16, ffn=16, world_size=size, **kw)
    w = MoEWeights.random(cfg, 5, expert_ids=cfg.local_experts(rank))
    x = random_tokens(cfg, 6, rank=rank)
    y, routing = moe_forward_distributed(cfg, w, x, comm)
    send = plan_send(cfg, routing, rank)
    headers_in = comm.alltoall([send.headers[p] for p in range(size)])
    recv = plan_recv(cfg, rank, dict(enumerate(headers_in)))
    tiles_in = comm.alltoall([send.tiles.get(p, []) for p in range(size)])
    ok = all(recv.tiles[s] == tiles_in[s] for s in range(size) if s != rank)
    counts = task_counts(cfg, send, recv, x.shape[0])
    all_counts = comm.allgather(counts)
    ok &= sum(c.send_tiles for c in all_counts) == sum(c.recv_tiles for c in all_counts)
    rows_in = sum(tl.rows for tiles in recv.tiles.values() for tl in tiles)
    rows_out = sum(tl.rows for tiles in send.tiles.values() for tl in tiles)
    ok &= comm.allreduce(rows_in) == comm.allreduce(rows_out)
    ok &= comm.allreduce(rows_out + send.local_rows) == comm.allreduce(int(routing.kept.sum()))
    ys = comm.gather(y, root=0)
    if rank == 0:
        full = MoEWeights.random(cfg, 5)
        xs = [random_tokens(cfg, 6, rank=r) for r in range(size)]
        sim, _, sim_counts = simulate(cfg, full, xs)
        ok &= all(np.array_equal(a.view(np.uint8), b.view(np.uint8)) for a, b in zip(sim, ys))
        ok &= sim_counts == all_counts
    ok = comm.allreduce(bool(ok), op=MPI.LAND)
    if rank == 0:
        print(("OK" if ok else "MISMATCH"), size, kw, flush=True)
    failures += 0 if ok else 1
sys.exit(1 if failures else 0)
