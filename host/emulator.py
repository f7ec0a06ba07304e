"""Device sources -> a host shared library that runs them on the CPU (the emulator).

The only module that runs the host C++ compiler and calls into emulator libraries.
A :class:`~flashmoe_core.host.compiler.KernelSpec` names ``kernels/X.cu``; its
emulator build is ``emu/kernels/X.cpp``, a small translation unit that includes the
emulation runtime (``device/emu/flashmoe_emu/``), then the unchanged ``kernels/X.cu``,
and exports a C launcher. It is compiled with g++ (or ``cxx``) against the same CuTe,
CCCL and CUDA headers as NVRTC uses, with the same compile-time constants, and cached
on disk like cubins (key: the spec, the flags, the compiler's version and every
device source).

Checked builds (g++ only) also compile the device code with ``-fsanitize=thread``
instrumentation and no sanitizer run time: every load and store of the kernel then
calls the emulator's memory model (``device/emu/flashmoe_emu/memory.h``), which runs
the weak-memory mode, the design rule checks and the race detector when
:class:`EmulatorOptions` asks for them. Its reports name code by library offset; this
module turns those into ``file:line`` (addr2line) and shared variables by name (readelf).

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
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import identity
from .cache import SCHEMA, KernelCache
from .compiler import KernelSpec
from .errors import CompileError, FlashMoEError, JitDisabledError
from .toolchain import Toolchain, device_tree_digest

__all__ = ["EmulatorError", "EmulatorOptions", "BufferSpan", "HostCompiler", "EmulatorLibrary",
           "find_compiler", "check_compiler", "supports_checked", "emulator_entry",
           "compile_flags", "library_key", "library_identity", "build_library", "load_library"]

# Flags every emulator build uses. -fno-strict-aliasing: CUDA code type-puns through
# pointers as a matter of course; -fno-extern-tls-init: `__shared__` is thread_local
# and must not get a dynamic-initialisation wrapper per access; -fno-gnu-unique: the
# statics of inline functions (function-scope `__shared__` variables among them) stay
# in their library, where unique symbols would bind every library loaded later to the
# first one's copies.
_BASE_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
               "-fno-extern-tls-init", "-fno-gnu-unique", "-w")
# Checked builds: every load and store of the device code calls memory.h (volatile ones
# apart), no per-function calls; line tables name the code in reports. Compiled with -c
# and linked without the sanitizer run time (memory.h defines what it would).
_CHECKED_FLAGS = ("-DFMOE_EMU_CHECKED=1", "-fsanitize=thread",
                  "--param=tsan-distinguish-volatile=1",
                  "--param=tsan-instrument-func-entry-exit=0", "-g1")


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
    weak : bool
        Weak global memory (checked builds): a block's plain stores stay invisible to
        other blocks' L2 reads until a device-scope fence, an atomic on the word or
        kernel end drains them (random drains besides), NVSHMEM puts without a signal
        stay in flight until ``nvshmem_fence``/``quiet``, and a cacheable load of data
        another block wrote during the launch is reported (L1 is not coherent).
    races : bool
        Race detection (checked builds): shared memory per 4-byte word within barrier
        intervals, global memory by happens-before across blocks through fences,
        atomics and signals. A race stops the launch with an :class:`EmulatorError`
        naming both accesses.
    preempt : int
        Above 0 (checked builds), about one shared or global memory access in
        ``preempt`` also lets another thread of the block run.
    """

    seed: int = 0
    lazy_cp_async: bool = False
    poison_smem: bool = True
    chaos: int = 0
    chaos_us: int = 2000
    watchdog_s: float = 600.0
    stack_kib: int = 256
    weak: bool = False
    races: bool = False
    preempt: int = 0

    def __post_init__(self) -> None:
        if not 0 <= int(self.seed) < 2**64:
            raise ValueError(f"seed={self.seed} must be in [0, 2**64)")
        if self.chaos < 0 or self.chaos_us < 1:
            raise ValueError(f"chaos={self.chaos} must be >= 0 and chaos_us={self.chaos_us} >= 1")
        if not 0 < self.watchdog_s <= 86400:
            raise ValueError(f"watchdog_s={self.watchdog_s} must be in (0, 86400]")
        if not 64 <= self.stack_kib <= 65536:
            raise ValueError(f"stack_kib={self.stack_kib} must be in [64, 65536]")
        if not 0 <= self.preempt <= 1 << 20:
            raise ValueError(f"preempt={self.preempt} must be in [0, 2**20] (0: never)")

    @property
    def checked(self) -> bool:
        """True when the launch needs a checked build (the memory model)."""
        return bool(self.weak or self.races or self.preempt)

    @classmethod
    def strict(cls, seed: int = 1, **kw) -> "EmulatorOptions":
        """Everything the emulator can check at once: weak memory, race detection,
        preemption at memory accesses, lazy ``cp.async`` and random warp schedules."""
        kw = {"weak": True, "races": True, "preempt": 16, "lazy_cp_async": True, **kw}
        return cls(seed=seed, **kw)


@dataclasses.dataclass(frozen=True)
class HostCompiler:
    """A host C++ compiler: its path and ``--version`` line (part of cache keys)."""

    path: str
    version: str


def supports_checked(compiler: HostCompiler) -> bool:
    """Whether the compiler can make checked builds (g++'s instrumentation options)."""
    return "clang" not in compiler.version.lower() and (
        "g++" in compiler.version or "GCC" in compiler.version or "gcc" in compiler.version)


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


def compile_flags(spec: KernelSpec, toolchain: Toolchain, checked: bool = False) -> list:
    """The host compiler's flags for the emulator build of a spec (sources excluded)."""
    flags = list(_BASE_FLAGS)
    if checked:
        flags += _CHECKED_FLAGS
    flags += [f"-I{p}" for p in _include_dirs(toolchain)]
    flags += [f"-D{k}={v}" for k, v in spec.defines]
    flags.append(f"-DFLASHMOE_NVSHMEM={1 if spec.nvshmem else 0}")
    return flags


def library_key(spec: KernelSpec, toolchain: Toolchain, compiler: HostCompiler,
                checked: bool = False) -> str:
    """Content hash of everything that shapes an emulator library."""
    blob = json.dumps({
        "schema": SCHEMA,
        "kind": "emulator",
        "entry": emulator_entry(spec),
        "flags": [f for f in compile_flags(spec, toolchain, checked) if not f.startswith("-I")],
        "compiler": compiler.version,
        "toolchain": toolchain.fingerprint(),
    }, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def library_identity(spec: KernelSpec, toolchain: Toolchain, compiler: HostCompiler,
                     checked: bool = False) -> dict:
    """The identity record the emulator library of ``spec`` carries (:mod:`.identity`)."""
    return identity.record(library_key(spec, toolchain, compiler, checked),
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


def _run_compiler(cmd: List[str], spec: KernelSpec) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    context = dict(spec.context, kernel=spec.entry, backend="emulator")
    if proc.returncode != 0:
        log = proc.stderr.strip()
        if len(log) > 20000:  # template errors run long: keep the head, where the cause is
            log = log[:20000] + "\n[... log truncated ...]"
        raise CompileError("host c++", log, cmd, context)
    out = Path(cmd[cmd.index("-o") + 1])
    if not out.is_file():
        raise CompileError("host c++", f"{cmd[0]} exited 0 but wrote {out.name}", cmd, context)


def _compile(spec: KernelSpec, toolchain: Toolchain, compiler: HostCompiler, out: Path,
             checked: bool = False) -> None:
    source = toolchain.device_root / emulator_entry(spec)
    if not source.exists():
        raise FlashMoEError(f"no emulator build of {spec.entry} ({source} is missing)")
    flags = compile_flags(spec, toolchain, checked)
    # The identity constant comes in as a forced include (not part of the key's flags).
    ident = out.with_name(out.name + ".identity.h")
    ident.write_text(identity.declaration(library_identity(spec, toolchain, compiler, checked),
                                          device=False))
    flags += ["-include", str(ident)]
    if not checked:
        _run_compiler([compiler.path, *flags, str(source), "-o", str(out)], spec)
        return
    # Compile with the instrumentation, link without the sanitizer run time; -Bsymbolic
    # binds the instrumentation calls to this library's own definitions.
    obj = out.with_suffix(".o")
    _run_compiler([compiler.path, *[f for f in flags if f != "-shared"], "-c", str(source),
                   "-o", str(obj)], spec)
    _run_compiler([compiler.path, "-shared", "-pthread", "-Wl,-Bsymbolic", str(obj), "-ldl",
                   "-o", str(out)], spec)
    obj.unlink()


def build_library(spec: KernelSpec, toolchain: Toolchain, compiler: HostCompiler, *,
                  cache: Optional[KernelCache],
                  progress: Optional[Callable[[str], None]] = None,
                  allow_compile: bool = True, checked: bool = False) -> Path:
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
    checked : bool
        Build with the memory model (g++ only): what weak mode, race detection and
        preemption need.

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
    if checked and not supports_checked(compiler):
        raise FlashMoEError(
            f"checked emulator builds (weak memory, race detection, preemption) need g++; "
            f"{compiler.path} is {compiler.version!r}: set FLASHMOE_CXX=g++ or turn the "
            "EmulatorOptions weak/races/preempt off")
    key = library_key(spec, toolchain, compiler, checked)
    ident = library_identity(spec, toolchain, compiler, checked)
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
        _compile(spec, toolchain, compiler, out, checked)
        return out
    cache.check_writable()
    with cache.lock(key):
        hit = cache.load_file(key, ".so", expect=ident)  # another process may have built it
        if hit is not None:
            return hit
        family = f"emulator/{Path(spec.entry).stem}" + ("/checked" if checked else "")
        if progress is not None:
            est = cache.estimate_seconds(family, 30.0)
            what = "the checked CPU emulator" if checked else "the CPU emulator"
            progress(f"compiling {spec.label} for {what} (first run only, ~{est:.0f} s)")
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="flashmoe-emu-") as tmp:
            out = Path(tmp) / "lib.so"
            _compile(spec, toolchain, compiler, out, checked)
            seconds = time.perf_counter() - t0
            path = cache.store_file(key, out.read_bytes(), ".so", meta={
                "entry": emulator_entry(spec), "defines": dict(spec.defines),
                "compiler": compiler.version, "checked": checked,
                "seconds": round(seconds, 2)})
        cache.record_seconds(family, seconds)
    return path


@dataclasses.dataclass(frozen=True)
class BufferSpan:
    """A named range of host memory a launch uses (the memory model checks only these).

    Attributes
    ----------
    name : str
        What reports call it (``"z"``, ``"ring"``, ...).
    address, nbytes : int
    pe : int
        The PE whose memory it is.
    symmetric : bool
        Part of an NVSHMEM symmetric heap (peers' puts land there).
    """

    name: str
    address: int
    nbytes: int
    pe: int = 0
    symmetric: bool = False


_TOKEN = re.compile(r"\{\{(pc|tls):([0-9a-f]+)\}\}")


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
                                            ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                            ctypes.c_int]
        self._lib.emu_last_error.restype = ctypes.c_char_p
        self._lib.emu_register.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.checked = bool(self._lib.emu_checked())
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

    def register(self, buffers: Sequence[BufferSpan]) -> None:
        """Name the buffers of the next launches for the memory model (checked builds)."""
        n = len(buffers)
        names = [b.name.encode() for b in buffers]
        c_names = (ctypes.c_char_p * max(n, 1))(*names)
        c_base = (ctypes.c_ulonglong * max(n, 1))(*[b.address for b in buffers] or [0])
        c_size = (ctypes.c_ulonglong * max(n, 1))(*[b.nbytes for b in buffers] or [0])
        c_pe = (ctypes.c_int * max(n, 1))(*[b.pe for b in buffers] or [0])
        c_flag = (ctypes.c_int * max(n, 1))(*[int(b.symmetric) for b in buffers] or [0])
        self._lib.emu_register(n, c_names, c_base, c_size, c_pe, c_flag)

    def launch(self, options: EmulatorOptions, fn, *args,
               buffers: Sequence[BufferSpan] = ()) -> None:
        """Run launcher ``fn(*args)`` under ``options``; ``buffers`` name the memory the
        launch touches (what the memory model checks).

        Raises
        ------
        EmulatorError
            When the emulator stopped the launch (its report is the message).
        """
        if options.checked and not self.checked:
            raise EmulatorError(
                f"{self.path.name} was built without the memory model: weak, races and "
                "preempt need a checked build (load the library with checked=True)")
        rc = self._lib.emu_configure(int(options.seed), int(options.lazy_cp_async),
                                     int(options.poison_smem), int(options.chaos),
                                     int(options.chaos_us), float(options.watchdog_s),
                                     int(options.stack_kib), int(options.weak),
                                     int(options.races), int(options.preempt))
        if rc != 0:
            raise EmulatorError("the emulator library rejected the options " + repr(options))
        if self.checked:
            self.register(buffers)
        rc = fn(*args)
        if rc != 0:
            text = (self._lib.emu_last_error() or b"").decode(errors="replace")
            raise EmulatorError(self.symbolize(text) or f"the emulator launch returned {rc}")

    # ------------------------------------------------------------ reports
    def symbolize(self, text: str) -> str:
        """Replace the memory model's {{pc:..}} and {{tls:..}} tokens by source lines
        and shared-memory variable names."""
        tokens = set(_TOKEN.findall(text))
        if not tokens:
            return text
        pcs = sorted({int(v, 16) for k, v in tokens if k == "pc"})
        lines = _addr2line(self.path, pcs)
        tls = _tls_symbols(self.path) if any(k == "tls" for k, _ in tokens) else []

        def sub(m: "re.Match") -> str:
            value = int(m.group(2), 16)
            if m.group(1) == "pc":
                return lines.get(value, f"<code +0x{value:x}>")
            return _tls_name(tls, value)
        return _TOKEN.sub(sub, text)


def _device_frame(path: str) -> bool:
    p = path.replace("\\", "/")
    return ("/flashmoe/" in p or "/kernels/" in p) and "/flashmoe_emu/" not in p


def _addr2line(lib: Path, pcs: Sequence[int]) -> Dict[int, str]:
    """pc -> 'file:line (from file:line, ...)': the innermost device-source frame first,
    then the device-source frames it was inlined into (at most three in all)."""
    exe = shutil.which("addr2line")
    if exe is None:
        return {}
    result: Dict[int, str] = {}
    for p in pcs:  # one call each: with -i, addr2line does not separate the addresses
        try:  # a pc is a return address: the call is the byte before
            frames = subprocess.run([exe, "-i", "-e", str(lib), f"0x{p - 1:x}"],
                                    capture_output=True, text=True, timeout=60).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        frames = [f.split(" (discriminator")[0] for f in frames if ":" in f]
        dev = [f for f in frames if _device_frame(f.rsplit(":", 1)[0])]
        show = [f"{Path(f.rsplit(':', 1)[0]).name}:{f.rsplit(':', 1)[1]}" for f in (dev or frames)]
        if show:
            result[p] = show[0] + (f" (from {', '.join(show[1:3])})" if len(show) > 1 else "")
    return result


@functools.lru_cache(maxsize=16)
def _tls_symbols(lib: Path) -> List[Tuple[int, int, str]]:
    """(offset, size, name) of the library's thread-local symbols: the emulator's
    ``__shared__`` variables."""
    exe = shutil.which("readelf")
    if exe is None:
        return []
    try:
        out = subprocess.run([exe, "-sW", "-C", str(lib)], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    syms = []
    for line in out.splitlines():
        parts = line.split(None, 7)
        if len(parts) >= 8 and parts[3] == "TLS":
            try:
                syms.append((int(parts[1], 16), int(parts[2], 0), parts[7]))
            except ValueError:
                continue
    return sorted(syms)


def _tls_name(syms: List[Tuple[int, int, str]], off: int) -> str:
    for start, size, name in syms:
        if start <= off < start + max(size, 1):
            short = re.sub(r"\(.*\)", "()", name)  # drop argument and template lists
            while "<" in short and re.search(r"<[^<>]*>", short):
                short = re.sub(r"<[^<>]*>", "", short)
            return f"__shared__ {short}" + (f" (byte {off - start})" if off != start else "")
    return f"shared memory +0x{off:x}"


def load_library(path, expect: Optional[dict] = None) -> EmulatorLibrary:
    """Load an emulator library built by :func:`build_library`; with ``expect``
    (:func:`library_identity`), only if the loaded library carries that identity."""
    return EmulatorLibrary(path, expect)
