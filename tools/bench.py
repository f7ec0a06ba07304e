"""Benchmark the fused MoE kernel against its practical ceiling and two unfused baselines.

    python tools/bench.py --out bench/results/run1          # full sweep
    python tools/bench.py --out /tmp/b --quick              # a smoke run
    python tools/bench.py --dry-run                         # list the sweep, no GPU

Sweeps tokens 128..16K (experts 64) and experts 8..256 (16K tokens) at hidden = ffn =
2048, top-2, bf16 and tf32, with the FlashMoE paper's protocol: 32 warm-up and 32 timed
passes, each timed with CUDA events, median reported. Every row also times, on the
same GPU in the same process:

  (a) dense: one GEMM pair of the same FLOPs (M = tokens * top_k rows through the up
      and down projections) - cuBLAS through PyTorch or CuPy when importable, and this
      package's own tile GEMM;
  (b) unfused: this package's kernels as separate launches - router + top-k + dispatch
      lists, one up and one down tile-GEMM launch per expert (gathering rows by index,
      after a host read of the expert counts, as unfused pipelines do), combine;
  (c) torch: PyTorch's MoE path (matmul, softmax, topk, index_select, index_add_) when
      torch is importable (never a dependency).

Writes bench.json (rows + metadata) and PNG plots to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TOKENS = [128, 512, 2048, 8192, 16384]
EXPERTS = [8, 16, 32, 64, 128, 256]
DTYPES = ["bfloat16", "tfloat32"]


def sweep(quick: bool, dtypes):
    """(dtype, tokens, experts) rows: a token sweep at 64 experts, an expert sweep at 16K."""
    toks = [512, 16384] if quick else TOKENS
    exps = [8, 64] if quick else EXPERTS
    rows = []
    for d in dtypes:
        rows += [(d, t, 64) for t in toks]
        rows += [(d, 16384, e) for e in exps if e != 64]
    return rows


def make_config(dtype, tokens, experts, hidden=2048, ffn=2048, top_k=2):
    from flashmoe_core import MoEConfig

    return MoEConfig(tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, top_k=top_k,
                     dtype=dtype)


def bench_weights(cfg, distinct: int = 4):
    """Random weights; experts repeat a few distinct matrices (timing does not depend on
    the values, and generating 256 distinct 2048x2048 pairs is slow)."""
    from flashmoe_core import MoEWeights
    from flashmoe_core.numerics import round_to

    small = cfg.replace(experts=min(distinct, cfg.experts), top_k=1)
    base = MoEWeights.random(small, 0)
    rep = lambda a: np.ascontiguousarray(np.resize(a, (cfg.experts,) + a.shape[1:]))  # noqa
    # A full random router keeps the routing balanced as in a real layer.
    rng = np.random.default_rng(0)
    router = round_to(rng.standard_normal((cfg.hidden, cfg.experts), dtype=np.float32)
                      / np.float32(np.sqrt(cfg.hidden)), cfg.dtype)
    return MoEWeights(cfg, router=router, w1=rep(base.w1), b1=rep(base.b1), w2=rep(base.w2),
                      b2=rep(base.b2))


def time_events(stream, fn, warmup, iters):
    from cuda.core import EventOptions

    for _ in range(warmup):
        fn()
    opts = EventOptions(enable_timing=True)
    marks = []
    for _ in range(iters):
        a = stream.record(options=opts)
        fn()
        marks.append((a, stream.record(options=opts)))
    stream.sync()
    return statistics.median([(b - a) for a, b in marks])  # ms


def dense_cublas(cfg, warmup, iters):
    """cuBLAS GEMM pair of the same shape, through torch or CuPy; (ms, library)."""
    m, h, f = cfg.tokens * cfg.top_k, cfg.hidden, cfg.ffn
    try:
        import torch

        dt = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        torch.backends.cuda.matmul.allow_tf32 = cfg.dtype == "tfloat32"
        a = torch.randn(m, h, device="cuda", dtype=dt)
        w1 = torch.randn(h, f, device="cuda", dtype=dt)
        w2 = torch.randn(f, h, device="cuda", dtype=dt)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(warmup):
            (a @ w1) @ w2
        times = []
        for _ in range(iters):
            start.record()
            (a @ w1) @ w2
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), f"torch {torch.__version__} (cuBLAS)"
    except ImportError:
        pass
    try:
        import cupy

        dt = np.float32 if cfg.dtype == "tfloat32" else np.float16
        a = cupy.random.standard_normal((m, h)).astype(dt)
        w1 = cupy.random.standard_normal((h, f)).astype(dt)
        w2 = cupy.random.standard_normal((f, h)).astype(dt)
        ev = [cupy.cuda.Event(), cupy.cuda.Event()]
        for _ in range(warmup):
            (a @ w1) @ w2
        times = []
        for _ in range(iters):
            ev[0].record()
            (a @ w1) @ w2
            ev[1].record()
            ev[1].synchronize()
            times.append(cupy.cuda.get_elapsed_time(*ev))
        return statistics.median(times), "cupy (cuBLAS, fp16 for bf16)"
    except ImportError:
        return None, None


def dense_tile(cfg, layer, warmup, iters):
    """The same GEMM pair with this package's tile GEMM (dense, no gather)."""
    from flashmoe_core.ops import tile_gemm_launch

    k = tile_gemm_launch(cfg.dtype)
    m, h, f = cfg.tokens * cfg.top_k, cfg.hidden, cfg.ffn
    z, ye = layer.buffer_ptr("z"), layer.buffer_ptr("y_expert")
    w1, w2 = layer.buffer_ptr("w_up"), layer.buffer_ptr("w_down")
    s = layer.stream

    def run():  # rows of y_expert stand in for A; only the shapes matter
        k.launch(s, ye, w1, z, m, f, h)
        k.launch(s, z, w2, ye, m, h, f)

    return time_events(s, run, warmup, iters)


def unfused(cfg, layer, warmup, iters):
    """Separate launches of this package's kernels (see the module docstring)."""
    from flashmoe_core.ops import tile_gemm_launch

    k = tile_gemm_launch(cfg.dtype)
    s, t = layer.stream, cfg.tokens
    item = np.dtype(cfg.storage_dtype).itemsize
    p = {n: layer.buffer_ptr(n) for n in ("x_stage", "row_token", "z", "y_expert", "w_up",
                                          "b_up", "w_down", "b_down", "expert_kept")}
    h, f = cfg.hidden, cfg.ffn

    def run():
        layer.launch_staged(t, "dispatch_only")
        kept = layer.workspace("expert_kept", (cfg.experts,), np.int32)  # host sync
        off = 0
        for e, n in enumerate(kept.tolist()):
            if n:
                k.launch(s, p["x_stage"], p["w_up"] + e * f * h * item, p["z"] + off * f * item,
                         n, f, h, a_index=p["row_token"] + off * 4,
                         bias=p["b_up"] + e * f * item, activation=cfg.activation)
                k.launch(s, p["z"] + off * f * item, p["w_down"] + e * h * f * item,
                         p["y_expert"] + off * h * item, n, h, f,
                         bias=p["b_down"] + e * h * item)
            off += n
        layer.launch_staged(t, "combine_only")

    return time_events(s, run, warmup, iters)


def torch_moe(cfg, weights, x_np, warmup, iters):
    """PyTorch's usual MoE forward (gate, topk, per-expert index ops)."""
    try:
        import torch
    except ImportError:
        return None
    dt = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = cfg.dtype == "tfloat32"
    cvt = lambda a: torch.from_numpy(np.asarray(a).astype(np.float32)).to("cuda", dt)  # noqa
    x, router = cvt(x_np), cvt(weights.router)
    w1, b1, w2, b2 = (cvt(getattr(weights, n)) for n in ("w1", "b1", "w2", "b2"))
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
           "silu": torch.nn.functional.silu}[cfg.activation]

    def run():
        probs = torch.softmax((x @ router).float(), dim=-1)
        w, idx = torch.topk(probs, cfg.top_k, dim=-1)
        if cfg.renormalize:
            w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x, dtype=torch.float32)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=cfg.experts).tolist()
        tok = order // cfg.top_k
        start = 0
        for e, n in enumerate(counts):
            if n:
                sel = order[start:start + n]
                rows = tok[start:start + n]
                hmid = act(x.index_select(0, rows) @ w1[e] + b1[e])
                ye = hmid @ w2[e] + b2[e]
                out.index_add_(0, rows, ye.float() * w.reshape(-1)[sel, None])
            start += n
        return out.to(dt)

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_row(dtype, tokens, experts, warmup, iters):
    from flashmoe_core import random_tokens
    from flashmoe_core.gpu_run import peak_tflops
    from flashmoe_core.layer import MoELayer

    cfg = make_config(dtype, tokens, experts)
    weights = bench_weights(cfg)
    x = random_tokens(cfg, 1)
    layer = MoELayer(cfg, weights)
    try:
        t = layer.stage(x)
        fused = time_events(layer.stream, lambda: layer.launch_staged(t), warmup, iters)
        layer.check_fault()
        flops = cfg.flops()
        row = {"dtype": dtype, "tokens": tokens, "experts": experts, "hidden": cfg.hidden,
               "ffn": cfg.ffn, "top_k": cfg.top_k, "grid": layer.grid,
               "fused_ms": fused, "fused_tflops": flops / fused / 1e9}
        peak = peak_tflops(layer.device.name, dtype)
        if peak:
            row["percent_of_peak"] = 100 * row["fused_tflops"] / peak
        row["dense_tile_ms"] = dense_tile(cfg, layer, warmup, iters)
        row["unfused_ms"] = unfused(cfg, layer, warmup, iters)
        layer.check_fault()
    finally:
        layer.close()
    cub, lib = dense_cublas(cfg, warmup, iters)
    if cub is not None:
        row["dense_cublas_ms"], row["dense_library"] = cub, lib
        row["fused_vs_dense"] = cub / fused  # >= 0.6 is the target: fused at 60% of dense rate
    row["fused_vs_dense_tile"] = row["dense_tile_ms"] / fused
    row["unfused_over_fused"] = row["unfused_ms"] / fused
    tm = torch_moe(cfg, weights, x, warmup, iters)
    if tm is not None:
        row["torch_ms"] = tm
        row["torch_over_fused"] = tm / fused
    return row


def plot(rows, out: Path) -> list:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    for dtype in sorted({r["dtype"] for r in rows}):
        for axis, fixed, other in (("tokens", "experts", 64), ("experts", "tokens", 16384)):
            sel = sorted((r for r in rows if r["dtype"] == dtype and r[fixed] == other),
                         key=lambda r: r[axis])
            if len(sel) < 2:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            xs = [r[axis] for r in sel]
            for key, label in (("fused_ms", "fused (this package)"), ("unfused_ms", "unfused, own kernels"),
                               ("torch_ms", "PyTorch MoE"), ("dense_cublas_ms", "dense GEMM (cuBLAS)")):
                ys = [r.get(key) for r in sel]
                if all(v is not None for v in ys):
                    ax.plot(xs, ys, marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel("ms (median of timed passes)")
            ax.set_title(f"{dtype}, hidden=ffn=2048, top-2, {fixed}={other}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
            name = f"latency-{dtype}-vs-{axis}.png"
            fig.tight_layout()
            fig.savefig(out / name, dpi=120)
            plt.close(fig)
            made.append(name)
    return made


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results/latest"))
    p.add_argument("--quick", action="store_true", help="a few rows only")
    p.add_argument("--dtypes", nargs="+", default=DTYPES, choices=["bfloat16", "float16",
                                                                   "tfloat32", "float32"])
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--iters", type=int, default=32)
    p.add_argument("--jobs", type=int, default=8, help="parallel kernel compiles up front")
    p.add_argument("--dry-run", action="store_true", help="print the sweep and exit")
    a = p.parse_args(argv)
    if a.warmup < 0 or a.iters < 1:
        p.error("--warmup >= 0 and --iters >= 1")
    rows = sweep(a.quick, a.dtypes)
    if a.dry_run:
        for r in rows:
            print(json.dumps(dict(zip(("dtype", "tokens", "experts"), r))))
        return 0
    from flashmoe_core.host.device import get_device
    from flashmoe_core.jit import target_arch

    dev = get_device()
    arch = target_arch(dev)
    a.out.mkdir(parents=True, exist_ok=True)
    precompile(rows, arch, a.jobs)
    results = []
    t0 = time.time()
    for dtype, tokens, experts in rows:
        try:
            r = bench_row(dtype, tokens, experts, a.warmup, a.iters)
        except Exception as exc:  # keep the sweep going; record what failed
            r = {"dtype": dtype, "tokens": tokens, "experts": experts,
                 "error": f"{type(exc).__name__}: {exc}"}
        results.append(r)
        print(json.dumps(r), flush=True)
    meta = {"device": dev.name, "arch": arch, "warmup": a.warmup, "iters": a.iters,
            "seconds": round(time.time() - t0, 1)}
    (a.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    meta["plots"] = plot([r for r in results if "error" not in r], a.out)
    (a.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    return 1 if any("error" in r for r in results) else 0


def precompile(rows, arch, jobs):
    """Compile every distinct kernel of the sweep in parallel before timing anything."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from flashmoe_core.kernels import moe_spec, tile_gemm_spec

    specs = {moe_spec(make_config(d, t, e)) for d, t, e in rows}
    specs |= {tile_gemm_spec(d) for d, _, _ in rows}
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_compile_one, [(s, arch) for s in specs]))


def _compile_one(args):
    from flashmoe_core.jit import compile_kernel

    spec, arch = args
    compile_kernel(spec, arch)


if __name__ == "__main__":
    sys.exit(main())
