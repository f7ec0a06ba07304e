"""Run under mpirun on GPU machines: one PE per rank (several PEs may share one GPU).

Modes (argv[1]):
  check  - the expert-parallel layer equals the oracle on the kernel's routing, and the
           output is bitwise equal to a world-1 layer's on the same global inputs.
  delay  - one rank starts every launch late (injected); results stay correct.
  absent - one rank never launches; every other rank raises FlashMoETimeout naming it.
  backward - save_for_backward + backward on every rank (twice, then with recompute):
           dx and every expert's gradients bitwise equal to a world-1 layer's on the same
           global inputs, the router partials summing to its router gradient.
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
from flashmoe_core.numerics import round_to
from flashmoe_core.oracle.reference import Routing

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
mode = sys.argv[1] if len(sys.argv) > 1 else "check"
cfg = ep_config(size)  # the GPU check's kit holds these kernels
w = MoEWeights.random(cfg, 1, expert_ids=cfg.local_experts(rank))
x = random_tokens(cfg, 2, rank=rank)
ok, info = True, ""


def upstream(rank):
    rng = np.random.default_rng([7, rank])
    return round_to(rng.standard_normal((cfg.tokens, cfg.hidden), dtype=np.float32), cfg.dtype)


def backward_check(cfg, w, x):
    """This rank's part of the backward check; rank 0 compares everything."""
    layer = MoELayer(cfg, w, comm=comm)
    dy = upstream(rank)
    for _ in range(2):  # the second step reuses the slot; tags and signals move on
        y, saved = layer(x, save_for_backward=True)
        dx, g = layer.backward(dy, saved)
    y_r, saved = layer(x, save_for_backward=True, recompute=True)
    dx_r, g_r = layer.backward(dy, saved)
    same = np.array_equal(dx_r.view(np.uint16), dx.view(np.uint16)) and all(
        np.array_equal(getattr(g_r, n), getattr(g, n)) for n in g.names)
    got = comm.gather((y, dx, {n: getattr(g, n) for n in g.names}, g.expert_ids, same), root=0)
    layer.close()
    if rank != 0:
        return True, f"recompute_bitwise={same}"
    one = cfg.replace(world_size=1, tokens=cfg.tokens * size)
    single = MoELayer(one, MoEWeights.random(one, 1))
    xs = np.concatenate([random_tokens(cfg, 2, rank=r) for r in range(size)])
    y1, s1 = single(xs, save_for_backward=True)
    dx1, g1 = single.backward(np.concatenate([upstream(r) for r in range(size)]), s1)
    single.close()
    bits = lambda a: a.view(np.uint16)  # noqa: E731
    y_ok = np.array_equal(bits(np.concatenate([r[0] for r in got])), bits(y1))
    dx_ok = np.array_equal(bits(np.concatenate([r[1] for r in got])), bits(dx1))
    ids = np.concatenate([r[3] for r in got])
    w_ok = all(np.array_equal(np.concatenate([r[2][n] for r in got]), getattr(g1, n)[ids])
               for n in g1.names[1:])
    router = sum(r[2]["router"] for r in got)
    r_err = float(np.abs(router - g1.router).max() / np.abs(g1.router).max())
    recompute = all(r[4] for r in got)
    ok = y_ok and dx_ok and w_ok and r_err <= 1e-6 and recompute
    return ok, (f"y_bitwise={y_ok} dx_bitwise={dx_ok} expert_grads_bitwise={w_ok} "
                f"router_rel_error={r_err:.1e} recompute_bitwise={recompute}")


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
    elif mode == "backward":
        ok, info = backward_check(cfg, w, x)
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
