"""Timing and checking the GPU layer (the GPU backend of ``flashmoe_core.run``).

Timing follows the FlashMoE paper's protocol: warm-up passes, then timed passes,
each timed on its own with CUDA events; the median is reported.
"""

from __future__ import annotations

import statistics
from typing import Dict, List, Optional

import numpy as np

from ..config import MoEConfig
from ..oracle.reference import Routing, gate, moe_forward
from ..weights import MoEWeights, random_tokens

__all__ = ["PEAK_TFLOPS", "peak_tflops", "time_layer", "compare", "run_benchmark", "TOLERANCE"]

# Dense tensor-core peaks (TFLOP/s) by element type. float32 runs as 3xTF32 on the TF32
# tensor cores, so its useful-FLOP peak is quoted against TF32.
PEAK_TFLOPS: Dict[str, Dict[str, float]] = {
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0, "tfloat32": 378.0, "float32": 378.0},
    "H100": {"bfloat16": 989.4, "float16": 989.4, "tfloat32": 494.7, "float32": 494.7},
    "H200": {"bfloat16": 989.4, "float16": 989.4, "tfloat32": 494.7, "float32": 494.7},
    "H800": {"bfloat16": 989.4, "float16": 989.4, "tfloat32": 494.7, "float32": 494.7},
    "H20": {"bfloat16": 148.0, "float16": 148.0, "tfloat32": 74.0, "float32": 74.0},
    "A100": {"bfloat16": 312.0, "float16": 312.0, "tfloat32": 156.0, "float32": 156.0},
}

# Relative Frobenius error bounds against the oracle on identical routing.
TOLERANCE = {"bfloat16": 1e-2, "float16": 1e-2, "tfloat32": 5e-3, "float32": 1e-5}


def peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    """Dense tensor peak of a GPU by name (None if unknown)."""
    for key in PEAK_TFLOPS:  # ordered: "H100 PCIe" before "H100"
        if key in device_name:
            return PEAK_TFLOPS[key][dtype]
    return None


def time_layer(layer, tokens: int, warmup: int, iters: int) -> List[float]:
    """Per-pass seconds of ``iters`` launches after ``warmup`` (staged input)."""
    from cuda.core import EventOptions

    s = layer.stream
    for _ in range(warmup):
        layer.testing.launch(tokens)
    opts = EventOptions(timing_enabled=True)
    marks = []
    for _ in range(iters):
        start = s.record(options=opts)
        layer.testing.launch(tokens)
        marks.append((start, s.record(options=opts)))
    layer.synchronize()
    return [(end - start) / 1e3 for start, end in marks]


def compare(cfg: MoEConfig, weights: MoEWeights, x: np.ndarray, y: np.ndarray,
            routing: Routing) -> dict:
    """GPU output vs the oracle on the kernel's own routing, and routing agreement.

    Non-finite elements must match exactly (NaN for NaN, an infinity of the same sign,
    counted in ``nonfinite_mismatches``); the relative error is taken over the rest.
    """
    y_ref, _ = moe_forward(cfg, weights, x, routing)
    a, b = y.astype(np.float64), y_ref.astype(np.float64)
    same_kind = (np.isnan(a) == np.isnan(b)) & (np.isinf(a) == np.isinf(b)) & \
        (~np.isinf(a) | (a == b))
    both = np.isfinite(a) & np.isfinite(b)
    a, b = np.where(both, a, 0.0), np.where(both, b, 0.0)
    rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
    _, probs = gate(cfg, weights, x)
    _, own = moe_forward(cfg, weights, x)
    same = routing.experts == own.experts
    agree = float(same.mean())
    # Where the choices differ, how far apart were the two experts' probabilities?
    diff = np.nonzero(~same)
    gaps = np.abs(probs[diff[0], routing.experts[diff]] - probs[diff[0], own.experts[diff]])
    return {
        "rel_error": rel,
        "tolerance": TOLERANCE[cfg.dtype],
        "routing_agreement": agree,
        "routing_mismatches": int((~same).sum()),
        "max_prob_gap_at_mismatch": float(gaps.max()) if gaps.size else 0.0,
        "nonfinite_mismatches": int((~same_kind).sum()),
        "passed": bool(rel <= TOLERANCE[cfg.dtype] and agree >= 0.999 and same_kind.all()),
    }


def run_benchmark(cfg: MoEConfig, seed: int = 0, warmup: int = 32, iters: int = 32,
                  check: bool = False, comm=None, verbose: bool = False) -> dict:
    """Build a layer with random weights (this rank's experts), time it, and optionally
    check it against the oracle. Under MPI every rank runs one PE; rank 0 reports."""
    import sys

    from ..gpu.layer import MoELayer

    rank = 0 if comm is None else comm.Get_rank()
    multi = comm is not None and comm.Get_size() > 1
    ids = cfg.local_experts(rank) if multi else None
    w = MoEWeights.random(cfg, seed, expert_ids=ids)
    x = random_tokens(cfg, seed, rank=rank)
    layer = MoELayer(cfg, w, comm=comm if multi else None)
    try:
        if verbose and rank == 0:
            print(f"flashmoe_core: {layer.device.name}, {layer.arch}, grid {layer.grid} "
                  f"({layer.blocks_per_sm}/SM), {layer.smem} B smem/block\n"
                  f"{layer.describe()}", file=sys.stderr)
        t = layer.testing.stage(x)
        if multi:
            comm.Barrier()
        times = time_layer(layer, t, warmup, iters)
        if multi:  # a pass ends when its slowest rank does
            times = list(np.max(np.array(comm.allgather(times)), axis=0))
        result = {"backend": "gpu", "times_s": times, "device": layer.device.name,
                  "arch": layer.arch, "grid": layer.grid}
        peak = peak_tflops(layer.device.name, cfg.dtype)
        if peak is not None:
            med = statistics.median(times)
            result["peak_tflops"] = peak
            result["percent_of_peak"] = 100.0 * cfg.flops(t) / med / 1e12 / peak
        if check:
            layer.testing.launch(t)
            y = layer.testing.output(t)
            routing = layer.routing(t)
            if multi:
                ys, rs = comm.gather(y, root=0), comm.gather(routing, root=0)
            else:
                ys, rs = [y], [routing]
            if rank == 0:
                full = MoEWeights.random(cfg, seed) if multi else w
                xs = np.concatenate([random_tokens(cfg, seed, rank=r)
                                     for r in range(cfg.world_size)])
                routing_all = Routing(*(np.concatenate([getattr(r, f) for r in rs])
                                        for f in Routing._fields))
                cmp = compare(cfg, full, xs, np.concatenate(ys), routing_all)
                result["dropped_assignments"] = int(routing_all.kept.size -
                                                    routing_all.kept.sum())
                result["check"] = {"what": f"vs oracle on the kernel's routing: rel error "
                                           f"{cmp['rel_error']:.2e} (<= {cmp['tolerance']:.0e}), "
                                           f"routing agreement {cmp['routing_agreement']:.4%}",
                                   "passed": cmp["passed"], **cmp}
        return result
    finally:
        layer.close()
