"""The benchmark and GPU-evidence tools, on what they can do without a GPU."""

import json
import subprocess
import sys

from conftest import REPO


def test_bench_dry_run_lists_the_sweep():
    p = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--dry-run"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert {r["dtype"] for r in rows} == {"bfloat16", "tfloat32"}
    bf = [r for r in rows if r["dtype"] == "bfloat16" and r["mlp"] == "vanilla"
          and r["routing"] == "balanced"]
    assert sorted(r["tokens"] for r in bf if r["experts"] == 64) == [128, 512, 2048, 8192, 16384]
    assert sorted(r["experts"] for r in bf if r["tokens"] == 16384) == [8, 16, 32, 64, 128, 256]
    assert len(bf) == len({(r["tokens"], r["experts"]) for r in bf})
    extra = [(r["mlp"], r["routing"]) for r in rows if r not in bf and r["dtype"] == "bfloat16"]
    assert sorted(extra) == [("gated", "balanced"), ("vanilla", "skewed")]


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench", REPO / "tools" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_skewed_routing_is_skewed_and_balanced_is_not():
    import numpy as np

    from flashmoe_core.oracle.reference import moe_forward

    bench = _bench_module()
    cfg = bench.make_config("bfloat16", 2048, 16, hidden=128, ffn=64)
    share = {}
    for routing in ("balanced", "skewed"):
        _, r = moe_forward(cfg, bench.bench_weights(cfg, routing), bench.bench_tokens(cfg, routing))
        load = np.bincount(r.experts.ravel(), minlength=cfg.experts) / r.experts.size
        share[routing] = load
    assert share["balanced"].max() < 2.5 / cfg.experts
    assert share["skewed"][0] > 4 * share["skewed"][-1] and share["skewed"].max() > 0.15


def test_bench_gated_rows_get_gated_weights():
    bench = _bench_module()
    cfg = bench.make_config("bfloat16", 256, 8, mlp="gated", hidden=64, ffn=64)
    w = bench.bench_weights(cfg)
    assert cfg.activation == "silu" and w.wg.shape == w.wu.shape == (8, 64, 64)


def test_bench_rejects_bad_arguments():
    p = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--iters", "0",
                        "--dry-run"], capture_output=True, text=True)
    assert p.returncode == 2 and "--iters >= 1" in p.stderr


def test_bench_ep_dry_run_and_weak_scaling(tmp_path):
    p = subprocess.run([sys.executable, str(REPO / "tools" / "bench_ep.py"), "--dry-run"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert {r["experts"] for r in rows if r["tokens_per_pe"] == 16384} == {8, 16, 32, 64, 128}
    runs = []
    for world, ms in ((2, 3.33), (4, 3.43), (8, 3.70)):
        f = tmp_path / f"w{world}.json"
        f.write_text(json.dumps({"world": world, "rows": [
            {"tokens": 8192, "experts": 32, "fused_ms": ms}]}))
        runs.append(str(f))
    p = subprocess.run([sys.executable, str(REPO / "tools" / "bench_ep.py"), "--summarize",
                        *runs], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    eff = {r["world"]: r["weak_scaling_efficiency"] for r in json.loads(p.stdout)}
    assert eff[2] == 1.0 and abs(eff[8] - 3.33 / 3.70) < 1e-12


def test_bench_training_rows_are_listed():
    p = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--dry-run",
                        "--training"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(l) for l in p.stdout.splitlines()]
    assert [(r["mlp"], r["tokens"], r["experts"], r["pass"]) for r in rows] == \
        [("vanilla", 16384, 64, "training"), ("gated", 16384, 64, "training")]
    p = subprocess.run([sys.executable, str(REPO / "tools" / "bench.py"), "--dry-run",
                        "--training", "--row", "float16:512:8"], capture_output=True, text=True)
    assert [json.loads(l)["pass"] for l in p.stdout.splitlines()] == ["training"]
