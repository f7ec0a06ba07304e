"""Run under mpirun on GPU machines: one PE per rank (several PEs may share one GPU).

Modes (argv[1]):
  check  - the expert-parallel layer equals the oracle on the kernel's routing, and the
           output is bitwise equal to a world-1 layer's on the same global inputs.
  delay  - one rank starts every launch late (injected); results stay correct.
  absent - one rank never launches; every other rank raises FlashMoETimeout naming it.
Prints "RESULT <rank> ok|fail <details>" per rank; exits non-zero on failure.
"""

import sys
import time

import numpy as np
from mpi4py import MPI

from flashmoe_core import FlashMoETimeout, MoEWeights, random_tokens
from flashmoe_core.cli.gpu_run import TOLERANCE, compare
from flashmoe_core.cli.gpucheck import ep_config
from flashmoe_core.gpu.layer import MoELayer
from flashmoe_core.oracle.reference import Routing

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
mode = sys.argv[1] if len(sys.argv) > 1 else "check"
cfg = ep_config(size)  # the GPU check's kit holds these kernels
w = MoEWeights.random(cfg, 1, expert_ids=cfg.local_experts(rank))
x = random_tokens(cfg, 2, rank=rank)
ok, info = True, ""
try:
    if mode == "absent":
        layer = MoELayer(cfg, w, comm=comm, timeout_s=2.0)
        comm.Barrier()
        if rank == size - 1:
            time.sleep(6.0)  # never launches this pass
            info = "stayed away"
        else:
            t0 = time.time()
            try:
                layer(x)
                ok, info = False, "no timeout"
            except FlashMoETimeout as exc:
                rec = exc.record
                ok = rec["peer"] in (size - 1, -1) and time.time() - t0 < 30
                info = f"timeout phase={rec['phase']} peer={rec['peer']} " \
                       f"seen={rec['counter']} expected={rec['expected']}"
        comm.Barrier()
    else:
        layer = MoELayer(cfg, w, comm=comm)
        if mode == "delay" and rank == 0:
            layer.testing.inject_delay(0.2)
        for _ in range(3):  # several launches: epochs and done-signals advance
            y, routing = layer(x, return_routing=True)
        ys, rs = comm.gather(y, root=0), comm.gather(routing, root=0)
        if rank == 0:
            full = MoEWeights.random(cfg, 1)
            xs = np.concatenate([random_tokens(cfg, 2, rank=r) for r in range(size)])
            r_all = Routing(*(np.concatenate([getattr(r, f) for r in rs]) for f in Routing._fields))
            res = compare(cfg, full, xs, np.concatenate(ys), r_all)
            ok = res["rel_error"] <= TOLERANCE[cfg.dtype] and res["routing_agreement"] >= 0.999
            one = cfg.replace(world_size=1, tokens=cfg.tokens * size)
            single = MoELayer(one, MoEWeights.random(one, 1))
            y1 = single(xs)
            bitwise = np.array_equal(y1.view(np.uint16), np.concatenate(ys).view(np.uint16))
            ok = ok and bitwise
            info = f"rel_error={res['rel_error']:.2e} agree={res['routing_agreement']:.4f} " \
                   f"bitwise_world1={bitwise}"
            single.close()
        layer.close()
except Exception as exc:  # report, do not hang the others
    ok, info = False, f"{type(exc).__name__}: {exc}"
print(f"RESULT {rank} {'ok' if ok else 'fail'} {info}", flush=True)
sys.exit(0 if comm.allreduce(ok, op=MPI.LAND) else 1)
