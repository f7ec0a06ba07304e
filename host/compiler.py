"""Device sources -> cubin with NVRTC and nvJitLink (the only module that touches them).

A :class:`KernelSpec` names an entry translation unit under ``device/kernels/`` and
the compile-time constants to define; :func:`build` turns it into a cubin for one
architecture, through the on-disk cache. Kernels that call NVSHMEM are compiled to
LTO-IR with relocatable device code and linked against ``libnvshmem_device.a`` from
the nvidia-nvshmem wheel (``NVSHMEM_ENABLE_ALL_DEVICE_INLINING`` keeps the symbol
names NVRTC and the archive agree on). Others compile straight to cubin.

We ship SASS (cubin), never PTX: the driver may be older than NVRTC.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable, Mapping, Optional, Tuple

from . import identity
from .cache import SCHEMA, KernelCache
from .errors import CompileError, JitDisabledError
from .toolchain import Toolchain, device_tree_digest

__all__ = ["KernelSpec", "CompiledKernel", "build", "cache_key", "program_options",
           "normalize_arch", "kernel_identity"]

_SUPPORTED_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a", "sm_100a", "sm_120a")


def normalize_arch(arch: str) -> str:
    """Canonical ``sm_XY[a]`` spelling; raises ValueError for unsupported targets."""
    a = str(arch).strip().lower()
    if a.startswith("compute_"):
        a = "sm_" + a[len("compute_"):]
    if not a.startswith("sm_"):
        a = "sm_" + a
    if a not in _SUPPORTED_ARCHS:
        raise ValueError(f"architecture {arch!r} is not supported; use one of "
                         f"{', '.join(_SUPPORTED_ARCHS)} (tensor-core MMA needs sm_80 or newer)")
    return a


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel to build.

    Attributes
    ----------
    entry : str
        Translation unit, relative to the device root (e.g. ``kernels/tile_gemm.cu``).
    defines : tuple of (str, str)
        Compile-time constants, as preprocessor macros.
    nvshmem : bool
        Link the NVSHMEM device library.
    label : str
        What to call it in messages ("the fused MoE kernel").
    family : str
        Kernels of one family take about as long to compile (for the time estimate).
    max_registers : int, optional
        Register cap per thread.
    context : mapping
        Shown in compile errors (the configuration that asked for the kernel).
    """

    entry: str
    defines: Tuple[Tuple[str, str], ...] = ()
    nvshmem: bool = False
    label: str = "a device kernel"
    family: str = "generic"
    max_registers: Optional[int] = None
    context: Tuple[Tuple[str, Any], ...] = ()

    @staticmethod
    def make(entry: str, defines: Mapping[str, Any] = (), *, context: Mapping[str, Any] = (),
             **kwargs: Any) -> "KernelSpec":
        """Build a spec from plain mappings (sorted, so equal inputs give equal keys)."""
        d = tuple(sorted((str(k), _macro_value(v)) for k, v in dict(defines).items()))
        c = tuple(sorted((str(k), v) for k, v in dict(context).items()))
        return KernelSpec(entry=entry, defines=d, context=c, **kwargs)


    def to_dict(self) -> dict:
        """Plain JSON-able form (kit manifests, kernel listings); :meth:`from_dict` inverts it."""
        return {"entry": self.entry, "defines": dict(self.defines), "nvshmem": self.nvshmem,
                "label": self.label, "family": self.family,
                "max_registers": self.max_registers, "context": dict(self.context)}

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> "KernelSpec":
        return KernelSpec.make(d["entry"], d.get("defines", {}), context=d.get("context", {}),
                               nvshmem=bool(d.get("nvshmem", False)),
                               label=d.get("label", "a device kernel"),
                               family=d.get("family", "generic"),
                               max_registers=d.get("max_registers"))


def _macro_value(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    return str(v)


@dataclasses.dataclass(frozen=True)
class CompiledKernel:
    """A built kernel image."""

    cubin: bytes
    key: str
    arch: str
    cached: bool
    seconds: float
    spec: KernelSpec


def program_options(spec: KernelSpec, arch: str, toolchain: Toolchain, lineinfo: bool = False):
    """The exact NVRTC options for a spec (imports cuda.core, needs no GPU)."""
    from cuda.core import ProgramOptions

    macros = [(k, v) for k, v in spec.defines]
    macros.append(("FLASHMOE_NVSHMEM", "1" if spec.nvshmem else "0"))
    if spec.nvshmem:
        macros.append("NVSHMEM_ENABLE_ALL_DEVICE_INLINING")
    return ProgramOptions(
        name=str(toolchain.device_root / spec.entry),
        arch=arch,
        std="c++17",
        include_path=[str(p) for p in toolchain.include_dirs],
        define_macro=macros,
        # CuTe's unannotated constexpr helpers must compile as device code.
        device_as_default_execution_space=True,
        relocatable_device_code=spec.nvshmem,
        link_time_optimization=spec.nvshmem,
        lineinfo=lineinfo,
        max_register_count=spec.max_registers,
        diag_suppress=[177, 550],  # unused variables / set-but-unused in CuTe headers
    )


def cache_key(spec: KernelSpec, arch: str, toolchain: Toolchain, lineinfo: bool = False) -> str:
    """Content hash of everything that shapes the cubin."""
    opts = program_options(spec, arch, toolchain, lineinfo)
    flags = [b.decode() for b in opts.as_bytes("nvrtc")]
    blob = json.dumps({
        "schema": SCHEMA,
        "entry": spec.entry,
        "arch": arch,
        "nvshmem": spec.nvshmem,
        # Include folders move between installs; their content is in the fingerprint.
        "flags": [f for f in flags if not f.startswith("--include-path=")],
        "toolchain": toolchain.fingerprint(),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def kernel_identity(spec: KernelSpec, key: str, toolchain: Toolchain) -> dict:
    """The identity record a build of ``spec`` under ``key`` carries (:mod:`.identity`)."""
    return identity.record(key, device_tree_digest(toolchain.device_root), spec.defines)


def _compile(spec: KernelSpec, arch: str, toolchain: Toolchain, lineinfo: bool,
             ident: dict) -> bytes:
    from cuda.core import Linker, LinkerOptions, ObjectCode, Program

    opts = program_options(spec, arch, toolchain, lineinfo)
    flags = tuple(b.decode() for b in opts.as_bytes("nvrtc"))
    context = dict(spec.context, kernel=spec.entry, arch=arch)
    path = toolchain.device_root / spec.entry
    try:
        # The identity goes after the source, so compile errors keep their line numbers.
        source = path.read_text() + identity.declaration(ident, device=True)
    except OSError as exc:
        raise CompileError("nvrtc", f"cannot read {path}: {exc}", flags, context) from None
    try:
        obj = Program(source, "c++", options=opts).compile("ltoir" if spec.nvshmem else "cubin")
    except Exception as exc:  # NVRTCError carries the whole log in its message
        raise CompileError("nvrtc", _strip_log(str(exc)), flags, context) from None
    if not spec.nvshmem:
        return bytes(obj.code)
    if toolchain.nvshmem_device_lib is None:
        raise CompileError("nvjitlink", "libnvshmem_device.a not found; install "
                           "nvidia-nvshmem-cu13", flags, context)
    lib = ObjectCode.from_library(toolchain.nvshmem_device_lib.read_bytes())
    link_opts = LinkerOptions(arch=arch, link_time_optimization=True, lineinfo=lineinfo)
    try:
        return bytes(Linker(obj, lib, options=link_opts).link("cubin").code)
    except Exception as exc:
        raise CompileError("nvjitlink", str(exc), flags, context) from None


def _strip_log(text: str) -> str:
    text = text.replace("\x00", "")
    marker = "compilation log:"
    i = text.find(marker)
    return text[i + len(marker):].strip() if i >= 0 else text.strip()


def build(spec: KernelSpec, arch: str, toolchain: Toolchain, *, cache: Optional[KernelCache],
          lineinfo: bool = False, allow_compile: bool = True,
          progress: Optional[Callable[[str], None]] = None) -> CompiledKernel:
    """Compile a kernel, or load it from the cache.

    Parameters
    ----------
    spec : KernelSpec
    arch : str
        Target, e.g. ``"sm_90a"`` (see :func:`normalize_arch`).
    toolchain : Toolchain
    cache : KernelCache or None
        None compiles every time.
    lineinfo : bool
        Keep source line information (for profilers and sanitizers).
    allow_compile : bool
        False raises :class:`JitDisabledError` on a cache miss.
    progress : callable, optional
        Receives one line when a compile starts.

    Raises
    ------
    CompileError
        With the compiler log (file:line), flags and ``spec.context``.
    """
    arch = normalize_arch(arch)
    key = cache_key(spec, arch, toolchain, lineinfo)
    ident = kernel_identity(spec, key, toolchain)
    if cache is not None:
        # Only an entry that carries this very identity is used (a renamed or swapped
        # entry is removed and rebuilt).
        hit = cache.load(key, expect=ident)
        if hit is not None:
            return CompiledKernel(hit, key, arch, True, 0.0, spec)
        why = getattr(cache, "rejected", {}).pop(key, None)
        if why is not None and progress is not None:
            progress(f"the cache entry of {spec.label} for {arch} was not that kernel ({why}); "
                     "it was removed and is rebuilt")
    if not allow_compile:
        raise JitDisabledError(
            f"{spec.label} for {arch} is not in the kernel cache and compiling is disabled "
            f"(FLASHMOE_DISABLE_JIT); build it first with python -m flashmoe_core.build "
            f"--arch {arch}")
    if cache is not None:
        cache.check_writable()  # fail now, not after the compile
    lock = cache.lock(key) if cache is not None else _null_lock()
    with lock:
        if cache is not None:
            hit = cache.load(key, expect=ident)  # another process may have built it meanwhile
            if hit is not None:
                return CompiledKernel(hit, key, arch, True, 0.0, spec)
        if progress is not None:
            est = cache.estimate_seconds(f"{spec.family}/{arch}", 30.0) if cache else 30.0
            progress(f"compiling {spec.label} for {arch} (first run only, ~{est:.0f} s)")
        t0 = time.perf_counter()
        cubin = _compile(spec, arch, toolchain, lineinfo, ident)
        if identity.read(cubin) != ident:
            raise CompileError("nvrtc", f"the build of {spec.entry} lost its identity record "
                               f"({identity.SYMBOL}); it cannot be cached safely", (),
                               dict(spec.context, kernel=spec.entry, arch=arch))
        seconds = time.perf_counter() - t0
        if cache is not None:
            cache.store(key, cubin, meta={"entry": spec.entry, "arch": arch,
                                          "defines": dict(spec.defines),
                                          "seconds": round(seconds, 2),
                                          "versions": toolchain.versions})
            cache.record_seconds(f"{spec.family}/{arch}", seconds)
    return CompiledKernel(cubin, key, arch, False, seconds, spec)


class _null_lock:
    def __enter__(self) -> bool:
        return True

    def __exit__(self, *exc: Any) -> None:
        return None
