"""Single device kernels as NumPy-in, NumPy-out functions.

These run one building block of the fused kernel on its own: the kernel tests
compare them with NumPy, and the benchmark's unfused baseline chains them.
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np

from ..host import launch as _launch
from ..host import memory
from ..host.abi import FAULT_RECORD, decode_fault
from ..host.device import get_device
from ..host.errors import FlashMoETimeout
from ..kernel.contract import gemm_operands
from ..kernel.jit import compile_kernel, target_arch
from ..kernel.specs import ACT_IDS, nvshmem_ping_spec, tile_config, tile_gemm_spec
from ..numerics import round_to, storage_dtype

__all__ = ["tile_gemm", "tile_gemm_launch", "nvshmem_ping", "runtime"]


@functools.lru_cache(maxsize=1)
def runtime():
    """(device, stream) of this process's GPU (the current device)."""
    dev = get_device()
    return dev, dev.create_stream()


@functools.lru_cache(maxsize=None)
def _module(spec, arch: str):
    k = compile_kernel(spec, arch)
    return _launch.Module(k.cubin, name=spec.entry, nvshmem=spec.nvshmem)


class TileGemmKernel:
    """The tile GEMM kernel of one element type, loaded and ready to launch on device
    pointers (no copies): the unfused baseline chains these launches."""

    def __init__(self, dtype: str) -> None:
        self.dtype = dtype
        self.device, _ = runtime()
        mod = _module(tile_gemm_spec(dtype), target_arch(self.device))
        self.kernel = mod.kernel("flashmoe_tile_gemm")
        self.smem = int(mod.read_global("flashmoe_tile_gemm_smem", np.int32)[0])
        mod.ensure_smem(self.kernel, self.smem, self.device)
        tile = tile_config(dtype)
        self.bm, self.bn = tile.bm, tile.bn

    def launch(self, stream, a: int, b: int, c: int, m: int, n: int, k: int,
               a_index: int = 0, bias: int = 0, activation: str = "identity",
               gated: bool = False) -> None:
        """C[m, n] = act(A[a_index] B^T + bias) (or the gated form) on raw pointers."""
        if m <= 0:
            return
        tile_n = self.bn // 2 if gated else self.bn
        grid = ((m + self.bm - 1) // self.bm, (n + tile_n - 1) // tile_n, 1)
        args = (np.uint64(a), np.uint64(a_index), np.uint64(b), np.uint64(bias), np.uint64(c),
                np.int32(m), np.int32(n), np.int32(k), np.int32(ACT_IDS[activation]),
                np.int32(1 if gated else 0))
        _launch.launch_kernel(stream, self.kernel, grid, (128, 1, 1), args, smem=self.smem)


@functools.lru_cache(maxsize=None)
def tile_gemm_launch(dtype: str) -> TileGemmKernel:
    """The loaded tile GEMM for an element type (cached per process)."""
    return TileGemmKernel(dtype)


def tile_gemm(a: np.ndarray, b: np.ndarray, dtype: str, bias: Optional[np.ndarray] = None,
              activation: str = "identity", gated: bool = False,
              a_index: Optional[np.ndarray] = None) -> np.ndarray:
    """C = act(A B^T + bias), or act(A Bg^T) * (A Bu^T) when gated, on tensor cores.

    Parameters
    ----------
    a : ndarray [Ma, K]
    b : ndarray [N, K], or [2N, K] (Bg rows then Bu rows) when gated
    dtype : element type name; inputs are rounded to it
    bias : ndarray [N], optional (not with gated)
    a_index : int ndarray [M], optional
        Gather: row m of the product uses A row ``a_index[m]``.

    Returns
    -------
    ndarray [M, N] of the storage type.
    """
    a, b, bias, a_index, m, n, k = gemm_operands(a, b, dtype, bias, activation, gated, a_index)
    dev, stream = runtime()
    kern = tile_gemm_launch(dtype)
    bufs = [memory.upload(dev, a, stream), memory.upload(dev, b, stream)]
    idx = memory.upload(dev, a_index, stream) if a_index is not None else None
    bia = memory.upload(dev, round_to(bias, dtype), stream) if bias is not None else None
    out = memory.alloc(dev, m * n * storage_dtype(dtype).itemsize, stream)
    ptr = lambda buf: 0 if buf is None else int(buf.handle)  # noqa: E731
    kern.launch(stream, ptr(bufs[0]), ptr(bufs[1]), ptr(out), m, n, k, a_index=ptr(idx),
                bias=ptr(bia), activation=activation, gated=gated)
    return memory.download(out, (m, n), storage_dtype(dtype), stream)


def nvshmem_ping(count: int = 64, epoch: int = 1, timeout_s: float = 5.0) -> np.ndarray:
    """Put-with-signal round trip on the NVSHMEM ring of this process's world.

    Every PE sends ``count`` words to the next PE (a put, a fence, the last word with
    the signal) and waits for the previous one's. NVSHMEM must be initialised (world of
    one is fine). Returns the words the kernel read after its signal arrived.

    Raises
    ------
    FlashMoETimeout
        When the signal does not arrive within ``timeout_s``.
    """
    from ..host import bootstrap

    world = bootstrap.current()
    if world is None:
        raise RuntimeError("nvshmem_ping needs NVSHMEM: call flashmoe_core.host.bootstrap.init")
    dev, stream = runtime()
    mod = _module(nvshmem_ping_spec(), target_arch(dev))
    kern = mod.kernel("flashmoe_nvshmem_ping")
    src = np.arange(count, dtype=np.uint64) + np.uint64(1000 * world.rank)
    src_buf = memory.upload(dev, src, stream)
    dst = bootstrap.symmetric_alloc(count * 8)
    sig = bootstrap.symmetric_alloc(8)
    memory.zero(dst, stream)
    memory.zero(sig, stream)
    import nvshmem.core as shmem

    shmem.barrier_all(stream=stream)
    record = memory.PinnedArray(FAULT_RECORD)
    result = memory.alloc(dev, 4, stream)
    memory.zero(result, stream)
    got = memory.alloc(dev, count * 8, stream)
    memory.zero(got, stream)
    args = (np.uint64(int(dst.handle)), np.uint64(int(src_buf.handle)),
            np.uint64(int(sig.handle)), np.int32(count), np.uint64(epoch),
            np.uint64(record.ptr), np.uint64(int(timeout_s * 1e9)),
            np.uint64(int(result.handle)), np.uint64(int(got.handle)))
    _launch.launch_kernel(stream, kern, (1, 1, 1), (32, 1, 1), args)
    stream.sync()
    fault = decode_fault(record.array.tobytes())
    ok = int(memory.download(result, (1,), np.int32, stream)[0])
    received = memory.download(got, (count,), np.uint64, stream)  # what the kernel read
    shmem.barrier_all(stream=stream)
    stream.sync()
    shmem.free(dst)
    shmem.free(sig)
    record.close()
    if fault["code"] != 0 or not ok:
        raise FlashMoETimeout(
            f"PE {fault['rank']} waited {fault['elapsed_ns'] / 1e9:.3f} s for the signal from "
            f"PE {fault['peer']} (phase {fault['phase']}): saw {fault['counter']}, expected "
            f"{fault['expected']}", fault)
    return received
