"""GPU discovery: is there a usable GPU, which one, and what architecture.

Without a driver, ``cuda.core.Device()`` fails deep in the library loader; here that
becomes one :class:`CudaUnavailableError` with a plain explanation.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

from .errors import CudaUnavailableError

__all__ = ["probe", "cuda_available", "get_device", "device_arch", "device_count"]


@functools.lru_cache(maxsize=1)
def probe() -> Tuple[bool, str]:
    """(usable, reason): whether a GPU and driver answer, and why not if they don't."""
    try:
        from cuda.bindings import driver
        from cuda.core import Device
    except Exception as exc:  # broken install
        return False, f"cuda.core cannot be imported ({exc}); pip install cuda-core"
    try:
        (err,) = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            return False, f"the CUDA driver failed to initialise ({err.name})"
        err, n = driver.cuDeviceGetCount()
    except Exception as exc:
        name = type(exc).__name__
        if "DynamicLib" in name:
            return False, "no NVIDIA driver is installed on this machine (libcuda not found)"
        return False, f"the CUDA driver does not answer ({name}: {exc})"
    if err != driver.CUresult.CUDA_SUCCESS or n < 1:
        return False, "the NVIDIA driver reports no GPU"
    try:
        Device(0)
    except Exception as exc:
        return False, f"GPU 0 cannot be opened ({type(exc).__name__}: {exc})"
    return True, f"{n} GPU(s)"


def cuda_available() -> bool:
    """True when an NVIDIA GPU and driver are usable from this process."""
    return probe()[0]


def device_count() -> int:
    if not cuda_available():
        return 0
    from cuda.bindings import driver

    return int(driver.cuDeviceGetCount()[1])


def get_device(device_id: Optional[int] = None):
    """The ``cuda.core.Device``, made current on this thread.

    Raises
    ------
    CudaUnavailableError
        With the reason, when there is no usable GPU.
    """
    ok, why = probe()
    if not ok:
        raise CudaUnavailableError(
            f"this needs an NVIDIA GPU, but {why}. Use the reference backend "
            "(--backend reference) on a machine without a GPU.")
    from cuda.core import Device

    n = device_count()
    did = 0 if device_id is None else int(device_id)
    if not 0 <= did < n:
        raise CudaUnavailableError(f"GPU {did} does not exist; this machine has {n}")
    dev = Device(did)
    dev.set_current()
    return dev


def device_arch(dev) -> str:
    """Compile target for a device: ``sm_90a`` on Hopper (wgmma), ``sm_XY`` elsewhere."""
    major, minor = dev.compute_capability
    if major < 8:
        raise CudaUnavailableError(
            f"{dev.name} has compute capability {major}.{minor}; flashmoe_core needs 8.0 or "
            "newer (Ampere, Ada, Hopper, Blackwell)")
    if (major, minor) == (9, 0):
        return "sm_90a"
    if major >= 10:
        return f"sm_{major}{minor}a"
    return f"sm_{major}{minor}"
