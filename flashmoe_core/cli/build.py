"""Compile kernels ahead of time (no GPU needed): into the cache, or into a kit.

    python -m flashmoe_core.build --arch sm_90a --tokens 8192 --experts 64
    python -m flashmoe_core.build --arch sm_90a --tokens 8192 --experts 64 --training
    python -m flashmoe_core.build --arch sm_80 --kernels tests
    python -m flashmoe_core.build --arch sm_90a --kit DIR --tokens 8192 --experts 64
    python -m flashmoe_core.build --arch sm_90a --for-check DIR [--requests FILE]
    python -m flashmoe_core.build --arch sm_90a --report --tokens 16384 --experts 64

A deployment can then run with FLASHMOE_DISABLE_JIT=1 and never compile. A kit
(:mod:`flashmoe_core.host.kit`) is a folder of compressed cubins that another machine
loads as it is with FLASHMOE_KERNEL_KIT=DIR, whatever NVRTC or CUTLASS it has;
``--for-check`` builds the kit of the short GPU check (:mod:`flashmoe_core.cli.gpucheck`),
``--requests`` adds the kernels of a listing (``pytest --list-kernels FILE``).
``--report`` prints what the configuration's kernel looks like per arch (registers,
spills, shared memory, blocks per SM, the SASS of its mainloops; tasks, padding and
the roofline of the layer): :mod:`flashmoe_core.cli.report`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence

from .. import env
from . import add_config_args, config_from_args, error_line, exit_code
from .gpucheck import Request, all_requests, load_requests
from ..host.compiler import normalize_arch
from ..host.errors import FlashMoEError
from ..host.kit import KitWriter
from ..host.toolchain import device_tree_digest
from ..kernel.jit import compile_kernel, kernel_cache, toolchain
from ..kernel.specs import test_specs

__all__ = ["main", "build_kit"]


def _config_requests(which: str, args) -> List[Request]:
    reqs = []
    if which in ("moe", "all"):
        from ..kernel.specs import moe_specs

        reqs += [Request(s, origins=("config",))
                 for s in moe_specs(config_from_args(args), training=args.training)]
    if which in ("tests", "all"):
        reqs += [Request(s, origins=("tests",)) for s in test_specs()]
    return reqs


def _compile_one(job):
    spec, arch, lineinfo = job
    t0 = time.perf_counter()
    k = compile_kernel(spec, arch, lineinfo=lineinfo)
    return k.key, k.cubin, k.cached, time.perf_counter() - t0


def _git(*args: str) -> str:
    here = Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance() -> dict:
    """Commit, device/ tree hash and whether either was dirty (empty outside a checkout)."""
    return {"commit": _git("rev-parse", "HEAD"),
            "device_tree": _git("rev-parse", "HEAD:device"),
            "dirty_device": bool(_git("status", "--porcelain", "--", "device")),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no"))}


def _run_jobs(jobs: Sequence[tuple], workers: int):
    """Compile (or fetch from the local cache) every job; yields (job, result)."""
    if workers <= 1 or len(jobs) <= 1:
        for j in jobs:
            yield j, _compile_one(j)
        return
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futures = [(j, ex.submit(_compile_one, j)) for j in jobs]
        for j, f in futures:
            yield j, f.result()


def build_kit(dest, requests: Sequence[Request], archs: Sequence[str], workers: int = 1,
              say=print):
    """Compile ``requests`` for every arch (through the local cache) into a kit at ``dest``.

    Returns
    -------
    KernelKit
        The finished kit (``dest`` is replaced only once every kernel built).
    """
    if env.kernel_kit() is not None:
        raise FlashMoEError("FLASHMOE_KERNEL_KIT is set: a kit is built with the local tool "
                            "chain, not from another kit; unset it")
    tc = toolchain()
    writer = KitWriter(dest, tc.versions, device_tree_digest(tc.device_root), provenance())
    jobs = [(r.spec, a, r.lineinfo) for a in archs for r in requests]
    origins = {(r.spec, r.lineinfo): r.origins for r in requests}
    try:
        for (spec, arch, lineinfo), (key, cubin, cached, secs) in _run_jobs(jobs, workers):
            writer.add(key, cubin, entry=spec.entry, arch=arch, lineinfo=lineinfo,
                       label=spec.label, defines=dict(spec.defines), nvshmem=spec.nvshmem,
                       origins=origins[(spec, lineinfo)])
            how = "cached" if cached else f"compiled in {secs:.1f} s"
            say(f"{arch} {spec.label}{' +lineinfo' if lineinfo else ''}: {how}")
    except BaseException:
        writer.abandon()
        raise
    return writer.finish()


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashmoe_core.build",
                                description="Compile flashmoe_core kernels into the cache, or "
                                            "into a kit another machine loads as it is.")
    p.add_argument("--arch", action="append", required=True,
                   help="target, e.g. sm_90a (H100/H200) or sm_80 (A100); repeatable")
    p.add_argument("--kernels", choices=("moe", "tests", "all"), default="moe",
                   help="the fused MoE kernel for the configuration (default), the test "
                        "kernels, or both")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--kit", type=Path, metavar="DIR",
                       help="write these kernels into a kit at DIR (load it elsewhere with "
                            "FLASHMOE_KERNEL_KIT=DIR)")
    where.add_argument("--for-check", type=Path, metavar="DIR", dest="for_check",
                       help="write the kit of tools/gpu_check.sh (every kernel its stages "
                            "load) to DIR; the configuration flags are ignored")
    where.add_argument("--report", action="store_true",
                       help="print the kernel's registers, spills, shared memory, blocks "
                            "per SM and mainloop SASS mix, and the layer's tasks, padding "
                            "and roofline (needs the 'report' extra)")
    p.add_argument("--json", action="store_true", help="with --report: print JSON")
    p.add_argument("--training", action="store_true",
                   help="also the layer's backward kernel (layer.backward)")
    p.add_argument("--requests", type=Path, metavar="FILE",
                   help="also build the kernels of this listing (pytest --list-kernels FILE)")
    p.add_argument("--jobs", type=int, default=min(os.cpu_count() or 1, 8),
                   help="parallel compiles (default: the CPU count, at most 8)")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        archs = [normalize_arch(a) for a in args.arch]
        if args.jobs < 1:
            raise ValueError(f"--jobs {args.jobs}: must be at least 1")
        extra = []
        if args.requests is not None:
            try:
                extra = load_requests(args.requests.read_text())
            except OSError as exc:
                raise ValueError(f"--requests {args.requests}: cannot read it "
                                 f"({exc.strerror})") from None
            except ValueError as exc:
                raise ValueError(f"--requests {args.requests}: {exc}") from None
        if args.for_check is not None:
            requests = all_requests(extra)
        else:
            requests = _config_requests(args.kernels, args) + extra
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        env.validate()  # before any compile
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    dest = args.kit or args.for_check
    try:
        if args.report:
            import json

            from .report import format_report, report

            cfg = config_from_args(args)
            reps = [report(cfg, arch, training=args.training) for arch in archs]
            print(json.dumps(reps, indent=1) if args.json else
                  "\n\n".join(format_report(r) for r in reps))
            return 0
        if dest is not None:
            t0 = time.perf_counter()
            kit = build_kit(dest, requests, archs, args.jobs)
            raw = sum(e["bytes"] for e in kit.entries.values())
            print(f"kit {dest}: {len(kit.entries)} kernels, {kit.stored_bytes() / 2**20:.1f} MiB "
                  f"on disk ({raw / 2**20:.1f} MiB of cubin), built in "
                  f"{time.perf_counter() - t0:.0f} s; load it with FLASHMOE_KERNEL_KIT={dest}")
            return 0
        print(f"cache: {env.cache_dir()}")
        for (spec, arch, lineinfo), (key, _, cached, secs) in _run_jobs(
                [(r.spec, a, r.lineinfo) for a in archs for r in requests], args.jobs):
            how = "cached" if cached else f"compiled in {secs:.1f} s"
            print(f"{arch} {spec.entry} {dict(spec.defines)}: {how} -> "
                  f"{kernel_cache().path(key)}")
    except Exception as exc:  # exit status as for run (cli.EXIT_CODES)
        code = exit_code(exc)
        if code is None:
            raise
        print(error_line(exc), file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
