"""Tensor maps for TMA tile loads (``cp.async.bulk.tensor``): the checks the driver's
``cuTensorMapEncodeTiled`` makes, and the emulator's encoding of the same fields.

A tensor map describes a row-major tensor of up to three dimensions in global memory
(innermost first) and the box one load copies into shared memory, in one of the
shared-memory swizzles. On a GPU the driver encodes it into an opaque 128-byte
CUtensorMap; the CPU emulator reads its own layout of the same fields
(``flashmoe_emu/sm90.h`` EmuTensorMap), which :func:`encode_emulated` writes.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["SWIZZLES", "TENSOR_MAP_BYTES", "check_tiled", "encode_emulated", "encode_tiled"]

SWIZZLES = {"none": 0, "32B": 1, "64B": 2, "128B": 3}
"""Shared-memory swizzles of a tensor map (CU_TENSOR_MAP_SWIZZLE_*)."""

TENSOR_MAP_BYTES = 128
_MAGIC = 0x4D544D46  # "FMTM", the emulator's mark

_EMU_MAP = np.dtype({"names": ["magic", "elem_bytes", "rank", "swizzle", "address", "dims",
                               "strides", "box"],
                     "formats": ["<u4", "<u4", "<u4", "<u4", "<u8", ("<u8", 3), ("<u8", 2),
                                 ("<u4", 3)],
                     "offsets": [0, 4, 8, 12, 16, 24, 48, 64], "itemsize": TENSOR_MAP_BYTES})


def check_tiled(address: int, elem_bytes: int, dims: Sequence[int], strides: Sequence[int],
                box: Sequence[int], swizzle: str) -> None:
    """Raise ValueError for a tiled tensor map the driver would refuse (or TMA could not
    load), naming the field.

    Parameters
    ----------
    address : int
        Global address of element 0 (16-byte aligned).
    elem_bytes : int
        1, 2, 4 or 8.
    dims : sequence of int
        Elements per dimension, innermost first (1 to 3 dimensions).
    strides : sequence of int
        Bytes between consecutive indices of dimensions 1.. (multiples of 16).
    box : sequence of int
        Elements per dimension of one load (1 to 256 each).
    swizzle : str
        One of :data:`SWIZZLES`; a swizzled box's inner dimension spans at most the
        swizzle's bytes.
    """
    rank = len(dims)
    if not 1 <= rank <= 3:
        raise ValueError(f"a tensor map has 1 to 3 dimensions here, got {rank}")
    if elem_bytes not in (1, 2, 4, 8):
        raise ValueError(f"elem_bytes must be 1, 2, 4 or 8, got {elem_bytes}")
    if len(strides) != rank - 1 or len(box) != rank:
        raise ValueError(f"{rank} dimensions need {rank - 1} strides and {rank} box sizes; got "
                         f"{len(strides)} and {len(box)}")
    if address % 16:
        raise ValueError(f"the tensor's address {address:#x} is not 16-byte aligned")
    if any(d < 1 or d >= 2**32 for d in dims):
        raise ValueError(f"dims {list(dims)} must be in [1, 2^32)")
    if any(s % 16 or s <= 0 for s in strides):
        raise ValueError(f"strides {list(strides)} (bytes) must be positive multiples of 16")
    if any(not 1 <= b <= 256 for b in box):
        raise ValueError(f"box {list(box)} must be 1..256 elements per dimension")
    if (box[0] * elem_bytes) % 16:
        raise ValueError(f"the box's inner dimension ({box[0]} x {elem_bytes} B) must be a "
                         "multiple of 16 bytes")
    if swizzle not in SWIZZLES:
        raise ValueError(f"swizzle must be one of {sorted(SWIZZLES)}, got {swizzle!r}")
    span = 0 if swizzle == "none" else 16 << SWIZZLES[swizzle]
    if span and box[0] * elem_bytes > span:
        raise ValueError(f"a {swizzle} swizzle takes boxes of at most {span} B per row; "
                         f"box[0] = {box[0]} x {elem_bytes} B")


def encode_emulated(address: int, elem_bytes: int, dims: Sequence[int], strides: Sequence[int],
                    box: Sequence[int], swizzle: str = "none") -> np.ndarray:
    """The emulator's 128-byte tensor map (uint8, 64-byte aligned) for these fields,
    checked as :func:`check_tiled` checks them."""
    check_tiled(address, elem_bytes, dims, strides, box, swizzle)
    raw = np.zeros(TENSOR_MAP_BYTES + 64, np.uint8)
    start = (-raw.ctypes.data) % 64
    out = raw[start:start + TENSOR_MAP_BYTES]
    rec = np.zeros((), _EMU_MAP)
    rank = len(dims)
    rec["magic"], rec["elem_bytes"], rec["rank"] = _MAGIC, elem_bytes, rank
    rec["swizzle"], rec["address"] = SWIZZLES[swizzle], address
    rec["dims"][:rank] = dims
    rec["strides"][:rank - 1] = strides
    rec["box"][:rank] = box
    out[...] = np.frombuffer(rec.tobytes(), np.uint8)
    return out


_DATA_TYPES = {1: "CU_TENSOR_MAP_DATA_TYPE_UINT8", 2: "CU_TENSOR_MAP_DATA_TYPE_UINT16",
               4: "CU_TENSOR_MAP_DATA_TYPE_UINT32", 8: "CU_TENSOR_MAP_DATA_TYPE_UINT64"}
_DRIVER_SWIZZLES = {"none": "CU_TENSOR_MAP_SWIZZLE_NONE", "32B": "CU_TENSOR_MAP_SWIZZLE_32B",
                    "64B": "CU_TENSOR_MAP_SWIZZLE_64B", "128B": "CU_TENSOR_MAP_SWIZZLE_128B"}


def encode_tiled(address: int, elem_bytes: int, dims: Sequence[int], strides: Sequence[int],
                 box: Sequence[int], swizzle: str = "none") -> bytes:
    """The driver's 128-byte tensor map (``cuTensorMapEncodeTiled``) for these fields,
    checked first as :func:`check_tiled` checks them; needs a GPU of compute capability
    9.0 or later and a current context.

    Elements are copied as unsigned integers of their width (TMA moves bits; the
    kernel reads them as its storage type); loads past the tensor's end fill zeros.
    """
    from cuda.bindings import driver

    from .driver import check

    check_tiled(address, elem_bytes, dims, strides, box, swizzle)
    rank = len(dims)
    m = check(driver.cuTensorMapEncodeTiled(
        getattr(driver.CUtensorMapDataType, _DATA_TYPES[elem_bytes]), rank, address,
        [driver.cuuint64_t(int(d)) for d in dims],
        [driver.cuuint64_t(int(s)) for s in strides],
        [driver.cuuint32_t(int(b)) for b in box], [driver.cuuint32_t(1)] * rank,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        getattr(driver.CUtensorMapSwizzle, _DRIVER_SWIZZLES[swizzle]),
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
        f"encoding a tensor map (dims {list(dims)}, box {list(box)}, swizzle {swizzle})")
    raw = np.array(m.opaque, dtype="<u8").tobytes()
    if len(raw) != TENSOR_MAP_BYTES:
        raise ValueError(f"the driver's tensor map has {len(raw)} bytes, expected "
                         f"{TENSOR_MAP_BYTES}")
    return raw
