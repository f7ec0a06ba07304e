"""Distributed benchmark of the expert-parallel fused kernel (run under mpirun).

    mpirun -np 8 python tools/bench_ep.py --out bench/results/ep8
    python tools/bench_ep.py --summarize bench/results/ep2/bench_ep.json bench/results/ep8/bench_ep.json
    python tools/bench_ep.py --dry-run

Per row (tokens per PE, experts) every rank times, FlashMoE's protocol (warm-up then
timed passes, median; a pass lasts as long as its slowest rank):

  fused_ms      the expert-parallel fused kernel
  comm_ms       the same launch with every expert GEMM skipped (protocol + transfers)
  compute_ms    a one-GPU layer with the same tokens per GPU (no communication)
  throughput    tokens * ranks / fused time
  overlap       (compute_ms + comm_ms) / fused_ms: 2 is perfect overlap, 1 none
  busy          per-block busy share of the launch, from the kernel's own timeline

and rank 0 writes bench_ep.json plus a Chrome/Perfetto trace of one pass of the first
row (trace-<tokens>-<experts>.json: one process per rank, one thread per block).

--summarize combines runs at different world sizes into the paper's "overlap
efficiency" (weak scaling, fixed tokens per PE): T(2 PEs) / T(N PEs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

TOKENS = [4096, 8192, 16384]
EXPERTS = [8, 16, 32, 64, 128]


def rows(quick: bool):
    """(tokens per PE, experts): a token sweep at 32 experts, an expert sweep at 16K."""
    if quick:
        return [(4096, 32)]
    out = [(t, 32) for t in TOKENS]
    out += [(16384, e) for e in EXPERTS if e != 32]
    return out


def weak_scaling(results):
    """The paper's overlap efficiency T(2) / T(N) per (tokens, experts), from several
    runs (each {"world": N, "rows": [...]})."""
    by_key = {}
    for run in results:
        for r in run["rows"]:
            if "fused_ms" in r:
                by_key.setdefault((r["tokens"], r["experts"]), {})[run["world"]] = r["fused_ms"]
    out = []
    for (t, e), times in sorted(by_key.items()):
        if 2 not in times:
            continue
        for n, ms in sorted(times.items()):
            out.append({"tokens": t, "experts": e, "world": n, "fused_ms": ms,
                        "weak_scaling_efficiency": times[2] / ms})
    return out


def _median_ms(layer, tokens, mode, warmup, iters, comm):
    from cuda.core import EventOptions

    s = layer.stream
    for _ in range(warmup):
        layer.testing.launch(tokens, mode)
    layer.synchronize()
    comm.Barrier()
    opts = EventOptions(timing_enabled=True)
    marks = []
    for _ in range(iters):
        a = s.record(options=opts)
        layer.testing.launch(tokens, mode)
        marks.append((a, s.record(options=opts)))
    layer.synchronize()
    per_pass = np.array([b - a for a, b in marks])
    return float(statistics.median(np.max(np.array(comm.allgather(per_pass)), axis=0)))


def bench_row(tokens, experts, args, comm, trace_path=None):
    from flashmoe_core import MoEConfig, MoEWeights, random_tokens
    from flashmoe_core.gpu.layer import MoELayer
    from flashmoe_core.gpu.trace import busy_fraction, write_chrome

    rank, size = comm.Get_rank(), comm.Get_size()
    cfg = MoEConfig(tokens=tokens, hidden=args.hidden, ffn=args.ffn, experts=experts,
                    top_k=args.top_k, dtype=args.dtype, world_size=size)
    w = MoEWeights.random(cfg, 0, expert_ids=cfg.local_experts(rank))
    x = random_tokens(cfg, 1, rank=rank)
    layer = MoELayer(cfg, w, comm=comm, trace_capacity=1 << 20)
    try:
        t = layer.testing.stage(x)
        fused = _median_ms(layer, t, "full", args.warmup, args.iters, comm)
        comm_only = _median_ms(layer, t, "comm_only", args.warmup, args.iters, comm)
        layer.testing.launch(t)
        recs = layer.trace()
        busy = busy_fraction(recs, layer.grid)
        all_recs = comm.gather(recs, root=0)
        if rank == 0 and trace_path is not None:
            write_chrome(trace_path, all_recs)
    finally:
        layer.close()
    one = cfg.replace(world_size=1)
    local = MoELayer(one, MoEWeights.random(one, 0))
    try:
        t = local.testing.stage(x)
        from flashmoe_core.cli.gpu_run import time_layer

        compute = float(statistics.median(time_layer(local, t, args.warmup, args.iters))) * 1e3
        compute = max(comm.allgather(compute))
    finally:
        local.close()
    busy_all = comm.gather(busy, root=0)
    return {"tokens": tokens, "experts": experts, "world": size, "fused_ms": fused,
            "comm_ms": comm_only, "compute_ms": compute,
            "throughput_tokens_per_s": tokens * size / (fused / 1e3),
            "overlap": (compute + comm_only) / fused,
            "busy_mean": float(np.mean([b["mean"] for b in busy_all])) if rank == 0 else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/ep"))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--top-k", type=int, default=2, dest="top_k")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--iters", type=int, default=32)
    p.add_argument("--dry-run", action="store_true", help="print the rows and exit")
    p.add_argument("--summarize", nargs="+", type=Path, metavar="JSON",
                   help="combine bench_ep.json files of several world sizes")
    a = p.parse_args(argv)
    if a.warmup < 0 or a.iters < 1:
        p.error("--warmup >= 0 and --iters >= 1")
    if a.summarize:
        runs = [json.loads(f.read_text()) for f in a.summarize]
        print(json.dumps(weak_scaling(runs), indent=1))
        return 0
    if a.dry_run:
        for t, e in rows(a.quick):
            print(json.dumps({"tokens_per_pe": t, "experts": e}))
        return 0
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    if rank == 0:
        a.out.mkdir(parents=True, exist_ok=True)
    results = []
    for i, (t, e) in enumerate(rows(a.quick)):
        trace = a.out / f"trace-{t}-{e}.json" if i == 0 else None
        try:
            r = bench_row(t, e, a, comm, trace)
        except Exception as exc:
            r = {"tokens": t, "experts": e, "error": f"{type(exc).__name__}: {exc}"}
        if rank == 0:
            print(json.dumps(r), flush=True)
        results.append(r)
    if rank == 0:
        (a.out / "bench_ep.json").write_text(json.dumps(
            {"world": comm.Get_size(), "rows": results}, indent=1))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
