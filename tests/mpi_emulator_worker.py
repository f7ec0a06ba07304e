"""Run under mpirun: one emulated PE per process (symmetric heaps in shared memory).

Modes (argv[1]):
  check - two launches with every emulator check on; each rank's output and routing are
          gathered and compared with the oracle on rank 0.
  kill  - the last rank is killed (SIGKILL) after the layer is built; every other rank's
          launch must raise FlashMoETimeout naming it (mpirun --enable-recovery keeps
          the survivors running).
Prints "RESULT <rank> ok|fail <details>" per rank.
"""

import os
import signal
import sys

import numpy as np
from mpi4py import MPI

from flashmoe_core import FlashMoETimeout, MoEConfig, MoEWeights, random_tokens
from flashmoe_core.emulator import EmulatorOptions
from flashmoe_core.cli.gpu_run import TOLERANCE, compare
from flashmoe_core.gpu.layer import MoELayer
from flashmoe_core.oracle.reference import Routing

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
mode = sys.argv[1]
cfg = MoEConfig(tokens=48, hidden=128, ffn=128, experts=9, world_size=size)
w = MoEWeights.random(cfg, 0, expert_ids=cfg.local_experts(rank))
x = random_tokens(cfg, 0, rank=rank)
if mode == "check":
    layer = MoELayer(cfg, w, backend="emulator", comm=comm, timeout_s=30,
                     emulator_options=EmulatorOptions.strict(rank + 1))
    for _ in range(2):  # epochs and done-signals advance across launches
        y, routing = layer(x, return_routing=True)
    ys, rs = comm.gather(y, root=0), comm.gather(routing, root=0)
    ok, info = True, ""
    if rank == 0:
        full = MoEWeights.random(cfg, 0)
        xs = np.concatenate([random_tokens(cfg, 0, rank=r) for r in range(size)])
        r_all = Routing(*(np.concatenate([getattr(r, f) for r in rs]) for f in Routing._fields))
        res = compare(cfg, full, xs, np.concatenate(ys), r_all)
        ok = res["rel_error"] <= TOLERANCE[cfg.dtype] and res["routing_agreement"] >= 0.999
        info = f"rel_error={res['rel_error']:.2e} agreement={res['routing_agreement']:.4f}"
    epoch = layer.state()["epoch"]
    ok = ok and epoch == 2
    print(f"RESULT {rank} {'ok' if ok else 'fail'} {info} epoch={epoch}", flush=True)
    layer.close()
else:
    layer = MoELayer(cfg, w, backend="emulator", comm=comm, timeout_s=2.0)
    comm.Barrier()
    if rank == size - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        layer(x)
        print(f"RESULT {rank} fail no timeout", flush=True)
    except FlashMoETimeout as exc:
        rec = exc.record
        ok = rec["peer"] == size - 1 and f"peer {size - 1}" in str(exc)
        print(f"RESULT {rank} {'ok' if ok else 'fail'} phase={rec['phase']} "
              f"peer={rec['peer']}: {exc}", flush=True)
    os._exit(0)  # a peer is dead: no collective (MPI_Finalize included) can complete
