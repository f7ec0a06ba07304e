"""Run under mpirun: the distributed oracle must equal the single-process oracle bit for
bit on the same global inputs. Exit status 0 only if every case matches on every rank."""

import sys

import numpy as np
from mpi4py import MPI

from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.oracle.distributed import moe_forward_distributed, plan_dispatch
from flashmoe_core.oracle.reference import moe_forward

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def cases():
    base = dict(tokens=40, hidden=16, ffn=24, world_size=size)
    yield dict(base, experts=size * 2)
    yield dict(base, experts=2 * size + 1, top_k=3, mlp="gated", activation="silu",
               dtype="float16")  # uneven contiguous blocks
    yield dict(base, experts=5, top_k=2, capacity_factor=1.0, dtype="float32",
               placement=tuple((e * 3) % size for e in range(5)))  # scattered placement
    yield dict(base, experts=size + 3, top_k=2, capacity_factor=0.5, dtype="tfloat32",
               activation="gelu", placement=tuple([size - 1] * (size + 3)))  # one owner
    yield dict(base, tokens=1, experts=3, top_k=1)


failures = 0
for kw in cases():
    cfg = MoEConfig(**kw)
    w = MoEWeights.random(cfg, 3, expert_ids=cfg.local_experts(rank))
    x = random_tokens(cfg, 9, rank=rank)
    y, routing = moe_forward_distributed(cfg, w, x, comm)
    plan = plan_dispatch(cfg, routing)
    # Per-peer accounting: what each rank sends equals what its peers receive.
    sent = np.array(plan.send_counts)
    recv = np.array(comm.alltoall(sent.tolist()))
    total_kept = comm.allreduce(int(routing.kept.sum()))
    ok_counts = comm.allreduce(int(recv.sum())) == total_kept == comm.allreduce(int(sent.sum()))
    ys = comm.gather(y, root=0)
    routings = comm.gather(routing, root=0)
    ok = True
    if rank == 0:
        full = MoEWeights.random(cfg, 3)
        xs = np.concatenate([random_tokens(cfg, 9, rank=r) for r in range(size)])
        y_ref, r_ref = moe_forward(cfg, full, xs)
        y_dist = np.concatenate(ys)
        ok = bool(np.array_equal(y_dist.view(np.uint8), y_ref.view(np.uint8)))
        ok &= bool(np.array_equal(np.concatenate([r.experts for r in routings]), r_ref.experts))
        ok &= bool(np.array_equal(np.concatenate([r.kept for r in routings]), r_ref.kept))
        ok &= ok_counts
        print(f"{'OK' if ok else 'MISMATCH'} world={size} {kw}", flush=True)
    ok = comm.bcast(ok, root=0)
    failures += 0 if ok else 1

sys.exit(1 if failures else 0)
