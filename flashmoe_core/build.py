"""Compile kernels ahead of time into the cache (no GPU needed).

    python -m flashmoe_core.build --arch sm_90a --tokens 8192 --experts 64
    python -m flashmoe_core.build --arch sm_80 --kernels tests

A deployment can then run with FLASHMOE_DISABLE_JIT=1 and never compile.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import List, Optional

from . import env
from .cli import add_config_args, config_from_args
from .host.compiler import normalize_arch
from .host.errors import CompileError
from .jit import compile_kernel, kernel_cache
from .kernels import test_specs

__all__ = ["main"]


def _specs(which: str, args) -> list:
    specs = []
    if which in ("moe", "all"):
        from .kernels import moe_specs

        specs += moe_specs(config_from_args(args))
    if which in ("tests", "all"):
        specs += test_specs()
    return specs


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashmoe_core.build",
                                description="Compile flashmoe_core kernels into the cache.")
    p.add_argument("--arch", action="append", required=True,
                   help="target, e.g. sm_90a (H100/H200) or sm_80 (A100); repeatable")
    p.add_argument("--kernels", choices=("moe", "tests", "all"), default="moe",
                   help="the fused MoE kernel for the configuration (default), the test "
                        "kernels, or both")
    add_config_args(p)
    args = p.parse_args(argv)
    try:
        archs = [normalize_arch(a) for a in args.arch]
        specs = _specs(args.kernels, args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"cache: {env.cache_dir()}")
    for arch in archs:
        for spec in specs:
            t0 = time.perf_counter()
            try:
                k = compile_kernel(spec, arch)
            except CompileError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            how = "cached" if k.cached else f"compiled in {time.perf_counter() - t0:.1f} s"
            print(f"{arch} {spec.entry} {dict(spec.defines)}: {how} -> "
                  f"{kernel_cache().path(k.key)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
