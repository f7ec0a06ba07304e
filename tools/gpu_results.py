"""Collect a GPU run's evidence into one results.json (called by tools/gpu_tier.sh).

The JSON names the GPU, driver and CUDA version, the commit and the git tree hash of
device/ (so stale evidence is visible), the GPU tier's pass/fail/skip counts and the
benchmark rows. Commit it as bench/results/<date>-<gpu>-<short commit>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return ""


def _gpu() -> dict:
    q = "name,driver_version,memory.total,clocks.max.sm"
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.splitlines()[0]
        name, driver, mem, clock = [v.strip() for v in line.split(",")]
    except Exception:
        return {}
    info = {"name": name, "driver": driver, "memory": mem, "max_sm_clock": clock}
    try:
        from cuda.bindings import driver as drv

        drv.cuInit(0)
        v = drv.cuDriverGetVersion()[1]
        info["cuda_driver_api"] = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:
        pass
    return info


def _junit(path: Path) -> dict:
    if not path.exists():
        return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "missing": True}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0))
    return {"passed": tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
            "failed": tot["failures"], "errors": tot["errors"], "skipped": tot["skipped"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--test-rc", type=int, default=None)
    p.add_argument("--bench-rc", type=int, default=None)
    p.add_argument("--commit", default="")
    p.add_argument("--device-tree", default="")
    a = p.parse_args()
    bench = a.out / "bench.json"
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": _gpu(),
        "commit": a.commit or _git("rev-parse", "HEAD"),
        "device_tree": a.device_tree or _git("rev-parse", "HEAD:device"),
        "gpu_tier": dict(_junit(a.out / "junit.xml"), exit_code=a.test_rc),
        "bench_exit_code": a.bench_rc,
        "bench": json.loads(bench.read_text()) if bench.exists() else None,
    }
    (a.out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("gpu", "commit", "device_tree", "gpu_tier")}))


if __name__ == "__main__":
    main()
