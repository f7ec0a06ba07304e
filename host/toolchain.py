"""Where the device tool chain lives: headers, the NVSHMEM device library, versions.

Everything comes from pip wheels (no CUDA toolkit): NVRTC and nvJitLink, the CUDA
runtime headers, CCCL, CuTe/CUTLASS (``nvidia-cutlass``) and NVSHMEM
(``nvidia-nvshmem-cu13``). Locating them needs no GPU and imports no CUDA module.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path
from typing import Dict, Optional, Tuple

from .errors import FlashMoEError

__all__ = ["Toolchain", "find_toolchain", "kit_toolchain", "device_root", "device_tree_digest"]

# Distributions whose versions change the generated code (part of every cache key).
_VERSIONED = ("nvidia-cuda-nvrtc", "nvidia-nvjitlink", "nvidia-cuda-runtime", "nvidia-cuda-crt",
              "nvidia-cuda-cccl",
              "nvidia-cutlass", "nvidia-nvshmem-cu13", "cuda-core", "cuda-bindings")
_DEVICE_SUFFIXES = (".cuh", ".cu", ".h", ".cpp")


def device_root(override: Optional[str] = None) -> Path:
    """The folder holding the device sources (``include/`` and ``kernels/``).

    ``override`` if given (an error if it holds none); else ``flashmoe_core/_device``
    of an installed wheel, or ``device/`` of a source checkout (editable installs).
    """
    if override:
        # An explicit folder is used or refused, never replaced by the packaged sources.
        if (Path(override) / "include" / "flashmoe").is_dir():
            return Path(override)
        raise FlashMoEError(f"{override} holds no device sources (include/flashmoe/*.cuh); "
                            "point FLASHMOE_DEVICE_DIR at a checkout's device/, or unset it")
    candidates = []
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "_device", here.parent / "device"]
    for c in candidates:
        if (c / "include" / "flashmoe").is_dir():
            return c
    raise FlashMoEError(
        "cannot find the device sources (include/flashmoe/*.cuh); looked in "
        + ", ".join(str(c) for c in candidates)
        + ". Reinstall flashmoe-core or set FLASHMOE_DEVICE_DIR to the repository's device/.")


def device_tree_digest(root: Path) -> str:
    """SHA-256 over every device source file's relative path and bytes."""
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _DEVICE_SUFFIXES)
    for p in files:
        h.update(p.relative_to(root).as_posix().encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """Resolved paths and versions of the device tool chain.

    Attributes
    ----------
    device_root : Path
        Our device sources.
    include_dirs : tuple of Path
        Include path, in search order: ours, CuTe/CUTLASS, CCCL, CUDA runtime, our
        NVSHMEM compatibility headers (``device/compat/nvshmem``), NVSHMEM.
    nvshmem_device_lib : Path or None
        ``libnvshmem_device.a``, linked into kernels that call NVSHMEM.
    versions : dict
        Distribution -> version for everything that shapes the generated code.
    """

    device_root: Path
    include_dirs: Tuple[Path, ...]
    nvshmem_device_lib: Optional[Path]
    versions: Dict[str, str]

    def fingerprint(self) -> str:
        """Digest of the tool versions and our device sources (for cache keys)."""
        h = hashlib.sha256()
        for name in sorted(self.versions):
            h.update(f"{name}={self.versions[name]}\n".encode())
        h.update(device_tree_digest(self.device_root).encode())
        return h.hexdigest()


def _header_dir(libname: str, probe: str, hint: str) -> Path:
    try:
        from cuda.pathfinder import find_nvidia_header_directory
        found = find_nvidia_header_directory(libname)
    except Exception:  # pathfinder missing or too old: fall through to the error
        found = None
    if not found or not (Path(found) / probe).exists():
        raise FlashMoEError(f"cannot find {probe} ({libname} headers); install {hint}")
    return Path(found)


def _cutlass_include() -> Path:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        raise FlashMoEError("cannot find CuTe headers; install nvidia-cutlass==4.2.*")
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    if not (inc / "cute" / "tensor.hpp").exists():
        raise FlashMoEError(f"nvidia-cutlass has no CuTe headers under {inc}; reinstall "
                            "nvidia-cutlass==4.2.*")
    return inc


def _versions() -> Dict[str, str]:
    out = {}
    for dist in _VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


@functools.lru_cache(maxsize=None)
def find_toolchain(device_dir: Optional[str] = None, cutlass_include: Optional[str] = None) -> \
        Toolchain:
    """Locate the tool chain in the installed wheels.

    Parameters
    ----------
    device_dir : str, optional
        Use these device sources instead of the packaged ones.
    cutlass_include : str, optional
        Use this CUTLASS include folder instead of the ``nvidia-cutlass`` wheel's.
    """
    root = device_root(device_dir)
    cute = Path(cutlass_include) if cutlass_include else _cutlass_include()
    cccl = _header_dir("cccl", "cuda/std/cstdint", "nvidia-cuda-cccl==13.0.*")
    cudart = _header_dir("cudart", "cuda_runtime_api.h", "nvidia-cuda-runtime")
    nvshmem = _header_dir("nvshmem", "nvshmem.h", "nvidia-nvshmem-cu13")
    lib = nvshmem.parent / "lib" / "libnvshmem_device.a"
    versions = _versions()
    if not versions["nvidia-cuda-cccl"].startswith("13.0."):
        # CCCL 13.1+ headers fail to compile CuTe (CUTLASS 4.2) under NVRTC.
        raise FlashMoEError(f"nvidia-cuda-cccl {versions['nvidia-cuda-cccl']} is installed; "
                            "CuTe needs 13.0.x: pip install 'nvidia-cuda-cccl==13.0.*'")
    return Toolchain(device_root=root,
                     include_dirs=(root / "include", cute, cccl, cudart,
                                   root / "compat" / "nvshmem", nvshmem),
                     nvshmem_device_lib=lib if lib.exists() else None,
                     versions=versions)


def kit_toolchain(device_dir: Optional[str], versions: Dict[str, str]) -> Toolchain:
    """The tool chain as a kernel kit's builder had it: our device sources with the
    builder's tool versions, so cache keys match the kit's (see :mod:`.kit`).

    It needs no headers and cannot compile: a kit is only ever loaded from.
    """
    root = device_root(device_dir)
    return Toolchain(device_root=root, include_dirs=(root / "include",),
                     nvshmem_device_lib=None, versions=dict(versions))
