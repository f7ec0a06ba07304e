"""NVSHMEM start-up and shut-down through nvshmem4py, bootstrapped over mpi4py.

One PE per process. Rank 0 draws an NVSHMEM unique id and broadcasts it over the
MPI communicator (this avoids tying NVSHMEM's MPI plugin to the MPI that mpi4py
was built with); a single process needs no MPI at all (world of one). NVSHMEM is
finalised at interpreter exit, or explicitly with :func:`finalize`.
"""

from __future__ import annotations

import atexit
import dataclasses
from typing import Optional

import numpy as np

from .errors import BootstrapError

__all__ = ["ShmemWorld", "init", "finalize", "current", "symmetric_alloc"]


@dataclasses.dataclass
class ShmemWorld:
    """The NVSHMEM world this process belongs to."""

    rank: int
    size: int
    device_id: int
    comm: object = None
    heap_bytes: int = 0


_world: Optional[ShmemWorld] = None
_atexit_registered = False


def current() -> Optional[ShmemWorld]:
    """The active world, or None before init / after finalize."""
    return _world


def init(device, comm=None, heap_bytes: int = 0) -> ShmemWorld:
    """Initialise NVSHMEM for this process on ``device`` (idempotent).

    Parameters
    ----------
    device : cuda.core.Device
        Already made current.
    comm : mpi4py communicator, optional
        All PEs; None for a single-process world.
    heap_bytes : int
        Symmetric heap size to start NVSHMEM with (exported as NVSHMEM_SYMMETRIC_SIZE,
        which NVSHMEM reads at start-up); 0 keeps NVSHMEM's default.

    Raises
    ------
    BootstrapError
        If NVSHMEM is already up with another world or device, or start-up fails.
    """
    global _world, _atexit_registered
    rank = 0 if comm is None else int(comm.Get_rank())
    size = 1 if comm is None else int(comm.Get_size())
    if _world is not None:
        if (_world.rank, _world.size, _world.device_id) == (rank, size, device.device_id):
            if heap_bytes > _world.heap_bytes > 0:
                raise BootstrapError(
                    f"NVSHMEM runs with a {_world.heap_bytes} B symmetric heap; this layer "
                    f"needs {heap_bytes} B. Create the largest layer first, or set "
                    "NVSHMEM_SYMMETRIC_SIZE before the first one")
            return _world
        raise BootstrapError(
            f"NVSHMEM is already initialised as PE {_world.rank}/{_world.size} on GPU "
            f"{_world.device_id}; call finalize() before initialising as PE {rank}/{size} "
            f"on GPU {device.device_id}")
    if heap_bytes > 0:
        import os

        os.environ["NVSHMEM_SYMMETRIC_SIZE"] = str(int(heap_bytes))
    try:
        import nvshmem.core as shmem
    except ImportError as exc:
        raise BootstrapError(f"nvshmem4py is missing ({exc}); pip install nvshmem4py-cu13") \
            from None
    try:
        uid = shmem.get_unique_id(empty=rank != 0)
        if comm is not None and size > 1:
            view = uid._data.view(np.int8)  # nvshmem4py keeps the id bytes here
            comm.Bcast(view, root=0)
        shmem.init(device=device, uid=uid, rank=rank, nranks=size, initializer_method="uid")
    except Exception as exc:
        raise BootstrapError(f"NVSHMEM start-up failed on PE {rank}/{size} (GPU "
                             f"{device.device_id}): {exc}") from None
    got_rank, got_size = int(shmem.my_pe()), int(shmem.n_pes())
    if (got_rank, got_size) != (rank, size):
        raise BootstrapError(f"NVSHMEM reports PE {got_rank}/{got_size}, MPI says "
                             f"{rank}/{size}")
    _world = ShmemWorld(rank=rank, size=size, device_id=device.device_id, comm=comm,
                        heap_bytes=int(heap_bytes))
    if not _atexit_registered:
        atexit.register(finalize)
        _atexit_registered = True
    return _world


def finalize() -> None:
    """Shut NVSHMEM down (frees every symmetric buffer); no-op if not running."""
    global _world
    if _world is None:
        return
    import nvshmem.core as shmem

    try:
        shmem.finalize()
    finally:
        _world = None


def symmetric_alloc(nbytes: int):
    """Collective symmetric allocation (every PE calls it with the same size)."""
    if _world is None:
        raise BootstrapError("symmetric memory needs NVSHMEM: call init() first")
    import nvshmem.core as shmem

    return shmem.buffer(max(int(nbytes), 8))
