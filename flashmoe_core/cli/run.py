"""Run one MoE layer forward pass, time it and optionally check it.

Single process::

    python -m flashmoe_core.run --tokens 4096 --experts 64 --check

Expert parallel, one rank per GPU (or per CPU core with the reference backend)::

    mpirun -np 8 python -m flashmoe_core.run --check

``--backend auto`` uses the fused GPU kernel when a GPU is usable and the reference
(NumPy) backend otherwise, saying so in one line. ``--backend emulator`` runs the
fused kernel itself on the CPU emulator (slow: small layers): under ``mpirun -np N``
one PE per process (their symmetric heaps in the node's shared memory), without it
every PE of ``--world-size N`` in this one process. Rank 0 prints one summary.

Exit status (:data:`flashmoe_core.cli.EXIT_CODES`): 0 success, 1 a check failed, 2 bad
input, 3 the environment or toolchain (a bad variable, an unusable cache folder, a
missing or broken compiler, no GPU for ``--backend gpu``, too little memory), 4 a kernel
fault or timeout. Errors are one line on stderr, and everything that can be checked
before a compile or an allocation is.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import List, Optional

import numpy as np

from .. import env
from . import add_config_args, config_from_args, error_line, exit_code
from ..config import MoEConfig

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flashmoe_core.run",
        description="Run, time and check one distributed MoE layer forward pass.",
        epilog="Under mpirun -np N each rank owns tokens/rank tokens and its share of the "
               "experts; rank 0 prints the summary.")
    add_config_args(p)
    r = p.add_argument_group("run")
    r.add_argument("--backend", choices=("auto", "gpu", "reference", "emulator"),
                   default="auto",
                   help="auto: the GPU kernel if a GPU is usable, else the NumPy reference; "
                        "emulator: the fused kernel on the CPU emulator (small layers; one "
                        "PE per MPI rank, or --world-size N PEs in this process)")
    r.add_argument("--seed", type=int, default=0, help="seed of weights and tokens")
    r.add_argument("--warmup", type=int, default=None,
                   help="untimed passes first (default 32 on GPU, 0 otherwise)")
    r.add_argument("--iters", type=int, default=None,
                   help="timed passes (default 32 on GPU, 2 on the reference, 1 on the "
                        "emulator)")
    r.add_argument("--check", action="store_true",
                   help="check the result: GPU and emulator, the kernel vs the oracle on the "
                        "kernel's routing; reference, the oracle vs exact float64 math on its "
                        "routing (its rounding, not a kernel); MPI reference, distributed == "
                        "single-process, bit for bit")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.add_argument("--verbose", action="store_true", help="print the environment and plan")
    return p


def _mpi_comm():
    if not env.launched_by_mpi():
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(text, file=sys.stderr, flush=True)


def _choose_backend(requested: str, rank: int, world: int) -> str:
    if requested == "reference":
        return "reference"
    from ..host.device import probe

    ok, why = probe()
    if requested == "gpu":
        if not ok:
            raise _Fail(3, f"--backend gpu needs an NVIDIA GPU, but {why}")
        return "gpu"
    if not ok:
        _say(rank, f"flashmoe_core: no usable GPU ({why}); using the reference backend")
        return "reference"
    return "gpu"


class _Fail(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _time(fn, warmup: int, iters: int, comm=None, sync=None) -> List[float]:
    for _ in range(warmup):
        fn()
    if sync is not None:
        sync()
    times = []
    for _ in range(iters):
        if comm is not None:
            comm.Barrier()
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        dt = time.perf_counter() - t0
        if comm is not None:
            dt = comm.allreduce(dt, op=_mpi_max())
        times.append(dt)
    return times


def _mpi_max():
    from mpi4py import MPI

    return MPI.MAX


def _run_reference(cfg: MoEConfig, args, comm, rank: int) -> dict:
    from ..oracle.reference import moe_forward
    from ..weights import MoEWeights, random_tokens

    warmup = 0 if args.warmup is None else args.warmup
    iters = 2 if args.iters is None else args.iters
    result = {"backend": "reference"}
    if comm is None:
        w = MoEWeights.random(cfg, args.seed)
        x = random_tokens(cfg, args.seed)
        out = {}

        def step():
            out["y"], out["routing"] = moe_forward(cfg, w, x)

        times = _time(step, warmup, iters)
        if args.check:
            # The reference is the oracle, so there is no kernel to check here: what can be
            # checked is that its rounding stays within the dtype's bound of exact math.
            from .gpu_run import TOLERANCE
            from ..oracle.reference import moe_forward_exact

            exact = moe_forward_exact(cfg, w, x, out["routing"])
            got = out["y"].astype(np.float64)
            rel = float(np.linalg.norm(got - exact) / max(np.linalg.norm(exact), 1e-30))
            tol = TOLERANCE[cfg.dtype]
            result["check"] = {"what": f"the oracle ({cfg.dtype} rounding) vs exact float64 "
                                       f"math on the same routing: rel error {rel:.2e} "
                                       f"(<= {tol:.0e}); no kernel ran (--backend emulator "
                                       "runs the kernel on the CPU)",
                               "rel_error": rel, "tolerance": tol, "passed": bool(rel <= tol)}
    else:
        from ..oracle.distributed import moe_forward_distributed

        w = MoEWeights.random(cfg, args.seed, expert_ids=cfg.local_experts(rank))
        x = random_tokens(cfg, args.seed, rank=rank)
        out = {}

        def step():
            out["y"], out["routing"] = moe_forward_distributed(cfg, w, x, comm)

        times = _time(step, warmup, iters, comm=comm)
        if args.check:
            ys = comm.gather(out["y"], root=0)
            if rank == 0:
                full_w = MoEWeights.random(cfg, args.seed)
                xs = np.concatenate([random_tokens(cfg, args.seed, rank=r)
                                     for r in range(cfg.world_size)])
                y_ref, _ = moe_forward(cfg, full_w, xs)
                y_dist = np.concatenate(ys)
                same = np.array_equal(y_dist.view(np.uint8), y_ref.view(np.uint8))
                result["check"] = {"what": "distributed oracle == single-process oracle "
                                           "(bitwise)", "passed": bool(same)}
    result["times_s"] = times
    kept = out["routing"].kept
    result["dropped_assignments"] = int(kept.size - kept.sum())
    return result


def _run_emulator(cfg: MoEConfig, args, comm=None, rank: int = 0) -> dict:
    from ..emulator import EmulatedExpertParallel
    from .gpu_run import compare
    from ..gpu.layer import MoELayer
    from ..oracle.reference import Routing
    from ..weights import MoEWeights, random_tokens

    warmup = 0 if args.warmup is None else args.warmup
    iters = 1 if args.iters is None else args.iters
    w = MoEWeights.random(cfg, args.seed)
    xs = [random_tokens(cfg, args.seed, rank=r) for r in range(cfg.world_size)]
    if comm is not None:  # one PE per process: this rank's tokens, gathered for the check
        layer = MoELayer(cfg, MoEWeights.random(cfg, args.seed,
                                                expert_ids=cfg.local_experts(rank)),
                         backend="emulator", comm=comm)

        def step():
            y, routing = layer(xs[rank], return_routing=True)
            ys, rs = comm.gather(y, root=0), comm.gather(routing, root=0)
            return (ys, rs) if rank == 0 else ([y], [routing])
    elif cfg.world_size > 1:
        ep = EmulatedExpertParallel(cfg, w)
        step = lambda: ep(xs, return_routing=True)  # noqa: E731
    else:
        layer = MoELayer(cfg, w, backend="emulator")

        def step():
            y, routing = layer(xs[0], return_routing=True)
            return [y], [routing]
    out = {}

    def run():
        ys, routings = step()
        out["y"] = np.concatenate(ys)
        out["routing"] = Routing(*(np.concatenate([getattr(r, f) for r in routings])
                                   for f in Routing._fields))
    result = {"backend": "emulator", "times_s": _time(run, warmup, iters, comm=comm)}
    result["dropped_assignments"] = int(out["routing"].kept.size - out["routing"].kept.sum())
    if args.check and rank == 0:
        cmp = compare(cfg, w, np.concatenate(xs), out["y"], out["routing"])
        result["check"] = {"what": f"emulated kernel vs oracle on its routing: rel error "
                                   f"{cmp['rel_error']:.2e} (<= {cmp['tolerance']:.0e}), "
                                   f"routing agreement {cmp['routing_agreement']:.4%}",
                           "passed": cmp["passed"], **cmp}
    return result


def _run_gpu(cfg: MoEConfig, args, comm, rank: int) -> dict:
    from .gpu_run import run_benchmark

    warmup = 32 if args.warmup is None else args.warmup
    iters = 32 if args.iters is None else args.iters
    return run_benchmark(cfg, seed=args.seed, warmup=warmup, iters=iters, check=args.check,
                         comm=comm, verbose=args.verbose)


def _summary(cfg: MoEConfig, res: dict) -> dict:
    times = res.get("times_s") or [float("nan")]
    med = statistics.median(times)
    flops = cfg.flops()
    s = {
        "backend": res["backend"],
        "config": cfg.to_dict(),
        "median_ms": med * 1e3,
        "min_ms": min(times) * 1e3,
        "iters": len(times),
        "tflops_per_rank": flops / med / 1e12 if med > 0 else float("nan"),
    }
    for k in ("check", "dropped_assignments", "device", "peak_tflops", "percent_of_peak",
              "routing_agreement", "rel_error", "grid", "arch"):
        if k in res:
            s[k] = res[k]
    return s


def _format(s: dict) -> str:
    c = s["config"]
    shared = ""
    if c.get("n_shared"):
        shared = (f" shared={c['n_shared']}x{c['shared_ffn']}"
                  + ("+gate" if c.get("shared_gate") else ""))
    line = (f"{s['backend']}: tokens/rank={c['tokens']} hidden={c['hidden']} ffn={c['ffn']} "
            f"experts={c['experts']} top_k={c['top_k']}{shared} {c['mlp']}/{c['activation']} "
            f"{c['dtype']} world={c['world_size']} | median {s['median_ms']:.3f} ms over "
            f"{s['iters']} | {s['tflops_per_rank']:.3f} TFLOP/s per rank")
    if "percent_of_peak" in s:
        line += f" ({s['percent_of_peak']:.1f}% of {s['peak_tflops']:.0f} TFLOP/s peak)"
    if "check" in s:
        chk = s["check"]
        line += f" | check {'PASS' if chk['passed'] else 'FAIL'}: {chk['what']}"
    return line


def _available_host_bytes() -> Optional[int]:
    """Memory this machine can still give (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _host_bytes(cfg: MoEConfig, backend: str, check: bool, rank: int) -> int:
    """A generous estimate of the host memory one process of this run allocates."""
    from ..numerics import itemsize
    from ..kernel.plan import plan_layer

    isz = itemsize(cfg.dtype)
    h, f, e, k = cfg.hidden, cfg.ffn, cfg.experts, cfg.top_k

    def oracle(tokens: int, experts: int) -> int:
        per_expert = (3 if cfg.mlp == "gated" else 2) * h * f + f + h
        weights = experts * per_expert * isz + h * e * isz
        rows = tokens * (h * (3 * isz + 24) + e * 24 + k * h * isz)  # x, y, logits, out
        work = tokens * k * (h + f) * 16 + 3 * h * f * 8  # one expert's float64 operands
        return weights + rows + work

    world, t = cfg.world_size, cfg.tokens
    if backend == "reference":
        mine = len(cfg.local_experts(rank)) if world > 1 else e
        need = oracle(t, mine)
        if check and rank == 0:
            need += oracle(world * t, e) if world > 1 else t * h * 16 + oracle(t, e) // 2
        return need
    need = oracle(0, e)  # the random weights
    if backend == "emulator":
        need += world * (plan_layer(cfg, local_experts=cfg.max_local_experts).total_bytes +
                         oracle(0, e))  # every PE's buffers and its copy of the weights
    if check and rank == 0:
        need += oracle(world * t, e)
    return need


def _check_memory(cfg: MoEConfig, backend: str, check: bool, rank: int) -> None:
    need, have = _host_bytes(cfg, backend, check, rank), _available_host_bytes()
    if have is not None and need > have:
        raise _Fail(3, f"this run needs about {need / 2**30:.1f} GiB of host memory and "
                       f"{have / 2**30:.1f} GiB is available; lower --tokens or the layer "
                       "size (--hidden, --ffn, --experts)")


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    comm = _mpi_comm()
    rank = 0 if comm is None else comm.Get_rank()
    size = 1 if comm is None else comm.Get_size()
    try:
        try:
            env.validate()  # every variable, whatever the backend reads
        except ValueError as exc:
            raise _Fail(3, str(exc)) from None
        if args.seed < 0:
            raise _Fail(2, f"--seed {args.seed} is out of range (seed >= 0)")
        cfg = config_from_args(args, world_size=size)
        if cfg.world_size != size and not (args.backend == "emulator" and size == 1):
            raise _Fail(2, f"world_size={cfg.world_size} but {size} rank(s) are running; "
                           f"launch with mpirun -np {cfg.world_size} or drop --world-size")
        for name in ("warmup", "iters"):
            v = getattr(args, name)
            if v is not None and v < (1 if name == "iters" else 0):
                raise _Fail(2, f"--{name} {v} is out of range (iters >= 1, warmup >= 0)")
        if args.verbose:
            _say(rank, f"flashmoe_core: environment {json.dumps(env.describe())}")
        backend = "emulator" if args.backend == "emulator" else \
            _choose_backend(args.backend, rank, size)
        _check_memory(cfg, backend, args.check, rank)  # before any compile or allocation
        if backend == "emulator":
            res = _run_emulator(cfg, args, comm, rank)
        elif backend == "reference":
            res = _run_reference(cfg, args, comm, rank)
        else:
            res = _run_gpu(cfg, args, comm, rank)
    except _Fail as exc:
        _say(rank, f"error: {exc}")
        return exc.code
    except Exception as exc:  # MemoryError is an Exception too
        code = exit_code(exc)
        if code is None:
            raise
        _say(rank, error_line(exc, args.verbose))
        return code
    summary = _summary(cfg, res)
    if rank == 0:
        print(json.dumps(summary, indent=1) if args.json else _format(summary), flush=True)
    passed = summary.get("check", {}).get("passed", True)
    if comm is not None:
        passed = comm.bcast(passed, root=0)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
