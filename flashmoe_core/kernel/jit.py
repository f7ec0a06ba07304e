"""The JIT as the package uses it: host/ compiler + cache, configured from env.py.

With ``FLASHMOE_KERNEL_KIT`` set, kernels come only from that prebuilt kit (see
:mod:`flashmoe_core.host.kit`): keys are computed with the kit's tool versions, nothing
compiles, and a kernel the kit lacks raises :class:`KitMissError` and is logged in
the kit's ``misses.jsonl``.
"""

from __future__ import annotations

import dataclasses

import functools
import sys
from pathlib import Path
from typing import Optional

from .. import env
from ..host.cache import KernelCache
from ..host.compiler import CompiledKernel, KernelSpec, build, cache_key, normalize_arch
from ..host.errors import JitDisabledError, KitMissError
from ..host.kit import KernelKit
from ..host.toolchain import Toolchain, device_tree_digest, find_toolchain, kit_toolchain

__all__ = ["toolchain", "kernel_cache", "kernel_kit", "compile_kernel", "target_arch",
           "emulator_library"]


@functools.lru_cache(maxsize=None)
def _open_kit(path: Path) -> KernelKit:
    return KernelKit(path)


def kernel_kit() -> Optional[KernelKit]:
    """The kernel kit in use (FLASHMOE_KERNEL_KIT), or None."""
    path = env.kernel_kit()
    return None if path is None else _open_kit(path.resolve())


def toolchain() -> Toolchain:
    """The device tool chain (honours FLASHMOE_DEVICE_DIR and FLASHMOE_CUTLASS_INCLUDE;
    with a kernel kit, the kit builder's tool versions)."""
    kit = kernel_kit()
    if kit is not None:
        return kit_toolchain(env.device_dir(), kit.versions)
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
        from ..host.device import get_device

        device = get_device()
    from ..host.device import device_arch

    return device_arch(device)


def _progress(line: str) -> None:
    if not env.quiet():
        print(f"flashmoe_core: {line}", file=sys.stderr, flush=True)


def compile_kernel(spec: KernelSpec, arch: Optional[str] = None,
                   lineinfo: Optional[bool] = None) -> CompiledKernel:
    """Build (or fetch from the cache or the kernel kit) one kernel for ``arch``
    (default: this GPU's); ``lineinfo`` defaults to FLASHMOE_LINEINFO."""
    env.validate()  # every variable, whether or not this path reads it
    arch = normalize_arch(arch) if arch else target_arch()
    lineinfo = env.lineinfo() if lineinfo is None else bool(lineinfo)
    kit = kernel_kit()
    if kit is None:
        return build(spec, arch, toolchain(), cache=kernel_cache(), lineinfo=lineinfo,
                     allow_compile=not env.jit_disabled(), progress=_progress)
    tc = toolchain()
    try:
        return build(spec, arch, tc, cache=kit, lineinfo=lineinfo, allow_compile=False)
    except JitDisabledError:
        pass
    digest = device_tree_digest(tc.device_root)
    stale = digest != kit.device_digest
    kit.record_miss({"key": cache_key(spec, arch, tc, lineinfo), "arch": arch,
                     "lineinfo": lineinfo, "stale_kit": stale, "spec": spec.to_dict()})
    why = (f"the kit was built from other device sources (digest {kit.device_digest[:12]}, "
           f"these are {digest[:12]}): rebuild it from this checkout" if stale else
           "it was not built into the kit: add it to the kit's requests and rebuild")
    raise KitMissError(
        f"{spec.label} for {arch} (defines {dict(spec.defines)}, lineinfo={lineinfo}) is not "
        f"in the kernel kit {kit.root}; {why} (python -m flashmoe_core.build --kit DIR ...), "
        "or unset FLASHMOE_KERNEL_KIT to compile it here")


@functools.lru_cache(maxsize=None)
def _emulator_library(spec: KernelSpec, device_dir: Optional[str],
                      cutlass_include: Optional[str], cxx: Optional[str], jit_disabled: bool,
                      checked: bool):
    from ..host import emulator

    tc = find_toolchain(device_dir, cutlass_include)
    compiler = emulator.find_compiler(cxx)
    path = emulator.build_library(spec, tc, compiler, cache=kernel_cache(), progress=_progress,
                                  allow_compile=not jit_disabled, checked=checked)
    return emulator.load_library(path, emulator.library_identity(spec, tc, compiler, checked))


def with_mainloop(spec: KernelSpec, mainloop: str) -> KernelSpec:
    """The spec with its GEMM mainloop forced (an emulator build has no arch to pick
    it): "sm80" (mma.sync) or "sm90" (wgmma; 16-bit operands, else mma.sync)."""
    if mainloop not in ("sm80", "sm90"):
        raise ValueError(f"mainloop must be 'sm80' or 'sm90', got {mainloop!r}")
    defines = dict(spec.defines, FMOE_MAINLOOP="90" if mainloop == "sm90" else "80")
    return dataclasses.replace(spec, defines=tuple(sorted(defines.items())))


def emulator_library(spec: KernelSpec, checked: bool = False):
    """The CPU-emulator build of a kernel, compiled (or cached) and loaded once per
    process (see :mod:`flashmoe_core.host.emulator`); honours FLASHMOE_DISABLE_JIT and
    FLASHMOE_EMULATOR_MAINLOOP; ``checked`` builds carry the memory model (weak memory,
    race detection, preemption)."""
    env.validate()  # every variable, whether or not the emulator reads it
    if "FMOE_MAINLOOP" not in dict(spec.defines):
        spec = with_mainloop(spec, env.emulator_mainloop())
    return _emulator_library(spec, env.device_dir(), env.cutlass_include(), env.cxx(),
                             env.jit_disabled(), bool(checked))
