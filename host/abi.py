"""Python mirror of the kernel ABI (device/include/flashmoe/abi.cuh).

Each struct is a NumPy structured dtype with explicit offsets. ``abi_defines()``
turns the mirror into the macros that ``kernels/abi_check.cu`` static-asserts
against the C++ layout, so a change on one side alone fails to compile.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

__all__ = ["ABI_VERSION", "FAULT_RECORD", "STRUCTS", "FAULT_CODES", "abi_defines", "decode_fault"]

ABI_VERSION = 1

FAULT_CODES = {0: "ok", 1: "timeout", 2: "protocol", 3: "bad_launch"}


def _struct(fields, size: int) -> np.dtype:
    names = [f[0] for f in fields]
    formats = [f[1] for f in fields]
    offsets = [f[2] for f in fields]
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": size})


FAULT_RECORD = _struct([
    ("code", "<u4", 0),
    ("phase", "<i4", 4),
    ("block", "<i4", 8),
    ("task", "<i4", 12),
    ("counter", "<i8", 16),
    ("expected", "<i8", 24),
    ("rank", "<i4", 32),
    ("peer", "<i4", 36),
    ("elapsed_ns", "<u8", 40),
    ("epoch", "<u4", 48),
], 64)

STRUCTS: Dict[str, np.dtype] = {"FaultRecord": FAULT_RECORD}


def abi_defines() -> Dict[str, int]:
    """Macros describing every field offset and struct size of the mirror."""
    out = {"FMOE_ABI_VERSION": ABI_VERSION}
    for sname, dt in STRUCTS.items():
        out[f"FMOE_SIZE_{sname}"] = dt.itemsize
        for fname in dt.names:
            out[f"FMOE_OFF_{sname}_{fname}"] = dt.fields[fname][1]
    return out


def decode_fault(raw: bytes) -> dict:
    """A FaultRecord's bytes as a plain dict (code as its name)."""
    rec = np.frombuffer(raw, dtype=FAULT_RECORD, count=1)[0]
    out = {name: int(rec[name]) for name in FAULT_RECORD.names}
    out["code_name"] = FAULT_CODES.get(out["code"], f"unknown({out['code']})")
    return out
