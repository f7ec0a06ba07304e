"""Python mirror of the kernel ABI (device/include/flashmoe/abi.cuh).

Each struct is a NumPy structured dtype with explicit offsets. ``abi_defines()``
turns the mirror into the macros that ``kernels/abi_check.cu`` static-asserts
against the C++ layout, so a change on one side alone fails to compile.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

__all__ = ["ABI_VERSION", "FAULT_RECORD", "MOE_LAYOUT", "STRUCTS", "FAULT_CODES", "STATE",
           "STATE_WORDS", "MODES", "MOE_LAYOUT_POINTERS", "MOE_EP_POINTERS", "TRACE_RECORD",
           "TASK_KINDS", "TRACE_PHASES", "abi_defines", "decode_fault"]

ABI_VERSION = 4

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

_PTR = "<u8"  # device pointers travel as 64-bit integers
MOE_LAYOUT_POINTERS = (
    "router_t", "w_up", "w_up2", "b_up", "w_down", "b_down", "logits", "topk_expert",
    "topk_weight", "token_rows", "row_token", "tile_counts", "expert_total", "expert_kept",
    "tile_kept", "z", "y_expert", "dep_rowtile", "dep_combine", "ring", "state", "fault")
MOE_EP_POINTERS = (
    "recv_rows", "send_rows", "headers", "headers_out", "header_sig", "dispatch_sig",
    "return_sig", "done_sig", "z_remote", "y_remote", "dep_remote", "expert_owner",
    "expert_local")
MOE_LAYOUT = _struct(
    [(name, _PTR, 8 * i) for i, name in enumerate(MOE_LAYOUT_POINTERS)]
    + [("timeout_ns", "<u8", 176), ("max_tokens", "<i4", 184), ("experts", "<i4", 188),
       ("local_experts", "<i4", 192), ("first_expert", "<i4", 196),
       ("max_rowtiles", "<i4", 200), ("ring_capacity", "<i4", 204), ("rank", "<i4", 208),
       ("world", "<i4", 212)]
    + [(name, _PTR, 216 + 8 * i) for i, name in enumerate(MOE_EP_POINTERS)]
    + [("delay_ns", "<u8", 320), ("slot_rows", "<i4", 328), ("max_peer_tiles", "<i4", 332),
       ("max_local_experts", "<i4", 336), ("trace_capacity", "<i4", 340),
       ("trace", _PTR, 344)], 352)

TRACE_RECORD = _struct([("start_ns", "<u8", 0), ("end_ns", "<u8", 8), ("block", "<u4", 16),
                        ("what", "<u4", 20)], 24)

# Words of MoeLayout.state and the kernel's modes (abi.cuh StateWord / Mode).
STATE_WORDS = 16
STATE = {"epoch": 0, "barrier": 1, "exit": 2, "head": 3, "published": 4, "traced": 5}
MODES = {"full": 0, "gate_only": 1, "dispatch_only": 2, "combine_only": 3, "comm_only": 4}
# What a trace record's `what` names: task kinds (low 3 bits of a descriptor) and phases.
TASK_KINDS = {0: "up", 1: "down", 2: "combine", 3: "send", 4: "up (remote)",
              5: "down (remote)"}
TRACE_PHASES = {8: "gate", 9: "top-k", 10: "scan", 11: "lists", 12: "headers",
                13: "subscriber", 14: "wait for task"}

STRUCTS: Dict[str, np.dtype] = {"FaultRecord": FAULT_RECORD, "MoeLayout": MOE_LAYOUT,
                                "TraceRecord": TRACE_RECORD}


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
