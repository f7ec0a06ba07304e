"""Loading cubins and launching kernels (the only module that calls ``launch``).

Launch-time rules kept here:
- dynamic shared memory above 48 KiB needs a per-kernel opt-in, which cuda.core
  does not do for us;
- persistent kernels must have every block co-resident: their grid comes from the
  occupancy API for the actual kernel, block size and shared memory on this GPU,
  never from a hard-coded SM count;
- kernel arguments are given exact widths by the caller (NumPy scalars), because a
  Python int is passed as 64 bits.
"""

from __future__ import annotations

from typing import Any, Sequence, Tuple

import numpy as np

from .driver import check as _check
from .errors import BootstrapError, FlashMoEError

__all__ = ["Module", "launch_kernel", "resident_grid"]

_DEFAULT_SMEM_LIMIT = 48 * 1024


def _nvshmem_release(shmem) -> str:
    """The release of the libnvshmem_host that nvshmem4py loaded, or why it is unknown."""
    try:
        return f"libnvshmem {shmem.get_version().libnvshmem_version}"
    except Exception as exc:  # only ever used in an error message
        return f"unknown: {type(exc).__name__}"


class Module:
    """A loaded cubin and its kernels.

    Parameters
    ----------
    cubin : bytes
    name : str
        For messages.
    nvshmem : bool
        Register the module with NVSHMEM (which must be initialised already): it
        fills the module's copy of the NVSHMEM device state.
    """

    def __init__(self, cubin: bytes, name: str = "", nvshmem: bool = False) -> None:
        from cuda.core import ObjectCode

        self.name = name
        self._obj = ObjectCode.from_cubin(cubin, name=name or "flashmoe")
        self._kernels = {}
        self._smem_optin = set()
        self._nvshmem_obj = None
        if nvshmem:
            try:
                import nvshmem.core as shmem
                from nvshmem.core import NvshmemKernelObject
            except ImportError as exc:
                raise BootstrapError(f"nvshmem4py is missing ({exc}); pip install "
                                     "nvshmem4py-cu13") from None
            self._nvshmem_obj = NvshmemKernelObject.from_obj(self._obj)
            try:
                shmem.library_init(self._nvshmem_obj)
            except Exception as exc:
                raise BootstrapError(
                    f"registering {name} with NVSHMEM failed ({exc}); initialise NVSHMEM "
                    f"first, and link the kernel against the libnvshmem_device.a of the "
                    f"loaded host library's release ({_nvshmem_release(shmem)}): another "
                    "release's device library fails this step") from None

    def kernel(self, name: str):
        """The ``cuda.core.Kernel`` called ``name`` (an ``extern "C"`` symbol)."""
        k = self._kernels.get(name)
        if k is None:
            k = self._kernels[name] = self._obj.get_kernel(name)
        return k

    def read_global(self, name: str, dtype: Any, count: int = 1) -> np.ndarray:
        """Read a ``__device__`` variable of the module (e.g. a size it exports)."""
        from cuda.bindings import driver

        dptr, nbytes = _check(driver.cuLibraryGetGlobal(self._obj.handle, name.encode()),
                              f"looking up {name} in {self.name}")
        dt = np.dtype(dtype)
        out = np.empty(count, dtype=dt)
        if int(nbytes) < out.nbytes:
            raise FlashMoEError(f"{name} in {self.name} has {nbytes} bytes, not {out.nbytes}")
        _check(driver.cuMemcpyDtoH(out.ctypes.data, dptr, out.nbytes), f"reading {name}")
        return out

    def ensure_smem(self, kernel, nbytes: int, device) -> None:
        """Opt the kernel in to ``nbytes`` of dynamic shared memory on ``device``."""
        key = (id(kernel), device.device_id)
        if nbytes <= _DEFAULT_SMEM_LIMIT or key in self._smem_optin:
            return
        limit = int(device.properties.max_shared_memory_per_block_optin)
        if nbytes > limit:
            raise FlashMoEError(f"kernel needs {nbytes} B of shared memory per block; "
                                f"{device.name} allows {limit}")
        from cuda.bindings import driver

        attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _check(driver.cuKernelSetAttribute(attr, nbytes, kernel.handle, device.device_id),
               "setting the dynamic shared-memory limit")
        self._smem_optin.add(key)

    def close(self) -> None:
        """Unregister from NVSHMEM (if registered). The cubin stays loaded."""
        if self._nvshmem_obj is not None:
            import nvshmem.core as shmem

            try:
                shmem.library_finalize(self._nvshmem_obj)
            finally:
                self._nvshmem_obj = None


def resident_grid(kernel, device, block: int, smem: int) -> Tuple[int, int]:
    """(blocks, blocks_per_sm): the largest grid whose blocks can all be resident."""
    per_sm = int(kernel.occupancy.max_active_blocks_per_multiprocessor(block, smem))
    if per_sm < 1:
        raise FlashMoEError(f"the kernel cannot run with {block} threads and {smem} B of "
                            f"shared memory per block on {device.name}")
    return per_sm * int(device.properties.multiprocessor_count), per_sm


def launch_kernel(stream, kernel, grid: Sequence[int], block: Sequence[int], args: Sequence[Any],
                  smem: int = 0) -> None:
    """Launch on ``stream`` (stream-ordered, returns at once)."""
    from cuda.core import LaunchConfig, launch

    cfg = LaunchConfig(grid=tuple(grid), block=tuple(block), shmem_size=int(smem))
    launch(stream, cfg, kernel, *args)
