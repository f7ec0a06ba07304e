"""Benchmark the fused MoE kernel against its practical ceiling and two unfused baselines.

    python tools/bench.py --out bench/results/run1          # full sweep
    python tools/bench.py --out /tmp/b --quick              # a smoke run
    python tools/bench.py --dry-run                         # list the sweep, no GPU
    python tools/bench.py --out /tmp/b --row bfloat16:16384:64   # one row
    python tools/bench.py --out /tmp/b --training           # forward + backward rows

Sweeps tokens 128..16K (experts 64) and experts 8..256 (16K tokens) at hidden = ffn =
2048, top-2, bf16 and tf32, plus a gated (SwiGLU) row and a skewed-routing row, with
the FlashMoE paper's protocol: 32 warm-up and 32 timed passes, each timed with CUDA
events, median reported. Every row also times, on the same GPU in the same process:

  (a) dense: the same GEMMs as one dense pass (M = tokens * top_k rows through the up
      and down projections; gated rows up-project to 2 * ffn) - cuBLAS through
      PyTorch or CuPy when importable (TF32 for tf32 rows, labelled), and this
      package's own tile GEMM;
  (b) unfused: this package's kernels as separate launches - router + top-k + dispatch
      lists, one up and one down tile-GEMM launch per expert (gathering rows by
      index), combine - captured once into a CUDA graph for the row's routing and
      replayed, so no Python launch or host synchronisation is timed;
  (c) torch eager: PyTorch's MoE path (matmul, softmax, topk, index_select,
      index_add_) in eager mode, when torch is importable (never a dependency).

On Hopper (sm_90a) each forward row also times the same layer built for plain sm_90,
which has no wgmma and so runs the mma.sync mainloop of sm_80 builds
(``fused_mma_sync_ms``, ``wgmma_speedup``): the two mainloops side by side, in one run.

TFLOP/s count the router GEMM and the kept assignments' expert GEMMs only. Each row
also records where one traced pass spent its time (flashmoe_core.gpu.trace.phase_times).
Writes bench.json (rows + metadata) and PNG plots to --out.

Training rows (``--training``; default T=16K, H=F=2048, E=64, top-2, bf16, vanilla and
gated) time a saving forward plus its backward, the backward alone and the forward
alone, beside the dense GEMMs of equal FLOPs in the same run (the forward's two, or
three gated, and each one's two backward GEMMs: dX and dW), and record what a saved
forward keeps per token (with and without recompute) and the backward's scratch. The
target on an H100: forward + backward at >= 0.6x the dense rate (``train_vs_dense``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TOKENS = [128, 512, 2048, 8192, 16384]
EXPERTS = [8, 16, 32, 64, 128, 256]
DTYPES = ["bfloat16", "tfloat32"]
SKEW = 1.25  # skewed routing: expert e's share falls off like (1 + e) ** -SKEW


def sweep(quick: bool, dtypes):
    """Rows: a token sweep at 64 experts, an expert sweep at 16K tokens (vanilla MLP,
    balanced routing), then one gated row and one skewed-routing row (bf16)."""
    toks = [512, 16384] if quick else TOKENS
    exps = [8, 64] if quick else EXPERTS
    rows = []

    def row(d, t, e, mlp="vanilla", routing="balanced"):
        return {"dtype": d, "tokens": t, "experts": e, "mlp": mlp, "routing": routing}
    for d in dtypes:
        rows += [row(d, t, 64) for t in toks]
        rows += [row(d, 16384, e) for e in exps if e != 64]
    d = "bfloat16" if "bfloat16" in dtypes else dtypes[0]
    rows.append(row(d, 16384, 64, mlp="gated"))
    rows.append(row(d, 16384, 64, routing="skewed"))
    return rows


def training_sweep():
    """The training rows: the target shape, vanilla and gated."""
    return [{"dtype": "bfloat16", "tokens": 16384, "experts": 64, "mlp": mlp,
             "routing": "balanced", "pass": "training"} for mlp in ("vanilla", "gated")]


def parse_row(text: str) -> dict:
    """``DTYPE:TOKENS:EXPERTS[:MLP[:ROUTING]]`` -> a sweep row."""
    parts = text.split(":")
    if not 3 <= len(parts) <= 5:
        raise ValueError(f"--row {text!r}: expected DTYPE:TOKENS:EXPERTS[:MLP[:ROUTING]]")
    parts += ["vanilla", "balanced"][len(parts) - 3:]
    dtype, tokens, experts, mlp, routing = parts
    if dtype not in ("bfloat16", "float16", "tfloat32", "float32") or \
            mlp not in ("vanilla", "gated") or routing not in ("balanced", "skewed"):
        raise ValueError(f"--row {text!r}: dtype bfloat16|float16|tfloat32|float32, mlp "
                         "vanilla|gated, routing balanced|skewed")
    try:
        return {"dtype": dtype, "tokens": int(tokens), "experts": int(experts), "mlp": mlp,
                "routing": routing}
    except ValueError:
        raise ValueError(f"--row {text!r}: TOKENS and EXPERTS must be integers") from None


def make_config(dtype, tokens, experts, mlp="vanilla", hidden=2048, ffn=2048, top_k=2, **_):
    from flashmoe_core import MoEConfig

    return MoEConfig(tokens=tokens, hidden=hidden, ffn=ffn, experts=experts, top_k=top_k,
                     dtype=dtype, mlp=mlp, activation="silu" if mlp == "gated" else "relu")


def bench_weights(cfg, routing: str = "balanced", distinct: int = 4):
    """Random weights; experts repeat a few distinct matrices (timing does not depend on
    the values, and generating 256 distinct 2048x2048 pairs is slow). A full random
    router keeps the routing balanced as in a real layer; ``skewed`` adds a bias along
    hidden unit 0 (see :func:`bench_tokens`) so that expert e gets a share of tokens
    falling off like (1 + e) ** -SKEW."""
    from flashmoe_core import MoEWeights
    from flashmoe_core.numerics import round_to

    small = cfg.replace(experts=min(distinct, cfg.experts), top_k=1)
    base = MoEWeights.random(small, 0)
    rep = lambda a: np.ascontiguousarray(np.resize(a, (cfg.experts,) + a.shape[1:]))  # noqa
    rng = np.random.default_rng(0)
    router = rng.standard_normal((cfg.hidden, cfg.experts), dtype=np.float32) \
        / np.float32(np.sqrt(cfg.hidden))
    if routing == "skewed":
        router[0] = -SKEW * np.log1p(np.arange(cfg.experts, dtype=np.float32)) / 4.0
    router = round_to(router, cfg.dtype)
    if cfg.mlp == "gated":
        return MoEWeights(cfg, router=router, wg=rep(base.wg), wu=rep(base.wu),
                          w2=rep(base.w2))
    return MoEWeights(cfg, router=router, w1=rep(base.w1), b1=rep(base.b1), w2=rep(base.w2),
                      b2=rep(base.b2))


def bench_tokens(cfg, routing: str = "balanced"):
    """Random tokens; ``skewed`` sets hidden unit 0 to 4 (the router's skew bias)."""
    from flashmoe_core import random_tokens
    from flashmoe_core.numerics import round_to

    x = random_tokens(cfg, 1)
    if routing == "skewed":
        x = x.astype(np.float32)
        x[:, 0] = 4.0
        x = round_to(x, cfg.dtype)
    return x


def time_events(stream, fn, warmup, iters):
    from cuda.core import EventOptions

    for _ in range(warmup):
        fn()
    opts = EventOptions(timing_enabled=True)
    marks = []
    for _ in range(iters):
        a = stream.record(options=opts)
        fn()
        marks.append((a, stream.record(options=opts)))
    stream.sync()
    return statistics.median([(b - a) for a, b in marks])  # ms


def dense_cublas(cfg, warmup, iters):
    """cuBLAS GEMMs of the same shapes, through torch or CuPy; (ms, library)."""
    m, h, f = cfg.tokens * cfg.top_k, cfg.hidden, cfg.ffn
    fu = 2 * f if cfg.mlp == "gated" else f  # gated: Wg and Wu in one up GEMM
    try:
        import torch

        dt = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        torch.backends.cuda.matmul.allow_tf32 = cfg.dtype == "tfloat32"
        a = torch.randn(m, h, device="cuda", dtype=dt)
        w1 = torch.randn(h, fu, device="cuda", dtype=dt)
        w2 = torch.randn(f, h, device="cuda", dtype=dt)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(warmup):
            (a @ w1)[:, :f] @ w2
        times = []
        for _ in range(iters):
            start.record()
            (a @ w1)[:, :f] @ w2
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        mode = "TF32" if cfg.dtype == "tfloat32" else str(dt).split(".")[-1]
        return statistics.median(times), f"torch {torch.__version__} (cuBLAS, {mode})"
    except ImportError:
        pass
    try:
        import cupy

        dt = np.float32 if cfg.dtype in ("tfloat32", "float32") else np.float16
        a = cupy.random.standard_normal((m, h)).astype(dt)
        w1 = cupy.random.standard_normal((h, fu)).astype(dt)
        w2 = cupy.random.standard_normal((f, h)).astype(dt)
        ev = [cupy.cuda.Event(), cupy.cuda.Event()]
        for _ in range(warmup):
            (a @ w1)[:, :f] @ w2
        times = []
        for _ in range(iters):
            ev[0].record()
            (a @ w1)[:, :f] @ w2
            ev[1].record()
            ev[1].synchronize()
            times.append(cupy.cuda.get_elapsed_time(*ev))
        # CUPY_TF32 (set in main for tf32 sweeps) is read when CuPy loads.
        mode = ("TF32" if os.environ.get("CUPY_TF32") == "1" else "FP32") \
            if dt == np.float32 else "fp16 for bf16"
        return statistics.median(times), f"cupy (cuBLAS, {mode})"
    except ImportError:
        return None, None


def dense_tile(cfg, layer, stacked, warmup, iters):
    """The same GEMMs with this package's tile GEMM (dense, no gather)."""
    from flashmoe_core.gpu.ops import tile_gemm_launch

    k = tile_gemm_launch(cfg.dtype)
    m, h, f = cfg.tokens * cfg.top_k, cfg.hidden, cfg.ffn
    z, ye = layer.testing.buffer_ptr("z"), layer.testing.buffer_ptr("y_expert")
    w1 = stacked if cfg.mlp == "gated" else layer.testing.buffer_ptr("w_up")
    w2 = layer.testing.buffer_ptr("w_down")
    s = layer.stream
    gated = cfg.mlp == "gated"

    def run():  # rows of y_expert stand in for A; only the shapes matter
        k.launch(s, ye, w1, z, m, f, h, gated=gated)
        k.launch(s, z, w2, ye, m, h, f)

    return time_events(s, run, warmup, iters)


def stacked_up_weights(cfg, weights, layer):
    """Gated rows: [E, 2F, H] with Wg^T then Wu^T per expert, the B operand the tile
    GEMM's gated form takes (the fused kernel stacks them in shared memory instead)."""
    if cfg.mlp != "gated":
        return None
    from flashmoe_core.host import memory

    both = np.concatenate([weights.wg.transpose(0, 2, 1), weights.wu.transpose(0, 2, 1)], axis=1)
    buf = memory.upload(layer.device, np.ascontiguousarray(both), layer.stream)
    layer.stream.sync()
    return buf


def unfused(cfg, layer, stacked, warmup, iters):
    """Separate launches of this package's kernels (see the module docstring), captured
    into a CUDA graph for this routing and replayed."""
    from flashmoe_core.gpu.ops import tile_gemm_launch

    k = tile_gemm_launch(cfg.dtype)
    s, t = layer.stream, cfg.tokens
    item = np.dtype(cfg.storage_dtype).itemsize
    p = {n: layer.testing.buffer_ptr(n) for n in ("x_stage", "row_token", "z", "y_expert", "w_up",
                                          "w_down")}
    gated = cfg.mlp == "gated"
    if not gated:
        p.update(b_up=layer.testing.buffer_ptr("b_up"), b_down=layer.testing.buffer_ptr("b_down"))
    h, f = cfg.hidden, cfg.ffn
    # The per-expert row counts, read once outside the timing (an unfused pipeline
    # reads them every pass; a grouped GEMM would not need them on the host).
    layer.testing.launch(t, "dispatch_only")
    kept = layer.testing.workspace("expert_kept", (cfg.experts,), np.int32).tolist()
    gb = s.create_graph_builder()
    gb.begin_building()
    layer.testing.launch(t, "dispatch_only", stream=gb)
    off = 0
    for e, n in enumerate(kept):
        if n:
            w_up = stacked + e * 2 * f * h * item if gated else p["w_up"] + e * f * h * item
            k.launch(gb, p["x_stage"], w_up, p["z"] + off * f * item, n, f, h,
                     a_index=p["row_token"] + off * 4,
                     bias=0 if gated else p["b_up"] + e * f * item,
                     activation=cfg.activation, gated=gated)
            k.launch(gb, p["z"] + off * f * item, p["w_down"] + e * h * f * item,
                     p["y_expert"] + off * h * item, n, h, f,
                     bias=0 if gated else p["b_down"] + e * h * item)
        off += n
    layer.testing.launch(t, "combine_only", stream=gb)
    graph = gb.end_building().complete()
    return time_events(s, lambda: graph.launch(s), warmup, iters)


def torch_moe(cfg, weights, x_np, warmup, iters):
    """PyTorch's usual MoE forward in eager mode (gate, topk, per-expert index ops)."""
    try:
        import torch
    except ImportError:
        return None
    dt = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    torch.backends.cuda.matmul.allow_tf32 = cfg.dtype == "tfloat32"
    cvt = lambda a: torch.from_numpy(np.asarray(a).astype(np.float32)).to("cuda", dt)  # noqa
    x, router = cvt(x_np), cvt(weights.router)
    gated = cfg.mlp == "gated"
    names = ("wg", "wu", "w2") if gated else ("w1", "b1", "w2", "b2")
    w = {n: cvt(getattr(weights, n)) for n in names}
    act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu,
           "silu": torch.nn.functional.silu}[cfg.activation]

    def expert(e, xs):
        if gated:
            return (act(xs @ w["wg"][e]) * (xs @ w["wu"][e])) @ w["w2"][e]
        return act(xs @ w["w1"][e] + w["b1"][e]) @ w["w2"][e] + w["b2"][e]

    def run():
        probs = torch.softmax((x @ router).float(), dim=-1)
        wt, idx = torch.topk(probs, cfg.top_k, dim=-1)
        if cfg.renormalize:
            wt = wt / wt.sum(-1, keepdim=True)
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
                ye = expert(e, x.index_select(0, rows))
                out.index_add_(0, rows, ye.float() * wt.reshape(-1)[sel, None])
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


def traced_pass(cfg, weights, x):
    """Where one pass spent its time: phase and task-kind spans from the kernel's trace."""
    from flashmoe_core.gpu.layer import MoELayer
    from flashmoe_core.gpu.trace import busy_fraction, phase_times

    layer = MoELayer(cfg, weights, trace_capacity=1 << 20)
    try:
        t = layer.testing.stage(x)
        layer.testing.launch(t)
        layer.synchronize()
        records = layer.trace()
        return {"phases": phase_times(records), "busy": busy_fraction(records, layer.grid)}
    finally:
        layer.close()


MMA_SYNC_ARCH = "sm_90"
"""Hopper without the 'a' features: no wgmma, so the mma.sync mainloop (as sm_80)."""


def fused_time(cfg, weights, x, warmup, iters, arch=None):
    """Median fused-pass time of a layer built for ``arch`` (None: the GPU's own)."""
    from flashmoe_core.gpu.layer import MoELayer

    saved = os.environ.get("FLASHMOE_ARCH")
    if arch is not None:
        os.environ["FLASHMOE_ARCH"] = arch
    try:
        layer = MoELayer(cfg, weights)
    finally:
        if arch is not None:
            if saved is None:
                os.environ.pop("FLASHMOE_ARCH", None)
            else:
                os.environ["FLASHMOE_ARCH"] = saved
    try:
        t = layer.testing.stage(x)
        ms = time_events(layer.stream, lambda: layer.testing.launch(t), warmup, iters)
        layer.check_fault()
        return ms
    finally:
        layer.close()


def bench_row(spec, warmup, iters, arch=None):
    from flashmoe_core.cli.gpu_run import peak_tflops
    from flashmoe_core.gpu.layer import MoELayer

    cfg = make_config(**spec)
    weights = bench_weights(cfg, spec["routing"])
    x = bench_tokens(cfg, spec["routing"])
    layer = MoELayer(cfg, weights)
    stacked = None
    try:
        t = layer.testing.stage(x)
        fused = time_events(layer.stream, lambda: layer.testing.launch(t), warmup, iters)
        layer.check_fault()
        routing = layer.routing(t)
        load = np.bincount(routing.experts[routing.kept], minlength=cfg.experts)
        flops = cfg.flops(t, kept=int(routing.kept.sum()))
        row = dict(spec, hidden=cfg.hidden, ffn=cfg.ffn, top_k=cfg.top_k, grid=layer.grid,
                   fused_ms=fused, fused_tflops=flops / fused / 1e9,
                   expert_load_max_over_mean=float(load.max() / max(load.mean(), 1e-9)))
        peak = peak_tflops(layer.device.name, cfg.dtype)
        if peak:
            row["percent_of_peak"] = 100 * row["fused_tflops"] / peak
        buf = stacked_up_weights(cfg, weights, layer)
        stacked = 0 if buf is None else int(buf.handle)
        row["dense_tile_ms"] = dense_tile(cfg, layer, stacked, warmup, iters)
        row["unfused_ms"] = unfused(cfg, layer, stacked, warmup, iters)
        layer.check_fault()
    finally:
        if stacked:
            buf.close()
        layer.close()
    row["trace"] = traced_pass(cfg, weights, x)
    if arch == "sm_90a" and cfg.dtype in ("bfloat16", "float16"):
        try:  # a kit may hold the sm_90a kernels only: the row stands without this
            row["fused_mma_sync_ms"] = fused_time(cfg, weights, x, warmup, iters,
                                                  MMA_SYNC_ARCH)
            row["wgmma_speedup"] = row["fused_mma_sync_ms"] / fused
        except Exception as exc:  # noqa: BLE001
            row["fused_mma_sync_error"] = f"{type(exc).__name__}: {exc}"
    cub, lib = dense_cublas(cfg, warmup, iters)
    if cub is not None:
        row["dense_cublas_ms"], row["dense_library"] = cub, lib
        row["fused_vs_dense"] = cub / fused  # >= 0.6 is the target: fused at 60% of dense rate
    row["fused_vs_dense_tile"] = row["dense_tile_ms"] / fused
    row["unfused_over_fused"] = row["unfused_ms"] / fused
    tm = torch_moe(cfg, weights, x, warmup, iters)
    if tm is not None:
        row["torch_eager_ms"] = tm
        row["torch_eager_over_fused"] = tm / fused
    return row


def dense_training_cublas(cfg, warmup, iters):
    """Dense forward + backward GEMMs of the expert FLOPs (M = tokens * top_k rows):
    up and down projections and, for each, dX and dW; through torch or CuPy. (ms, lib)."""
    m, h, f = cfg.tokens * cfg.top_k, cfg.hidden, cfg.ffn
    fu = 2 * f if cfg.mlp == "gated" else f
    try:
        import torch

        dt = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        torch.backends.cuda.matmul.allow_tf32 = cfg.dtype == "tfloat32"
        mk = lambda *s: torch.randn(*s, device="cuda", dtype=dt)  # noqa: E731
        xx, w1, w2, dy, dzu = mk(m, h), mk(h, fu), mk(f, h), mk(m, h), mk(m, fu)

        def run():
            z = (xx @ w1)[:, :f]           # forward
            z @ w2
            dz = dy @ w2.t()               # backward of the down projection
            z.t() @ dy
            dzu @ w1.t()                   # backward of the up projection
            xx.t() @ dzu
            return dz
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
        return statistics.median(times), f"torch {torch.__version__} (cuBLAS)"
    except ImportError:
        pass
    try:
        import cupy

        dt = np.float32 if cfg.dtype in ("tfloat32", "float32") else np.float16
        mk = lambda *s: cupy.random.standard_normal(s).astype(dt)  # noqa: E731
        xx, w1, w2, dy, dzu = mk(m, h), mk(h, fu), mk(f, h), mk(m, h), mk(m, fu)

        def run():
            z = (xx @ w1)[:, :f]
            z @ w2
            dy @ w2.T
            z.T @ dy
            dzu @ w1.T
            xx.T @ dzu
        ev = [cupy.cuda.Event(), cupy.cuda.Event()]
        for _ in range(warmup):
            run()
        times = []
        for _ in range(iters):
            ev[0].record()
            run()
            ev[1].record()
            ev[1].synchronize()
            times.append(cupy.cuda.get_elapsed_time(*ev))
        return statistics.median(times), "cupy (cuBLAS)"
    except ImportError:
        return None, None


def bench_training_row(spec, warmup, iters):
    """Forward + backward, backward only and forward only of one layer; memory kept."""
    from flashmoe_core.kernel.training import saved_bytes_per_token
    from flashmoe_core.gpu.layer import MoELayer
    from flashmoe_core.numerics import round_to
    from flashmoe_core.kernel.plan import plan_backward

    cfg = make_config(**spec)
    weights = bench_weights(cfg, spec["routing"])
    x = bench_tokens(cfg, spec["routing"])
    rng = np.random.default_rng(2)
    dy = round_to(rng.standard_normal(x.shape, dtype=np.float32) * np.float32(1e-3), cfg.dtype)
    layer = MoELayer(cfg, weights)
    try:
        fwd, bwd = layer.testing.training_launches(x, dy)
        s = layer.stream
        train_ms = time_events(s, lambda: (fwd(), bwd()), warmup, iters)
        bwd_ms = time_events(s, bwd, warmup, iters)
        fwd_ms = time_events(s, fwd, warmup, iters)
        layer.synchronize()
        routing = layer.routing(x.shape[0])
        flops = 3 * cfg.flops(x.shape[0], kept=int(routing.kept.sum()))  # fwd + 2x bwd
        row = dict(spec, hidden=cfg.hidden, ffn=cfg.ffn, top_k=cfg.top_k,
                   train_ms=train_ms, backward_ms=bwd_ms, forward_saving_ms=fwd_ms,
                   train_tflops=flops / train_ms / 1e9,
                   backward_tflops=(flops * 2 / 3) / bwd_ms / 1e9,
                   saved_bytes_per_token=saved_bytes_per_token(cfg),
                   saved_bytes_per_token_recompute=saved_bytes_per_token(cfg, recompute=True),
                   backward_scratch_bytes_per_token=(
                       sum(plan_backward(cfg).workspace.values()) / cfg.tokens),
                   backward_weight_bytes=sum(plan_backward(cfg).weights.values()),
                   backward_grid=layer._bw.grid)
    finally:
        layer.close()
    dense, lib = dense_training_cublas(cfg, warmup, iters)
    if dense is not None:
        row["dense_train_ms"], row["dense_library"] = dense, lib
        row["train_vs_dense"] = dense / train_ms  # >= 0.6 is the target on an H100
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
            sel = sorted((r for r in rows if r["dtype"] == dtype and r[fixed] == other
                          and r.get("mlp", "vanilla") == "vanilla"
                          and r.get("routing", "balanced") == "balanced"),
                         key=lambda r: r[axis])
            if len(sel) < 2:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            xs = [r[axis] for r in sel]
            for key, label in (("fused_ms", "fused (this package)"), ("unfused_ms", "unfused, own kernels"),
                               ("torch_eager_ms", "PyTorch MoE (eager)"),
                               ("dense_cublas_ms", "dense GEMM (cuBLAS)")):
                ys = [r.get(key) for r in sel]
                if all(v is not None for v in ys):
                    ax.plot(xs, ys, marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_ylabel("ms (median of timed passes; unfused as a CUDA graph)")
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
    p.add_argument("--row", action="append", default=[],
                   metavar="DTYPE:TOKENS:EXPERTS[:MLP[:ROUTING]]",
                   help="time only these rows (repeatable), e.g. bfloat16:16384:64")
    p.add_argument("--training", action="store_true",
                   help="time forward + backward rows (the training sweep, or the --row rows)")
    p.add_argument("--dry-run", action="store_true", help="print the sweep and exit")
    a = p.parse_args(argv)
    if a.warmup < 0 or a.iters < 1:
        p.error("--warmup >= 0 and --iters >= 1")
    try:
        rows = [parse_row(r) for r in a.row] if a.row else \
            (training_sweep() if a.training else sweep(a.quick, a.dtypes))
    except ValueError as exc:
        p.error(str(exc))
    if a.training:
        rows = [dict(r, **{"pass": "training"}) for r in rows]
    if a.dry_run:
        for r in rows:
            print(json.dumps(r))
        return 0
    if "tfloat32" in a.dtypes:
        os.environ.setdefault("CUPY_TF32", "1")  # CuPy's float32 GEMMs as TF32 (read at import)
    from flashmoe_core.host.device import get_device
    from flashmoe_core.kernel.jit import target_arch

    dev = get_device()
    arch = target_arch(dev)
    a.out.mkdir(parents=True, exist_ok=True)
    from flashmoe_core import env

    if env.kernel_kit() is None:  # a kit holds them already; nothing compiles then
        precompile(rows, arch, a.jobs)
        if arch == "sm_90a":  # the mma.sync side of each forward row
            precompile([r for r in rows if r.get("pass") != "training"], MMA_SYNC_ARCH, a.jobs)
    results = []
    t0 = time.time()
    for spec in rows:
        try:
            if spec.get("pass") == "training":
                r = bench_training_row(spec, a.warmup, a.iters)
            else:
                r = bench_row(spec, a.warmup, a.iters, arch)
        except Exception as exc:  # keep the sweep going; record what failed
            r = dict(spec, error=f"{type(exc).__name__}: {exc}")
        results.append(r)
        print(json.dumps(r), flush=True)
    meta = {"device": dev.name, "arch": arch, "warmup": a.warmup, "iters": a.iters,
            "seconds": round(time.time() - t0, 1),
            "baselines": {"unfused": "own kernels, one CUDA graph per row",
                          "torch_eager": "PyTorch eager MoE loop",
                          "dense": "cuBLAS GEMMs of the same shapes (see dense_library)"},
            "flops": "router + expert GEMMs of kept assignments"}
    (a.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    meta["plots"] = plot([r for r in results if "error" not in r and "pass" not in r], a.out)
    (a.out / "bench.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    return 1 if any("error" in r for r in results) else 0


def precompile(rows, arch, jobs):
    """Compile every distinct kernel of the sweep in parallel before timing anything."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp

    from flashmoe_core.kernel.specs import moe_backward_spec, moe_spec, tile_gemm_spec

    specs = {moe_spec(make_config(**r)) for r in rows}
    specs |= {moe_backward_spec(make_config(**r)) for r in rows if r.get("pass") == "training"}
    specs |= {tile_gemm_spec(r["dtype"]) for r in rows}
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=mp.get_context("spawn")) as ex:
        list(ex.map(_compile_one, [(s, arch) for s in specs]))


def _compile_one(args):
    from flashmoe_core.kernel.jit import compile_kernel

    spec, arch = args
    compile_kernel(spec, arch)


if __name__ == "__main__":
    sys.exit(main())
