"""Device and pinned host memory: allocation and NumPy copies in and out."""

from __future__ import annotations

import ctypes
from typing import Sequence

import numpy as np

from .driver import check

__all__ = ["alloc", "upload", "download", "download_from", "zero", "copy_device",
           "PinnedArray"]


def alloc(device, nbytes: int, stream):
    """Stream-ordered device allocation of at least one byte (a cuda.core Buffer)."""
    return device.allocate(max(int(nbytes), 1), stream=stream)


def zero(buf, stream) -> None:
    """Set every byte of a device buffer to 0, stream-ordered."""
    from cuda.bindings import driver

    check(driver.cuMemsetD8Async(int(buf.handle), 0, buf.size, _stream_handle(stream)),
          "clearing device memory")


def _stream_handle(stream):
    return int(stream.handle)


def upload(device, array: np.ndarray, stream):
    """Copy a host array to a new device buffer (waits for the copy: the array may go)."""
    a = np.ascontiguousarray(array)
    buf = alloc(device, a.nbytes, stream)
    if a.nbytes:
        from cuda.bindings import driver

        check(driver.cuMemcpyHtoDAsync(int(buf.handle), a.ctypes.data, a.nbytes,
                                       _stream_handle(stream)), "copying to the GPU")
        stream.sync()
    return buf


def copy_in(buf, array: np.ndarray, stream, offset: int = 0) -> None:
    """Copy a host array into an existing device buffer at a byte offset, then wait."""
    a = np.ascontiguousarray(array)
    if offset + a.nbytes > buf.size:
        raise ValueError(f"{a.nbytes} B at offset {offset} do not fit a {buf.size} B buffer")
    if a.nbytes:
        from cuda.bindings import driver

        check(driver.cuMemcpyHtoDAsync(int(buf.handle) + offset, a.ctypes.data, a.nbytes,
                                       _stream_handle(stream)), "copying to the GPU")
        stream.sync()


def copy_device(dst: int, src: int, nbytes: int, stream) -> None:
    """Copy ``nbytes`` between device addresses, stream-ordered (returns at once)."""
    if nbytes:
        from cuda.bindings import driver

        check(driver.cuMemcpyDtoDAsync(int(dst), int(src), int(nbytes), _stream_handle(stream)),
              "copying on the GPU")


def download(buf, shape: Sequence[int], dtype, stream, offset: int = 0) -> np.ndarray:
    """Copy device memory into a new host array (waits for the stream)."""
    return download_from(int(buf.handle) + offset, shape, dtype, stream)


def download_from(ptr: int, shape: Sequence[int], dtype, stream) -> np.ndarray:
    """Copy device memory at address ``ptr`` into a new host array (waits for the stream)."""
    out = np.empty(tuple(shape), dtype=np.dtype(dtype))
    if out.nbytes:
        from cuda.bindings import driver

        check(driver.cuMemcpyDtoHAsync(out.ctypes.data, int(ptr), out.nbytes,
                                       _stream_handle(stream)), "copying from the GPU")
    stream.sync()
    return out


class PinnedArray:
    """Page-locked host memory the GPU can read and write directly (zero copy).

    The host sees kernel writes without a copy, which is how a kernel reports a
    fault while the host has not synchronised.
    """

    def __init__(self, dtype, count: int = 1) -> None:
        from cuda.core import LegacyPinnedMemoryResource

        self.dtype = np.dtype(dtype)
        nbytes = max(self.dtype.itemsize * count, 1)
        self._buf = LegacyPinnedMemoryResource().allocate(nbytes)
        raw = (ctypes.c_char * nbytes).from_address(int(self._buf.handle))
        self.array = np.frombuffer(raw, dtype=self.dtype, count=count)
        self.array[...] = np.zeros((), dtype=self.dtype)

    @property
    def ptr(self) -> int:
        """Address the GPU uses (unified addressing)."""
        return int(self._buf.handle)

    def close(self) -> None:
        self._buf.close()
