"""Device sources -> a host shared library that runs them on the CPU (the emulator).

The only module that runs the host C++ compiler and calls into emulator libraries.
A :class:`~flashmoe_core.host.compiler.KernelSpec` names ``kernels/X.cu``; its
emulator build is ``emu/kernels/X.cpp``, a small translation unit that includes the
emulation runtime (``device/emu/flashmoe_emu/``), then the unchanged ``kernels/X.cu``,
and exports a C launcher. It is compiled with g++ (or ``cxx``) against the same CuTe,
CCCL and CUDA headers as NVRTC uses, with the same compile-time constants, and cached
on disk like cubins (key: the spec, the flags, the compiler's version and every
device source).

What the emulator shows and what it cannot: see ``device/emu/flashmoe_emu/runtime.h``
and the README ("The CPU emulator").
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from . import identity
from .cache import SCHEMA, KernelCache
from .compiler import KernelSpec
from .errors import CompileError, FlashMoEError, JitDisabledError
from .toolchain import Toolchain, device_tree_digest

__all__ = ["EmulatorError", "EmulatorOptions", "HostCompiler", "EmulatorLibrary",
           "find_compiler", "check_compiler", "emulator_entry", "compile_flags", "library_key",
           "library_identity", "build_library", "load_library"]

# Flags every emulator build uses. -fno-strict-aliasing: CUDA code type-puns through
# pointers as a matter of course; -fno-extern-tls-init: `__shared__` is thread_local
# and must not get a dynamic-initialisation wrapper per access.
_BASE_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
               "-fno-extern-tls-init", "-w")


class EmulatorError(FlashMoEError):
    """The emulated kernel did something the hardware would not survive, or hung.

    The message names what happened and where every thread of the failing block
    waited (a deadlock at a divergent barrier, a collective with a partial warp, ...).
    """


@dataclasses.dataclass(frozen=True)
class EmulatorOptions:
    """How the emulator schedules and perturbs a launch.

    Attributes
    ----------
    seed : int
        0 runs the threads of a block round-robin; any other value picks warps in
        seeded random bursts, so warps drift apart between barriers (missing
        ``__syncthreads`` show up).
    lazy_cp_async : bool
        ``cp.async`` copies land at ``cp.async.wait_group`` instead of at issue.
    poison_smem : bool
        Dynamic shared memory starts as 0xFF bytes (NaN), so reads of shared memory
        nobody wrote show up in results.
    chaos : int
        Above 0, one in ``chaos`` atomics and fences stalls its block for up to
        ``chaos_us`` microseconds (perturbs the interleaving of blocks).
    chaos_us : int
    watchdog_s : float
        A launch still running after this long is stopped and reported.
    stack_kib : int
        Stack of each emulated thread.
    """

    seed: int = 0
    lazy_cp_async: bool = False
    poison_smem: bool = True
    chaos: int = 0
    chaos_us: int = 2000
    watchdog_s: float = 600.0
    stack_kib: int = 256

    def __post_init__(self) -> None:
        if not 0 <= int(self.seed) < 2**64:
            raise ValueError(f"seed={self.seed} must be in [0, 2**64)")
        if self.chaos < 0 or self.chaos_us < 1:
            raise ValueError(f"chaos={self.chaos} must be >= 0 and chaos_us={self.chaos_us} >= 1")
        if not 0 < self.watchdog_s <= 86400:
            raise ValueError(f"watchdog_s={self.watchdog_s} must be in (0, 86400]")
        if not 64 <= self.stack_kib <= 65536:
            raise ValueError(f"stack_kib={self.stack_kib} must be in [64, 65536]")


@dataclasses.dataclass(frozen=True)
class HostCompiler:
    """A host C++ compiler: its path and ``--version`` line (part of cache keys)."""

    path: str
    version: str


def find_compiler(cxx: Optional[str] = None) -> HostCompiler:
    """The host C++ compiler: ``cxx`` if given, else g++ or c++ on PATH.

    Raises
    ------
    FlashMoEError
        When none is found or it does not run.
    """
    names = [cxx] if cxx else ["g++", "c++", "clang++"]
    path = next((p for p in (shutil.which(n) for n in names) if p), None)
    if path is None:
        raise FlashMoEError(
            f"the CPU emulator compiles device code with a host C++ compiler, and "
            f"{' / '.join(names)} was not found on PATH; install g++ (Debian/Ubuntu: "
            "apt-get install g++) or name one with FLASHMOE_CXX")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FlashMoEError(f"the host C++ compiler {path} does not run ({exc})") from None
    if out.returncode != 0:
        err = out.stderr.strip()[:500]
        raise FlashMoEError(f"the host C++ compiler {path} does not work ('{path} --version' "
                            f"exited {out.returncode}{': ' + err if err else ''}); install g++ "
                            "or name a working one with FLASHMOE_CXX")
    return HostCompiler(path, out.stdout.splitlines()[0].strip() if out.stdout else "unknown")


def emulator_entry(spec: KernelSpec) -> str:
    """The emulator translation unit of a spec: kernels/X.cu -> emu/kernels/X.cpp."""
    entry = Path(spec.entry)
    if entry.parts[0] != "kernels" or entry.suffix != ".cu":
        raise ValueError(f"{spec.entry}: only kernels/*.cu entry points have emulator builds")
    return (Path("emu") / entry.with_suffix(".cpp")).as_posix()


def _include_dirs(toolchain: Toolchain) -> list:
    root = toolchain.device_root
    cudart = toolchain.include_dirs[3]
    if not (cudart / "crt" / "host_config.h").exists():
        raise FlashMoEError(
            f"the CPU emulator needs the CUDA host headers (crt/host_config.h) next to "
            f"{cudart}; pip install 'nvidia-cuda-crt>=13.0,<14'")
    # Ours first, then CuTe/CUTLASS, CCCL and the CUDA runtime headers; not NVSHMEM's:
    # emulator builds get NVSHMEM's device API from flashmoe_emu/nvshmem.h.
    return [root / "emu", root / "include", root, *toolchain.include_dirs[1:4]]


def compile_flags(spec: KernelSpec, toolchain: Toolchain) -> list:
    """The host compiler's flags for the emulator build of a spec (sources excluded)."""
    flags = list(_BASE_FLAGS)
    flags += [f"-I{p}" for p in _include_dirs(toolchain)]
    flags += [f"-D{k}={v}" for k, v in spec.defines]
    flags.append(f"-DFLASHMOE_NVSHMEM={1 if spec.nvshmem else 0}")
    return flags


def library_key(spec: KernelSpec, toolchain: Toolchain, compiler: HostCompiler) -> str:
    """Content hash of everything that shapes an emulator library."""
    blob = json.dumps({
        "schema": SCHEMA,
        "kind": "emulator",
        "entry": emulator_entry(spec),
        "flags": [f for f in compile_flags(spec, toolchain) if not f.startswith("-I")],
        "compiler": compiler.version,
        "toolchain": toolchain.fingerprint(),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def library_identity(spec: KernelSpec, toolchain: Toolchain, compiler: HostCompiler) -> dict:
    """The identity record the emulator library of ``spec`` carries (:mod:`.identity`)."""
    return identity.record(library_key(spec, toolchain, compiler),
                           device_tree_digest(toolchain.device_root), spec.defines)


@functools.lru_cache(maxsize=None)
def check_compiler(compiler: HostCompiler) -> None:
    """Compile a one-line shared library with the emulator's flags, so that a compiler
    that runs but cannot build one fails in a second, before any real compile.

    Raises
    ------
    FlashMoEError
    """
    with tempfile.TemporaryDirectory(prefix="flashmoe-cxx-") as tmp:
        src, out = Path(tmp) / "probe.cpp", Path(tmp) / "probe.so"
        src.write_text('extern "C" int flashmoe_probe() { return 17; }\n')
        try:
            proc = subprocess.run([compiler.path, *_BASE_FLAGS, str(src), "-o", str(out)],
                                  capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FlashMoEError(f"the host C++ compiler {compiler.path} does not run ({exc}); "
                                "install g++ or name a working one with FLASHMOE_CXX") from None
        if proc.returncode != 0 or not out.is_file():
            log = (proc.stderr or proc.stdout).strip().splitlines()[:3]
            raise FlashMoEError(
                f"the host C++ compiler {compiler.path} ({compiler.version}) cannot build a "
                f"C++17 shared library (exit {proc.returncode}: {' | '.join(log) or 'no output'});"
                " install g++ or name a working one with FLASHMOE_CXX")


def _compile(spec: KernelSpec, toolchain: Toolchain, compiler: HostCompiler, out: Path) -> None:
    source = toolchain.device_root / emulator_entry(spec)
    if not source.exists():
        raise FlashMoEError(f"no emulator build of {spec.entry} ({source} is missing)")
    flags = compile_flags(spec, toolchain)
    # The identity constant comes in as a forced include (not part of the key's flags).
    ident = out.with_name(out.name + ".identity.h")
    ident.write_text(identity.declaration(library_identity(spec, toolchain, compiler),
                                          device=False))
    cmd = [compiler.path, *flags, "-include", str(ident), str(source), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    context = dict(spec.context, kernel=spec.entry, backend="emulator")
    if proc.returncode != 0:
        log = proc.stderr.strip()
        if len(log) > 20000:  # template errors run long: keep the head, where the cause is
            log = log[:20000] + "\n[... log truncated ...]"
        raise CompileError("host c++", log, [compiler.path, *flags], context)
    if not out.is_file():
        raise CompileError("host c++", f"{compiler.path} exited 0 but wrote no library",
                           [compiler.path, *flags], context)


def build_library(spec: KernelSpec, toolchain: Toolchain, compiler: HostCompiler, *,
                  cache: Optional[KernelCache],
                  progress: Optional[Callable[[str], None]] = None,
                  allow_compile: bool = True) -> Path:
    """Compile the emulator library of a spec, or find it in the cache.

    Parameters
    ----------
    spec : KernelSpec
        The same spec the GPU path compiles.
    toolchain : Toolchain
    compiler : HostCompiler
    cache : KernelCache or None
        None builds into a fresh temporary folder every time.
    progress : callable, optional
        Receives one line when a compile starts.
    allow_compile : bool
        False raises :class:`JitDisabledError` on a cache miss (FLASHMOE_DISABLE_JIT).

    Returns
    -------
    Path of the shared library (its identity checked, see :mod:`.identity`).

    Raises
    ------
    CompileError
        With the compiler's log and flags.
    FlashMoEError
        When the cache folder is unusable or the compiler cannot build a library
        (checked before the compile).
    """
    key = library_key(spec, toolchain, compiler)
    ident = library_identity(spec, toolchain, compiler)
    if cache is not None:
        hit = cache.load_file(key, ".so", expect=ident)
        if hit is not None:
            return hit
        why = cache.rejected.pop(key, None)
        if why is not None and progress is not None:
            progress(f"the cached emulator build of {spec.label} was not that library ({why}); "
                     "it was removed and is rebuilt")
    if not allow_compile:
        raise JitDisabledError(
            f"the CPU-emulator build of {spec.label} is not in the kernel cache and compiling "
            "is disabled (FLASHMOE_DISABLE_JIT); run once with compiling allowed to cache it")
    check_compiler(compiler)
    if cache is None:
        out = Path(tempfile.mkdtemp(prefix="flashmoe-emu-")) / f"{key}.so"
        _compile(spec, toolchain, compiler, out)
        return out
    cache.check_writable()
    with cache.lock(key):
        hit = cache.load_file(key, ".so", expect=ident)  # another process may have built it
        if hit is not None:
            return hit
        family = f"emulator/{Path(spec.entry).stem}"
        if progress is not None:
            est = cache.estimate_seconds(family, 30.0)
            progress(f"compiling {spec.label} for the CPU emulator (first run only, ~{est:.0f} s)")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="flashmoe-emu-") as tmp:
            out = Path(tmp) / "lib.so"
            _compile(spec, toolchain, compiler, out)
            seconds = time.perf_counter() - t0
            path = cache.store_file(key, out.read_bytes(), ".so", meta={
                "entry": emulator_entry(spec), "defines": dict(spec.defines),
                "compiler": compiler.version, "seconds": round(seconds, 2)})
        cache.record_seconds(family, seconds)
    return path


class EmulatorLibrary:
    """A loaded emulator library: configure a launch, call its C functions, and turn a
    stopped launch into :class:`EmulatorError`.

    Parameters
    ----------
    path : path of the shared library.
    """

    def __init__(self, path, expect: Optional[dict] = None) -> None:
        self.path = Path(path)
        # RTLD_LOCAL: every library keeps its own runtime state.
        self._lib = ctypes.CDLL(str(self.path), mode=os.RTLD_LOCAL)
        if expect is not None:
            # Read the identity constant (data, not a call) before anything is called:
            # the file may have changed since build_library checked its bytes.
            try:
                found = identity.read(ctypes.string_at(ctypes.addressof(
                    ctypes.c_char.in_dll(self._lib, identity.SYMBOL))))
            except ValueError:
                found = None
            why = identity.mismatch(found, expect)
            if why is not None:
                raise FlashMoEError(f"{self.path} is not the emulator library it was loaded "
                                    f"as: {why}; remove it, or clear the kernel cache")
        self._lib.emu_configure.argtypes = [ctypes.c_ulonglong, ctypes.c_int, ctypes.c_int,
                                            ctypes.c_int, ctypes.c_int, ctypes.c_double,
                                            ctypes.c_int]
        self._lib.emu_last_error.restype = ctypes.c_char_p
        mismatches = self._lib.emu_mma_layout_mismatches()
        if mismatches:
            raise EmulatorError(f"{mismatches} fragment-layout entries of the emulated tensor-core "
                                "instructions disagree with CuTe's MMA_Traits: the emulator "
                                "cannot be trusted with this CuTe version")

    def function(self, name: str, argtypes: Sequence[Any], restype: Any = ctypes.c_int):
        """A C function of the library with its signature set."""
        fn = getattr(self._lib, name)
        fn.argtypes = list(argtypes)
        fn.restype = restype
        return fn

    def launch(self, options: EmulatorOptions, fn, *args) -> None:
        """Run launcher ``fn(*args)`` under ``options``.

        Raises
        ------
        EmulatorError
            When the emulator stopped the launch (its report is the message).
        """
        self._lib.emu_configure(int(options.seed), int(options.lazy_cp_async),
                                int(options.poison_smem), int(options.chaos),
                                int(options.chaos_us), float(options.watchdog_s),
                                int(options.stack_kib))
        rc = fn(*args)
        if rc != 0:
            text = (self._lib.emu_last_error() or b"").decode(errors="replace")
            raise EmulatorError(text or f"the emulator launch returned {rc}")


def load_library(path, expect: Optional[dict] = None) -> EmulatorLibrary:
    """Load an emulator library built by :func:`build_library`; with ``expect``
    (:func:`library_identity`), only if the loaded library carries that identity."""
    return EmulatorLibrary(path, expect)
