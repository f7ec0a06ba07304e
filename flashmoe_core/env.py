"""Every environment variable flashmoe_core reads, in one place.

Nothing else in the package (or in ``flashmoe_core.host``) reads ``os.environ``; the
host runtime receives these values as plain arguments.

=========================  ==================================================  ==========
variable                   meaning                                             default
=========================  ==================================================  ==========
FLASHMOE_CACHE_DIR         compiled-kernel cache folder                        see below
FLASHMOE_DISABLE_JIT       1: never compile; a cache miss is an error          0
FLASHMOE_KERNEL_KIT        load kernels only from this prebuilt kit folder     (none)
FLASHMOE_ARCH              compile for this target instead of the GPU's        (detected)
FLASHMOE_DEVICE_DIR        use these device sources (a checkout's device/)    (packaged)
FLASHMOE_CUTLASS_INCLUDE   CUTLASS/CuTe include folder                         (wheel)
FLASHMOE_LINEINFO          1: keep source lines in kernels (profilers)         0
FLASHMOE_QUIET             1: no progress messages                             0
FLASHMOE_TIMEOUT_S         bound of every device-side wait, seconds            5
FLASHMOE_CXX               host C++ compiler of the CPU emulator backend       g++
FLASHMOE_EMULATOR_MAINLOOP GEMM mainloop the emulator runs: sm80 (mma.sync)    sm80
                           or sm90 (wgmma, as sm_90a builds run)
NVSHMEM_SYMMETRIC_SIZE     read as a floor: the layer raises it to what its     (sized)
                           symmetric buffers need before NVSHMEM starts
=========================  ==================================================  ==========

The cache defaults to ``$XDG_CACHE_HOME/flashmoe_core`` or ``~/.cache/flashmoe_core``.

Which backends each variable applies to: all but FLASHMOE_CXX apply to the GPU
backend; the CPU emulator honours FLASHMOE_CACHE_DIR, FLASHMOE_DISABLE_JIT,
FLASHMOE_DEVICE_DIR, FLASHMOE_CUTLASS_INCLUDE, FLASHMOE_QUIET, FLASHMOE_TIMEOUT_S
(its default is longer, see ``flashmoe_core.emulator``), FLASHMOE_CXX and
FLASHMOE_EMULATOR_MAINLOOP (which only it reads: a GPU build's arch decides), while
FLASHMOE_KERNEL_KIT, FLASHMOE_ARCH, FLASHMOE_LINEINFO and NVSHMEM_SYMMETRIC_SIZE do
not apply to it (it builds host libraries, not cubins). The NumPy reference reads none.

Every accessor validates its variable and raises :class:`EnvVarError` (a ValueError)
naming it; :func:`validate` checks them all at once, and every entry point that builds
or runs a kernel (the JIT, the command lines) calls it first, so a bad value fails the
same way on every path, whether or not that path would have read it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

__all__ = ["EnvVarError", "validate", "cache_dir", "jit_disabled", "kernel_kit", "arch_override", "device_dir",
           "cutlass_include", "lineinfo", "quiet", "timeout_s", "cxx", "nvshmem_symmetric_size",
           "launched_by_mpi", "describe"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class EnvVarError(ValueError):
    """An environment variable holds a value flashmoe_core cannot use."""


def _bad(name: str, why: str) -> EnvVarError:
    return EnvVarError(f"environment variable {name}={os.environ.get(name, '')!r} {why}")


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise _bad(name, "is not a boolean; use 1 or 0 (or unset it)")


def _text(name: str) -> Optional[str]:
    raw = os.environ.get(name, "").strip()
    return raw or None


def cache_dir() -> Path:
    """Folder of the compiled-kernel cache."""
    explicit = _text("FLASHMOE_CACHE_DIR")
    if explicit:
        path = Path(explicit).expanduser()
        if path.exists() and not path.is_dir():
            raise _bad("FLASHMOE_CACHE_DIR", "is not a folder; point it at a (new or existing) "
                                             "folder, or unset it")
        return path
    base = _text("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "flashmoe_core"


def jit_disabled() -> bool:
    """True when compiling is switched off (deployments that must not compile)."""
    return _flag("FLASHMOE_DISABLE_JIT")


def kernel_kit() -> Optional[Path]:
    """Folder of a prebuilt kernel kit to load every kernel from (None: the JIT and cache).

    A kit is built elsewhere (``python -m flashmoe_core.build --kit DIR``); with one set,
    nothing compiles and a kernel the kit lacks is an error."""
    raw = _text("FLASHMOE_KERNEL_KIT")
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not (path / "kit.json").is_file():
        raise EnvVarError(f"FLASHMOE_KERNEL_KIT={raw!r} is not a kernel kit (no kit.json "
                          "there); point it at a folder built by python -m flashmoe_core.build "
                          "--kit, or unset it")
    return path


def arch_override() -> Optional[str]:
    """FLASHMOE_ARCH in its canonical spelling (``sm_90a``), or None."""
    raw = _text("FLASHMOE_ARCH")
    if raw is None:
        return None
    from .host.compiler import normalize_arch

    try:
        return normalize_arch(raw)
    except ValueError as exc:
        raise _bad("FLASHMOE_ARCH", f"is not a target: {exc}") from None


def device_dir() -> Optional[str]:
    """FLASHMOE_DEVICE_DIR, a folder of device sources (never silently ignored)."""
    raw = _text("FLASHMOE_DEVICE_DIR")
    if raw is not None and not (Path(raw).expanduser() / "include" / "flashmoe").is_dir():
        raise _bad("FLASHMOE_DEVICE_DIR", "is not a device source folder (no include/flashmoe/ "
                                          "in it); point it at a checkout's device/, or unset it")
    return None if raw is None else str(Path(raw).expanduser())


def cutlass_include() -> Optional[str]:
    """FLASHMOE_CUTLASS_INCLUDE, a CUTLASS include folder holding CuTe."""
    raw = _text("FLASHMOE_CUTLASS_INCLUDE")
    if raw is not None and not (Path(raw).expanduser() / "cute" / "tensor.hpp").is_file():
        raise _bad("FLASHMOE_CUTLASS_INCLUDE", "holds no CuTe headers (cute/tensor.hpp); point "
                                               "it at CUTLASS's include/, or unset it")
    return None if raw is None else str(Path(raw).expanduser())


def lineinfo() -> bool:
    return _flag("FLASHMOE_LINEINFO")


def quiet() -> bool:
    return _flag("FLASHMOE_QUIET")


def timeout_s(default: float = 5.0) -> float:
    """Bound of every device-side wait before the kernel reports a timeout (``default``
    when unset: 5 s on a GPU; the emulator passes its own)."""
    raw = _text("FLASHMOE_TIMEOUT_S")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.001 <= value <= 3600.0:  # also rejects nan and inf
        raise EnvVarError(f"FLASHMOE_TIMEOUT_S={raw!r} must be a number of seconds in "
                          "[0.001, 3600]")
    return value


def cxx() -> Optional[str]:
    """The host C++ compiler the emulator backend uses (None: g++ or c++ on PATH)."""
    raw = _text("FLASHMOE_CXX")
    if raw is not None and shutil.which(raw) is None:
        raise _bad("FLASHMOE_CXX", "names no program on PATH; name a C++ compiler (g++, "
                                   "clang++ or a path to one), or unset it")
    return raw


def emulator_mainloop() -> str:
    """FLASHMOE_EMULATOR_MAINLOOP: "sm80" (default) or "sm90"."""
    raw = _text("FLASHMOE_EMULATOR_MAINLOOP")
    if raw is None:
        return "sm80"
    if raw not in ("sm80", "sm90"):
        raise _bad("FLASHMOE_EMULATOR_MAINLOOP", "must be sm80 (mma.sync) or sm90 (wgmma)")
    return raw


def nvshmem_symmetric_size():
    """NVSHMEM_SYMMETRIC_SIZE as set by the user, in bytes (None if unset).

    Accepts plain bytes or NVSHMEM's suffixes (K, M, G, T; powers of 1024)."""
    raw = _text("NVSHMEM_SYMMETRIC_SIZE")
    if raw is None:
        return None
    scale = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    text = raw.lower().rstrip("b")
    mult = scale.get(text[-1:], 1)
    try:
        value = float(text[:-1] if mult > 1 else text) * mult
    except ValueError:
        value = -1.0
    if not 0 < value < 2**50:  # also rejects nan and inf
        raise EnvVarError(f"NVSHMEM_SYMMETRIC_SIZE={raw!r} is not a size (e.g. 4G, 1073741824)")
    return int(value)


# Variables a process launcher sets for every rank it starts.
_LAUNCHER_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS",
                       "SLURM_NTASKS")


def launched_by_mpi() -> bool:
    """True when a launcher (mpirun, srun) started this process as one of several ranks."""
    for name in _LAUNCHER_SIZE_VARS:
        raw = _text(name)
        if raw and raw.isdigit() and int(raw) > 1:
            return True
    return bool(_text("OMPI_COMM_WORLD_RANK") or _text("PMIX_RANK"))


def validate() -> dict:
    """Check every variable; returns their values (as :func:`describe`).

    Raises
    ------
    EnvVarError
        Naming every variable whose value is unusable (all of them in one message).
    """
    values, problems = {}, []
    for name, read in _READERS.items():
        try:
            values[name] = read()
        except EnvVarError as exc:
            problems.append(str(exc))
    if problems:
        raise EnvVarError("; ".join(problems))
    return values


def describe() -> dict:
    """Current values of every variable (for ``--verbose`` and bug reports)."""
    return validate()

_READERS = {
    "FLASHMOE_CACHE_DIR": lambda: str(cache_dir()),
    "FLASHMOE_DISABLE_JIT": jit_disabled,
    "FLASHMOE_KERNEL_KIT": lambda: None if kernel_kit() is None else str(kernel_kit()),
    "FLASHMOE_ARCH": arch_override,
    "FLASHMOE_DEVICE_DIR": device_dir,
    "FLASHMOE_CUTLASS_INCLUDE": cutlass_include,
    "FLASHMOE_LINEINFO": lineinfo,
    "FLASHMOE_QUIET": quiet,
    "FLASHMOE_TIMEOUT_S": timeout_s,
    "FLASHMOE_CXX": cxx,
    "FLASHMOE_EMULATOR_MAINLOOP": emulator_mainloop,
    "NVSHMEM_SYMMETRIC_SIZE": nvshmem_symmetric_size,
}
