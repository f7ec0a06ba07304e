"""POSIX shared memory for the emulator's symmetric heaps across processes of one node.

With one emulated PE per MPI process, every PE's symmetric heap is a shared-memory
segment that every process of the job maps: a put or a signal from this process's PE
is then a store into the peer's heap, seen by the peer's process as on one node's
GPUs over NVLink. Segments are named under /dev/shm while the job maps them and
unlinked as soon as every process has (the mappings stay), so nothing is left behind
even when a process dies.
"""

from __future__ import annotations

import mmap
import os
import re
from pathlib import Path

import numpy as np

from .errors import FlashMoEError

__all__ = ["SharedHeap"]

_ROOT = Path("/dev/shm")
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


class SharedHeap:
    """One named shared-memory segment, mapped into this process.

    Parameters
    ----------
    name : str
        Segment name (letters, digits, ``.``, ``_``, ``-``).
    nbytes : int
        Size; a created segment starts zeroed.
    create : bool
        Create it (it must not exist) or attach to one another process created.
    """

    def __init__(self, name: str, nbytes: int, create: bool) -> None:
        if not _NAME.match(name):
            raise ValueError(f"shared-memory segment name {name!r} must be 1-200 letters, "
                             "digits, '.', '_' or '-'")
        if nbytes <= 0:
            raise ValueError(f"nbytes={nbytes} must be positive")
        if not _ROOT.is_dir():
            raise FlashMoEError(f"{_ROOT} is missing: the emulator's cross-process heaps need "
                                "POSIX shared memory (Linux)")
        self.name, self.nbytes, self.path = name, int(nbytes), _ROOT / name
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        try:
            fd = os.open(self.path, flags, 0o600)
        except FileExistsError:
            raise FlashMoEError(f"shared-memory segment {self.path} already exists: another "
                                "job uses the name (remove it if that job is gone)") from None
        except OSError as exc:
            raise FlashMoEError(f"cannot open shared-memory segment {self.path}: {exc}") from None
        try:
            if create:
                os.ftruncate(fd, self.nbytes)
            elif os.fstat(fd).st_size < self.nbytes:
                raise FlashMoEError(f"shared-memory segment {self.path} holds "
                                    f"{os.fstat(fd).st_size} bytes, {self.nbytes} expected")
            self._map = mmap.mmap(fd, self.nbytes)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self._map, np.uint8)

    @property
    def address(self) -> int:
        """Where the segment is mapped in this process."""
        return int(self.array.ctypes.data)

    def unlink(self) -> None:
        """Remove the segment's name (mappings stay valid until closed)."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def close(self) -> None:
        """Unmap the segment (its arrays must not be used afterwards)."""
        self.array = None
        try:
            self._map.close()
        except BufferError:
            pass  # a view is still alive somewhere: the mapping goes with the process
