"""Tensors in and out of kernels: DLPack views (zero copy) and DLPack exports.

Any object with ``__dlpack__`` (CuPy, PyTorch, JAX, cuda.core views) is viewed
through ``cuda.core``'s StridedMemoryView with the consumer stream, so the producer's
pending work is ordered before ours. Results go back as DLPack-exporting views of our
buffers, converted to the caller's array type where we know it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

import numpy as np

__all__ = ["TensorView", "view_tensor", "export_tensor", "is_dlpack_gpu_tensor"]


@dataclasses.dataclass
class TensorView:
    """A device tensor as the kernel sees it (``owner`` keeps the memory alive)."""

    ptr: int
    shape: Tuple[int, ...]
    strides: Optional[Tuple[int, ...]]  # in elements; None means C-contiguous
    dtype: np.dtype
    device_id: int
    readonly: bool
    owner: Any

    @property
    def is_c_contiguous(self) -> bool:
        if self.strides is None:
            return True
        expect, acc = [], 1
        for n in reversed(self.shape):
            expect.append(acc)
            acc *= n
        return tuple(reversed(expect)) == tuple(self.strides) or 0 in self.shape


def is_dlpack_gpu_tensor(obj: Any) -> bool:
    """True for objects that export DLPack from a CUDA device."""
    if isinstance(obj, np.ndarray) or not hasattr(obj, "__dlpack__"):
        return False
    try:
        dev_type, _ = obj.__dlpack_device__()
    except Exception:
        return False
    return int(dev_type) in (2, 13)  # kDLCUDA, kDLCUDAManaged


def view_tensor(obj: Any, stream_ptr: int) -> TensorView:
    """View a DLPack GPU tensor, ordering its producer's work before the consumer
    stream ``stream_ptr`` (-1: no ordering, e.g. while capturing a graph)."""
    from cuda.core.utils import StridedMemoryView

    v = StridedMemoryView.from_dlpack(obj, stream_ptr=int(stream_ptr))
    strides = v.strides
    return TensorView(ptr=int(v.ptr), shape=tuple(v.shape),
                      strides=None if strides is None else tuple(strides),
                      dtype=np.dtype(v.dtype), device_id=int(v.device_id),
                      readonly=bool(v.readonly), owner=(obj, v))


def export_tensor(buf, shape: Tuple[int, ...], dtype: np.dtype, like: Any = None) -> Any:
    """A DLPack-exporting view of ``buf``, converted to ``like``'s array type if known."""
    from cuda.core.utils import StridedMemoryView

    view = StridedMemoryView.from_buffer(buf, tuple(shape), dtype=np.dtype(dtype))
    module = type(like).__module__.split(".")[0] if like is not None else ""
    try:
        if module == "cupy":
            import cupy

            return cupy.from_dlpack(view)
        if module == "torch":
            import torch

            return torch.from_dlpack(view)
        if module in ("jax", "jaxlib"):
            import jax.dlpack

            return jax.dlpack.from_dlpack(view)
    except Exception:  # the framework refused this dtype or device: hand back the view
        return view
    return view
