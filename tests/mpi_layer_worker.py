"""Run under mpirun: the expert-parallel layer's collective agreement check (no GPU).

Modes (argv[1]): same - every rank passes the same config; differ - rank 1 a different
ffn; problem - rank 1 reports a local problem. Prints "RESULT <rank> ok" or
"RESULT <rank> raised <message>".
"""

import sys

from mpi4py import MPI

from flashmoe_core import MoEConfig
from flashmoe_core.kernel.contract import check_ranks_agree

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
mode = sys.argv[1]
cfg = MoEConfig(tokens=64, hidden=64, ffn=64, experts=4, world_size=size)
if mode == "differ" and rank == 1:
    cfg = cfg.replace(ffn=128)
problem = "rank 1's weights lack expert 3" if mode == "problem" and rank == 1 else None
try:
    check_ranks_agree(comm, cfg, problem)
    print(f"RESULT {rank} ok", flush=True)
except ValueError as exc:
    print(f"RESULT {rank} raised {exc}", flush=True)
