"""Turn a GPU check's OUT folder into the record committed under bench/results/.

    python tools/gpu_results.py OUT                 # writes bench/results/<name>.json
    python tools/gpu_results.py OUT --dest DIR --print

The record keeps what tools/gpu_check.py wrote to OUT/results.json (GPU, driver,
versions, per-stage status, bounds, seconds and figures, kit misses) and states
what it is about at the top: the GPU, its driver, the commit and the git tree hash of
device/ the kernels were built from, and the date. The device/ hash comes from the
kit's provenance (the GPU machine's copy has no .git); the GPU machine's own digest
of its device sources must equal the kit's, or the record says the kernels did not
match the commit. Named <date>-<gpu>-<short commit>.json.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def summarize(results: dict) -> dict:
    """The committed record: identity first, then every stage."""
    env = results.get("stages", {}).get("env", {})
    prov = results.get("provenance") or {}
    kit = env.get("kit") or {}
    gpu = results.get("gpu") or env.get("gpu") or {}
    stages = results.get("stages", {})
    return {
        "schema": "flashmoe-gpu-record/1",
        "date": results.get("started"),
        "gpu": gpu.get("name"),
        "driver": gpu.get("driver"),
        "cuda_driver_api": gpu.get("cuda_driver_api"),
        "commit": prov.get("commit"),
        "device_tree": prov.get("device_tree"),
        "tree_dirty": prov.get("dirty"),
        "kernels_match_commit": bool(kit.get("digest_matches")) and not prov.get(
            "dirty_device", True),
        "summary": {name: s.get("status") for name, s in stages.items()},
        "passed": bool(stages) and all(s.get("status") in ("pass", "skip")
                                       for s in stages.values()),
        "kit_misses": len(results.get("kit_misses") or []),
        "elapsed_s": results.get("elapsed_s"),
        "check": results,
    }


def record_name(rec: dict) -> str:
    date = (rec.get("date") or "undated")[:10]
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", rec.get("gpu") or "no-gpu").strip("-").lower()
    return f"{date}-{gpu}-{(rec.get('commit') or 'nocommit')[:8]}.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path, help="the OUT folder of tools/gpu_check.sh")
    p.add_argument("--dest", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--print", action="store_true", help="also print the summary")
    a = p.parse_args(argv)
    try:
        results = json.loads((a.out / "results.json").read_text())
    except (OSError, ValueError) as exc:
        print(f"error: {a.out / 'results.json'}: {exc}", file=sys.stderr)
        return 2
    if not isinstance(results, dict) or "stages" not in results:
        print(f"error: {a.out / 'results.json'} is not a GPU check's results", file=sys.stderr)
        return 2
    rec = summarize(results)
    a.dest.mkdir(parents=True, exist_ok=True)
    path = a.dest / record_name(rec)
    path.write_text(json.dumps(rec, indent=1, sort_keys=False) + "\n")
    head = {k: rec[k] for k in ("gpu", "driver", "commit", "device_tree", "passed",
                                "kernels_match_commit", "summary", "kit_misses")}
    print(json.dumps(head, indent=1) if a.print else str(path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
