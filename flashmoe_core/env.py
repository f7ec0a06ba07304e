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
NVSHMEM_SYMMETRIC_SIZE     read as a floor: the layer raises it to what its     (sized)
                           symmetric buffers need before NVSHMEM starts
=========================  ==================================================  ==========

The cache defaults to ``$XDG_CACHE_HOME/flashmoe_core`` or ``~/.cache/flashmoe_core``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["cache_dir", "jit_disabled", "kernel_kit", "arch_override", "device_dir",
           "cutlass_include", "lineinfo", "quiet", "timeout_s", "cxx", "nvshmem_symmetric_size",
           "launched_by_mpi", "describe"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"environment variable {name}={os.environ[name]!r} is not a boolean; "
                     "use 1 or 0")


def _text(name: str) -> Optional[str]:
    raw = os.environ.get(name, "").strip()
    return raw or None


def cache_dir() -> Path:
    """Folder of the compiled-kernel cache."""
    explicit = _text("FLASHMOE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
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
        raise ValueError(f"FLASHMOE_KERNEL_KIT={raw!r} is not a kernel kit (no kit.json there); "
                         "point it at a folder built by python -m flashmoe_core.build --kit, "
                         "or unset it")
    return path


def arch_override() -> Optional[str]:
    return _text("FLASHMOE_ARCH")


def device_dir() -> Optional[str]:
    return _text("FLASHMOE_DEVICE_DIR")


def cutlass_include() -> Optional[str]:
    return _text("FLASHMOE_CUTLASS_INCLUDE")


def lineinfo() -> bool:
    return _flag("FLASHMOE_LINEINFO")


def quiet() -> bool:
    return _flag("FLASHMOE_QUIET")


def timeout_s() -> float:
    """Bound of every device-side wait before the kernel reports a timeout."""
    raw = _text("FLASHMOE_TIMEOUT_S")
    if raw is None:
        return 5.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.001 <= value <= 3600.0:
        raise ValueError(f"FLASHMOE_TIMEOUT_S={raw!r} must be a number of seconds in "
                         "[0.001, 3600]")
    return value


def cxx() -> Optional[str]:
    """The host C++ compiler the emulator backend uses (None: g++ or c++ on PATH)."""
    return _text("FLASHMOE_CXX")


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
        return int(float(text[:-1] if mult > 1 else text) * mult)
    except ValueError:
        raise ValueError(f"NVSHMEM_SYMMETRIC_SIZE={raw!r} is not a size (e.g. 4G, 1073741824)") \
            from None


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


def describe() -> dict:
    """Current values of every variable (for ``--verbose`` and bug reports)."""
    return {
        "FLASHMOE_CACHE_DIR": str(cache_dir()),
        "FLASHMOE_DISABLE_JIT": jit_disabled(),
        "FLASHMOE_KERNEL_KIT": None if kernel_kit() is None else str(kernel_kit()),
        "FLASHMOE_ARCH": arch_override(),
        "FLASHMOE_DEVICE_DIR": device_dir(),
        "FLASHMOE_CUTLASS_INCLUDE": cutlass_include(),
        "FLASHMOE_LINEINFO": lineinfo(),
        "FLASHMOE_QUIET": quiet(),
        "FLASHMOE_TIMEOUT_S": timeout_s(),
        "FLASHMOE_CXX": cxx(),
        "NVSHMEM_SYMMETRIC_SIZE": nvshmem_symmetric_size(),
    }
