"""The fused kernel's timeline: per-block task and phase records to Chrome/Perfetto JSON.

A layer built with ``trace_capacity > 0`` records, on every block, the span of each
phase (gate, top-k, scan, lists, headers, subscriber) and of each task (up, down,
combine, send, and the remote ones), plus the time spent waiting for a task to be
published. ``to_chrome`` turns those records into trace events that
chrome://tracing or ui.perfetto.dev open (one process per rank, one thread per
block); ``busy_fraction`` is the per-block share of the launch spent running tasks
and phases (the paper's "SM utilisation", measured instead of sampled).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

import numpy as np

from ..host.abi import TASK_KINDS, TRACE_PHASES, TRACE_RECORD

__all__ = ["label", "to_chrome", "busy_fraction", "phase_times", "write_chrome"]

_WAIT = 14


def label(what: int) -> str:
    """Name of a record: a phase, or a task kind with its index."""
    if what in TRACE_PHASES:
        return TRACE_PHASES[what]
    kind, index = what & 7, what >> 3
    return f"{TASK_KINDS.get(kind, f'kind {kind}')} #{index}"


def _as_records(records) -> np.ndarray:
    a = np.asarray(records)
    if a.dtype != TRACE_RECORD:
        raise ValueError(f"trace records must have dtype {TRACE_RECORD}, got {a.dtype}")
    return a


def to_chrome(records, rank: int = 0, origin_ns: int = None) -> List[dict]:
    """Chrome trace events ("X" complete events, microseconds) for one rank."""
    a = _as_records(records)
    if a.size == 0:
        return []
    origin = int(a["start_ns"].min()) if origin_ns is None else int(origin_ns)
    events = [{"name": "process_name", "ph": "M", "pid": rank,
               "args": {"name": f"rank {rank}"}}]
    for r in a:
        what = int(r["what"])
        events.append({
            "name": label(what),
            "cat": "wait" if what == _WAIT else ("phase" if what in TRACE_PHASES else "task"),
            "ph": "X",
            "pid": rank,
            "tid": int(r["block"]),
            "ts": (int(r["start_ns"]) - origin) / 1e3,
            "dur": max(int(r["end_ns"]) - int(r["start_ns"]), 0) / 1e3,
        })
    return events


def busy_fraction(records, blocks: int) -> Dict[str, float]:
    """Share of the launch span each block spent in tasks and phases (not waiting).

    Returns ``{"mean": ..., "min": ..., "max": ..., "span_us": ...}`` over ``blocks``
    blocks (blocks with no record count as idle).
    """
    a = _as_records(records)
    if a.size == 0 or blocks <= 0:
        return {"mean": 0.0, "min": 0.0, "max": 0.0, "span_us": 0.0}
    span = float(a["end_ns"].max() - a["start_ns"].min())
    busy = np.zeros(blocks)
    work = a[a["what"] != _WAIT]
    np.add.at(busy, np.minimum(work["block"], blocks - 1),
              (work["end_ns"] - work["start_ns"]).astype(np.float64))
    frac = busy / span if span > 0 else busy
    return {"mean": float(frac.mean()), "min": float(frac.min()), "max": float(frac.max()),
            "span_us": span / 1e3}


def phase_times(records) -> Dict[str, dict]:
    """Where a launch's time went, from its records.

    Returns ``{name: {"span_us", "busy_us", "count"}}``: for each phase (gate, top-k,
    ...) and each task kind (up, down, combine, ...), the wall-clock span from its
    first start to its last end over all blocks, the summed time of its records and
    how many there were; ``"wait for task"`` is the summed time blocks waited on the
    ring.
    """
    a = _as_records(records)
    out: Dict[str, dict] = {}
    kinds = np.where(np.isin(a["what"], list(TRACE_PHASES)), a["what"], a["what"] & 7)
    for k in np.unique(kinds):
        sel = a[kinds == k]
        name = TRACE_PHASES.get(int(k)) or TASK_KINDS.get(int(k), f"kind {int(k)}")
        dur = (sel["end_ns"] - sel["start_ns"]).astype(np.float64)
        out[name] = {"span_us": float(sel["end_ns"].max() - sel["start_ns"].min()) / 1e3,
                     "busy_us": float(dur.sum()) / 1e3, "count": int(sel.size)}
    return out


def write_chrome(path, per_rank: Sequence[np.ndarray]) -> Path:
    """Write every rank's records as one Chrome/Perfetto trace file (shared time origin)."""
    nonempty = [np.asarray(r) for r in per_rank if np.asarray(r).size]
    origin = min(int(r["start_ns"].min()) for r in nonempty) if nonempty else 0
    events: Iterable[dict] = []
    events = [e for rank, recs in enumerate(per_rank)
              for e in to_chrome(recs, rank, origin)]
    path = Path(path)
    path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ns"}))
    return path
