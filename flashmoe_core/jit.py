"""The JIT as the package uses it: host/ compiler + cache, configured from env.py."""

from __future__ import annotations

import functools
import sys
from typing import Optional

from . import env
from .host.cache import KernelCache
from .host.compiler import CompiledKernel, KernelSpec, build, normalize_arch
from .host.toolchain import Toolchain, find_toolchain

__all__ = ["toolchain", "kernel_cache", "compile_kernel", "target_arch", "emulator_library"]


def toolchain() -> Toolchain:
    """The device tool chain (honours FLASHMOE_DEVICE_DIR and FLASHMOE_CUTLASS_INCLUDE)."""
    return find_toolchain(env.device_dir(), env.cutlass_include())


def kernel_cache() -> KernelCache:
    """The on-disk kernel cache (FLASHMOE_CACHE_DIR)."""
    return KernelCache(env.cache_dir())


def target_arch(device=None) -> str:
    """FLASHMOE_ARCH if set, else the architecture of ``device`` (a cuda.core Device)."""
    override = env.arch_override()
    if override:
        return normalize_arch(override)
    if device is None:
        from .host.device import get_device

        device = get_device()
    from .host.device import device_arch

    return device_arch(device)


def _progress(line: str) -> None:
    if not env.quiet():
        print(f"flashmoe_core: {line}", file=sys.stderr, flush=True)


def compile_kernel(spec: KernelSpec, arch: Optional[str] = None) -> CompiledKernel:
    """Build (or fetch from the cache) one kernel for ``arch`` (default: this GPU's)."""
    arch = normalize_arch(arch) if arch else target_arch()
    return build(spec, arch, toolchain(), cache=kernel_cache(), lineinfo=env.lineinfo(),
                 allow_compile=not env.jit_disabled(), progress=_progress)


@functools.lru_cache(maxsize=None)
def _emulator_library(spec: KernelSpec, device_dir: Optional[str],
                      cutlass_include: Optional[str], cxx: Optional[str]):
    from .host import emulator

    tc = find_toolchain(device_dir, cutlass_include)
    compiler = emulator.find_compiler(cxx)
    path = emulator.build_library(spec, tc, compiler, cache=kernel_cache(), progress=_progress)
    return emulator.load_library(path)


def emulator_library(spec: KernelSpec):
    """The CPU-emulator build of a kernel, compiled (or cached) and loaded once per
    process (see :mod:`flashmoe_core.host.emulator`)."""
    return _emulator_library(spec, env.device_dir(), env.cutlass_include(), env.cxx())
