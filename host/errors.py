"""Exception types raised by the host runtime (re-exported by ``flashmoe_core``)."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

__all__ = ["FlashMoEError", "CudaUnavailableError", "CompileError", "JitDisabledError",
           "KitMissError", "BootstrapError", "FlashMoETimeout", "KernelFault"]


class FlashMoEError(RuntimeError):
    """Base class of every flashmoe_core runtime error."""


class CudaUnavailableError(FlashMoEError):
    """No usable NVIDIA driver or GPU: a GPU path was asked for on a machine without one."""


class JitDisabledError(FlashMoEError):
    """A kernel is missing from the cache and compiling is switched off."""


class KitMissError(JitDisabledError):
    """A kernel was asked for that the kernel kit in use (FLASHMOE_KERNEL_KIT) lacks."""


class BootstrapError(FlashMoEError):
    """NVSHMEM / MPI start-up failed or was used out of order."""


class CompileError(FlashMoEError):
    """NVRTC or nvJitLink rejected the device code.

    Attributes
    ----------
    log : str
        The compiler's full log (file:line diagnostics).
    options : tuple of str
        The exact compiler flags.
    context : dict
        What was being compiled (kernel, architecture, configuration).
    stage : str
        ``"nvrtc"`` or ``"nvjitlink"``.
    """

    def __init__(self, stage: str, log: str, options: Sequence[str] = (),
                 context: Optional[Mapping[str, Any]] = None) -> None:
        self.stage = stage
        self.log = log
        self.options = tuple(options)
        self.context = dict(context or {})
        ctx = ", ".join(f"{k}={v}" for k, v in self.context.items())
        super().__init__(f"{stage} failed to compile ({ctx})\n{log.strip()}")

    def __reduce__(self):
        return (type(self), (self.stage, self.log, self.options, self.context))


class KernelFault(FlashMoEError):
    """The kernel stopped itself and reported why (record fields as attributes)."""

    def __init__(self, message: str, record: Optional[Mapping[str, Any]] = None) -> None:
        self.record = dict(record or {})
        for key, value in self.record.items():
            setattr(self, key, value)
        super().__init__(message)

    def __reduce__(self):
        return (type(self), (self.args[0], self.record))


class FlashMoETimeout(KernelFault):
    """A bounded device-side wait ran out; the record names who waited for what.

    The record holds at least ``phase``, ``block``, ``task``, ``counter`` and
    ``expected`` (and ``rank``/``peer`` when the wait was on another GPU).
    """
