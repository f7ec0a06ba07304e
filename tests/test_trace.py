"""Trace export and utilisation from kernel timeline records (CPU tier)."""

import json

import numpy as np
import pytest

from flashmoe_core.host.abi import TRACE_RECORD
from flashmoe_core.gpu.trace import busy_fraction, label, to_chrome, write_chrome


def records(rows):
    a = np.zeros(len(rows), TRACE_RECORD)
    for i, (start, end, block, what) in enumerate(rows):
        a[i] = (start, end, block, what)
    return a


def test_labels():
    assert label(8) == "gate" and label(14) == "wait for task"
    assert label((5 << 3) | 0) == "up #5" and label((2 << 3) | 5) == "down (remote) #2"


def test_chrome_events():
    a = records([(1000, 3000, 0, 8), (3000, 7000, 1, (4 << 3) | 1), (7000, 8000, 1, 14)])
    ev = to_chrome(a, rank=2)
    assert ev[0]["ph"] == "M" and ev[0]["pid"] == 2
    x = ev[1:]
    assert [e["name"] for e in x] == ["gate", "down #4", "wait for task"]
    assert x[0]["ts"] == 0.0 and x[0]["dur"] == 2.0 and x[1]["tid"] == 1
    assert [e["cat"] for e in x] == ["phase", "task", "wait"]


def test_busy_fraction_excludes_waits_and_counts_idle_blocks():
    a = records([(0, 100, 0, 8), (100, 1000, 0, 1 << 3), (0, 500, 1, 14), (500, 1000, 1, 2)])
    b = busy_fraction(a, blocks=3)
    assert b["span_us"] == 1.0
    assert b["max"] == 1.0 and b["min"] == 0.0
    assert b["mean"] == pytest.approx((1.0 + 0.5 + 0.0) / 3)


def test_write_chrome_shares_one_origin(tmp_path):
    r0 = records([(5000, 6000, 0, 8)])
    r1 = records([(2000, 9000, 3, 9)])
    p = write_chrome(tmp_path / "t.json", [r0, r1])
    data = json.loads(p.read_text())
    xs = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert {(e["pid"], e["ts"]) for e in xs} == {(0, 3.0), (1, 0.0)}


def test_wrong_dtype_is_rejected():
    with pytest.raises(ValueError, match="dtype"):
        to_chrome(np.zeros(3))
