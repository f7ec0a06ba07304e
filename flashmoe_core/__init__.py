"""flashmoe_core: a distributed Mixture-of-Experts layer as one persistent fused GPU kernel.

Public API:

- :class:`MoEConfig`, :class:`MoEWeights` - what the layer is.
- :class:`MoELayer` - the fused GPU kernel (one GPU, or one rank under MPI); training
  through ``layer(x, save_for_backward=True)`` and ``layer.backward`` (gradients in a
  :class:`MoEGradients`).
- :mod:`flashmoe_core.oracle.reference` - the NumPy oracle (``moe_forward``, ``Routing``).
- :func:`moe_forward_distributed` - the oracle over mpi4py ranks.
- :func:`cuda_available` - whether GPU paths can run here.
- Errors: :class:`FlashMoEError` and its subclasses.
"""

from ._version import __version__
from .config import MoEConfig
from .host.device import cuda_available
from .host.errors import (BootstrapError, CompileError, CudaUnavailableError, FlashMoEError,
                          FlashMoETimeout, JitDisabledError, KernelFault)
from .kernel.training import MoEGradients, SavedForBackward
from .gpu.layer import MoELayer
from .oracle.reference import Routing, moe_forward
from .weights import MoEWeights, random_tokens

__all__ = [
    "__version__", "MoEConfig", "MoEWeights", "MoELayer", "MoEGradients", "SavedForBackward",
    "Routing", "moe_forward",
    "random_tokens",
    "moe_forward_distributed", "cuda_available", "FlashMoEError", "CudaUnavailableError",
    "CompileError", "JitDisabledError", "BootstrapError", "FlashMoETimeout", "KernelFault",
]


def __getattr__(name):
    # mpi4py is imported only when the distributed oracle is asked for.
    if name == "moe_forward_distributed":
        from .oracle.distributed import moe_forward_distributed

        return moe_forward_distributed
    raise AttributeError(f"module 'flashmoe_core' has no attribute {name!r}")
