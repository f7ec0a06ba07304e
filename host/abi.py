"""Python mirror of the kernel ABI (device/include/flashmoe/abi.cuh).

Each struct is a NumPy structured dtype with explicit offsets. ``abi_defines()``
turns the mirror into the macros that ``kernels/abi_check.cu`` static-asserts
against the C++ layout, so a change on one side alone fails to compile.
"""

from __future__ import annotations

from typing import Dict

import numpy as np

__all__ = ["ABI_VERSION", "FAULT_RECORD", "MOE_LAYOUT", "MOE_BACKWARD_LAYOUT",
           "MOE_BACKWARD_POINTERS", "MOE_BACKWARD_EP_POINTERS", "BWD_TASK_KINDS",
           "BWD_GRAD_POINTERS", "BWD_GRAD_INDEX", "MOE_BACKWARD_SHARED_POINTERS", "STRUCTS", "ENUMS", "FAULT_CODES",
           "STATE", "STATE_WORDS", "MODES", "MOE_LAYOUT_POINTERS", "MOE_EP_POINTERS",
           "TRACE_RECORD", "TASK_KINDS", "TRACE_PHASES", "PHASES", "DTYPE_IDS", "ACT_IDS",
           "NO_EXPERT", "ROW_DROPPED", "ROW_MARKED", "TENSOR_MAPS", "TENSOR_MAP_SLOTS",
           "abi_defines", "decode_fault"]

ABI_VERSION = 10


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
MOE_SHARED_POINTERS = (
    "ws_up", "ws_up2", "bs_up", "ws_down", "bs_down", "ws_gate", "shared_scale", "zs", "ys",
    "dep_shared", "pre_s")
MOE_LAYOUT = _struct(
    [(name, _PTR, 8 * i) for i, name in enumerate(MOE_LAYOUT_POINTERS)]
    + [("timeout_ns", "<u8", 176), ("max_tokens", "<i4", 184), ("experts", "<i4", 188),
       ("local_experts", "<i4", 192), ("reserved0", "<i4", 196),
       ("max_rowtiles", "<i4", 200), ("ring_capacity", "<i4", 204), ("rank", "<i4", 208),
       ("world", "<i4", 212)]
    + [(name, _PTR, 216 + 8 * i) for i, name in enumerate(MOE_EP_POINTERS)]
    + [("delay_ns", "<u8", 320), ("slot_rows", "<i4", 328), ("max_peer_tiles", "<i4", 332),
       ("max_local_experts", "<i4", 336), ("trace_capacity", "<i4", 340),
       ("trace", _PTR, 344), ("router_bias", _PTR, 352), ("selection_bias", _PTR, 360),
       ("pre", _PTR, 368), ("pre_remote", _PTR, 376), ("recv_saved", _PTR, 384)]
    + [(name, _PTR, 392 + 8 * i) for i, name in enumerate(MOE_SHARED_POINTERS)]
    + [("tensor_maps", _PTR, 480)], 488)

# The backward kernel's layout: pointers first, then its sizes.
MOE_BACKWARD_POINTERS = (
    "router_b", "w_up_b", "w_down_b", "dye", "dye_t", "z_t", "xg_t", "da", "da_t", "dxe", "dz",
    "dz_t", "x_t", "dep_dx", "dep_expert", "dep_dxsum", "ring")
MOE_BACKWARD_EP_POINTERS = ("da_remote", "dxe_remote", "dep_remote")
MOE_BACKWARD_SHARED_POINTERS = ("ws_up_b", "ws_down_b", "dys", "dys_t", "zs_t", "das", "das_t",
                                "dxs", "dep_sh", "d_weights")
MOE_BACKWARD_LAYOUT = _struct(
    [(name, _PTR, 8 * i) for i, name in enumerate(MOE_BACKWARD_POINTERS)]
    + [("delay_ns", "<u8", 136), ("ring_capacity", "<i4", 144), ("rp_capacity", "<i4", 148),
       ("tp_capacity", "<i4", 152), ("reserved0", "<i4", 156)]
    + [(name, _PTR, 160 + 8 * i) for i, name in enumerate(MOE_BACKWARD_EP_POINTERS)]
    + [(name, _PTR, 184 + 8 * i) for i, name in enumerate(MOE_BACKWARD_SHARED_POINTERS)], 264)

TRACE_RECORD = _struct([("start_ns", "<u8", 0), ("end_ns", "<u8", 8), ("block", "<u4", 16),
                        ("what", "<u4", 20)], 24)

# Every enum of abi.cuh by its C++ names and values. The ABI check compiles each value
# against the header and a CPU test checks that no enumerator is missing; the maps
# below are views of these tables, so a value lives in one place on each side.
ENUMS: Dict[str, Dict[str, int]] = {
    "FaultCode": {"kOk": 0, "kTimeout": 1, "kProtocol": 2, "kBadLaunch": 3},
    "StateWord": {"kEpoch": 0, "kBarrier": 1, "kExit": 2, "kHead": 3, "kPublished": 4,
                  "kTraced": 5, "kStateWords": 16},
    "Mode": {"kModeFull": 0, "kModeGateOnly": 1, "kModeDispatchOnly": 2,
             "kModeCombineOnly": 3, "kModeCommOnly": 4, "kModeRouted": 5},
    "TraceKind": {"kTraceGate": 8, "kTraceTopk": 9, "kTraceScan": 10, "kTraceLists": 11,
                  "kTraceHeaders": 12, "kTraceSubscriber": 13, "kTraceWait": 14},
    "TaskKind": {"kUp": 0, "kDown": 1, "kCombine": 2, "kSend": 3, "kUpRemote": 4,
                 "kDownRemote": 5, "kSharedUp": 6, "kSharedDown": 7},
    "Phase": {"kPhaseBarrierGate": 1, "kPhaseBarrierTopk": 2, "kPhaseBarrierScan": 3,
              "kPhaseBarrierLists": 4, "kPhaseRingSlot": 5, "kPhaseRingFull": 6,
              "kPhasePeerDone": 7, "kPhaseHeaders": 8, "kPhaseDispatchWait": 9,
              "kPhaseReturnWait": 10, "kPhaseBwdBarrierGate": 11,
              "kPhaseBwdBarrierTokens": 12, "kPhaseBwdBarrierTranspose": 13,
              "kPhaseBwdRingSlot": 14, "kPhaseBwdRingFull": 15, "kPhaseBwdPeerDone": 16,
              "kPhaseBwdHeaders": 17, "kPhaseBwdDispatchWait": 18, "kPhaseBwdReturnWait": 19,
              "kPhaseTmaWait": 20, "kPhaseNoTensorMaps": 21, "kPhaseStageFree": 22},
    "TensorMapSlot": {"kMapUp": 0, "kMapUp2": 1, "kMapDown": 2, "kMapSharedUp": 3,
                      "kMapSharedUp2": 4, "kMapSharedDown": 5, "kTensorMaps": 6},
    "BwdTaskKind": {"kBwdDH": 0, "kBwdDW2": 1, "kBwdDB2": 2, "kBwdDR": 3, "kBwdDX": 4,
                    "kBwdDW1": 5, "kBwdDB1": 6, "kBwdDXSum": 7, "kBwdSend": 8,
                    "kBwdDHRemote": 9, "kBwdDXRemote": 10, "kBwdSharedDH": 11,
                    "kBwdSharedDX": 12, "kBwdSharedDW": 13, "kBwdSharedDB": 14},
    "BwdGrad": {"kGradRouter": 0, "kGradRouterBias": 1, "kGradUp": 2, "kGradUp2": 3,
                "kGradUpBias": 4, "kGradUp2Bias": 5, "kGradDown": 6, "kGradDownBias": 7,
                "kGradSharedUp": 8, "kGradSharedUp2": 9, "kGradSharedUpBias": 10,
                "kGradSharedUp2Bias": 11, "kGradSharedDown": 12, "kGradSharedDownBias": 13,
                "kGradSharedGate": 14, "kGradPointers": 15},
    "DType": {"kFloat32": 0, "kTFloat32": 1, "kBFloat16": 2, "kFloat16": 3},
    "Act": {"kRelu": 0, "kGelu": 1, "kSilu": 2, "kIdentity": 3, "kSwigluClamped": 4},
    "RowMark": {"kNoExpert": -1, "kRowDropped": -1, "kRowMarked": -2},
}


def _view(enum: str, names: Dict[str, str]) -> Dict[str, int]:
    return {key: ENUMS[enum][cname] for key, cname in names.items()}


# Words of MoeLayout.state and the kernel's modes.
STATE_WORDS = ENUMS["StateWord"]["kStateWords"]
STATE = _view("StateWord", {"epoch": "kEpoch", "barrier": "kBarrier", "exit": "kExit",
                            "head": "kHead", "published": "kPublished", "traced": "kTraced"})
MODES = _view("Mode", {"full": "kModeFull", "gate_only": "kModeGateOnly",
                       "dispatch_only": "kModeDispatchOnly", "combine_only": "kModeCombineOnly",
                       "comm_only": "kModeCommOnly", "routed": "kModeRouted"})
FAULT_CODES = {v: k for k, v in _view("FaultCode", {
    "ok": "kOk", "timeout": "kTimeout", "protocol": "kProtocol",
    "bad_launch": "kBadLaunch"}).items()}
# What a trace record's `what` names: task kinds (low 3 bits of a descriptor) and phases.
TASK_KINDS = {v: k for k, v in _view("TaskKind", {
    "up": "kUp", "down": "kDown", "combine": "kCombine", "send": "kSend",
    "up (remote)": "kUpRemote", "down (remote)": "kDownRemote",
    "up (shared)": "kSharedUp", "down (shared)": "kSharedDown"}).items()}
TRACE_PHASES = {v: k for k, v in _view("TraceKind", {
    "gate": "kTraceGate", "top-k": "kTraceTopk", "scan": "kTraceScan", "lists": "kTraceLists",
    "headers": "kTraceHeaders", "subscriber": "kTraceSubscriber",
    "wait for task": "kTraceWait"}).items()}
# Where a fault record's wait was (FaultRecord.phase).
PHASES = {v: k for k, v in _view("Phase", {
    "grid barrier after the gate": "kPhaseBarrierGate",
    "grid barrier after top-k": "kPhaseBarrierTopk",
    "grid barrier after the scan": "kPhaseBarrierScan",
    "grid barrier after the dispatch lists": "kPhaseBarrierLists",
    "task-ring slot": "kPhaseRingSlot", "task ring capacity": "kPhaseRingFull",
    "peer's end of the previous launch": "kPhasePeerDone", "peer's header": "kPhaseHeaders",
    "tile dispatched by a peer": "kPhaseDispatchWait",
    "result tile owed by a peer": "kPhaseReturnWait",
    "backward's grid barrier after its gate": "kPhaseBwdBarrierGate",
    "backward's grid barrier after its per-token pass": "kPhaseBwdBarrierTokens",
    "backward's grid barrier after its transposes": "kPhaseBwdBarrierTranspose",
    "backward's task-ring slot": "kPhaseBwdRingSlot",
    "backward's task ring capacity": "kPhaseBwdRingFull",
    "backward's wait for a peer's end of its previous launch": "kPhaseBwdPeerDone",
    "backward's wait for a peer's header": "kPhaseBwdHeaders",
    "backward's wait for dy rows a peer sends": "kPhaseBwdDispatchWait",
    "backward's wait for dx rows a peer owes": "kPhaseBwdReturnWait",
    "TMA load of a weight tile": "kPhaseTmaWait",
    "launch check: this sm_90a build loads weight tiles by TMA and MoeLayout.tensor_maps "
    "is null (the layer must encode the weights' tensor maps)": "kPhaseNoTensorMaps",
    "producer warp's wait for a free pipeline stage or its next tile": "kPhaseStageFree"}).items()}
# MoeLayout.tensor_maps: each weight's map, by slot, and how many there are.
TENSOR_MAPS = ENUMS["TensorMapSlot"]["kTensorMaps"]
TENSOR_MAP_SLOTS = _view("TensorMapSlot", {
    "w_up": "kMapUp", "w_up2": "kMapUp2", "w_down": "kMapDown", "ws_up": "kMapSharedUp",
    "ws_up2": "kMapSharedUp2", "ws_down": "kMapSharedDown"})
# The backward's task kinds (low 4 bits of its descriptors).
BWD_TASK_KINDS = {v: k for k, v in _view("BwdTaskKind", {
    "dH": "kBwdDH", "dW2": "kBwdDW2", "db2": "kBwdDB2", "dRouter": "kBwdDR", "dX": "kBwdDX",
    "dW1": "kBwdDW1", "db1": "kBwdDB1", "dx": "kBwdDXSum", "send": "kBwdSend",
    "dH (remote)": "kBwdDHRemote", "dX (remote)": "kBwdDXRemote", "shared dH": "kBwdSharedDH",
    "shared dX": "kBwdSharedDX", "shared dW": "kBwdSharedDW", "shared db": "kBwdSharedDB"}).items()}
# The backward kernel's gradient pointer arguments: their count and each one's position.
BWD_GRAD_POINTERS = ENUMS["BwdGrad"]["kGradPointers"]
BWD_GRAD_INDEX = _view("BwdGrad", {"router": "kGradRouter", "router_bias": "kGradRouterBias",
                                   "up": "kGradUp", "up2": "kGradUp2", "up_bias": "kGradUpBias",
                                   "up2_bias": "kGradUp2Bias", "down": "kGradDown",
                                   "down_bias": "kGradDownBias", "shared_up": "kGradSharedUp",
                                   "shared_up2": "kGradSharedUp2",
                                   "shared_up_bias": "kGradSharedUpBias",
                                   "shared_up2_bias": "kGradSharedUp2Bias",
                                   "shared_down": "kGradSharedDown",
                                   "shared_down_bias": "kGradSharedDownBias",
                                   "shared_gate": "kGradSharedGate"})
# The FMOE_DTYPE and FMOE_ACT constants of each element type and activation.
DTYPE_IDS = _view("DType", {"float32": "kFloat32", "tfloat32": "kTFloat32",
                            "bfloat16": "kBFloat16", "float16": "kFloat16"})
ACT_IDS = _view("Act", {"relu": "kRelu", "gelu": "kGelu", "silu": "kSilu",
                        "identity": "kIdentity", "swiglu_clamped": "kSwigluClamped"})

# Routing marks: topk_expert of a marked token, token_rows of a dropped / marked slot.
NO_EXPERT = ENUMS["RowMark"]["kNoExpert"]
ROW_DROPPED = ENUMS["RowMark"]["kRowDropped"]
ROW_MARKED = ENUMS["RowMark"]["kRowMarked"]

STRUCTS: Dict[str, np.dtype] = {"FaultRecord": FAULT_RECORD, "MoeLayout": MOE_LAYOUT,
                                "TraceRecord": TRACE_RECORD,
                                "MoeBackwardLayout": MOE_BACKWARD_LAYOUT}


def abi_defines() -> Dict[str, int]:
    """Macros describing every field offset, struct size and enum value of the mirror."""
    out = {"FMOE_ABI_VERSION": ABI_VERSION}
    for sname, dt in STRUCTS.items():
        out[f"FMOE_SIZE_{sname}"] = dt.itemsize
        for fname in dt.names:
            out[f"FMOE_OFF_{sname}_{fname}"] = dt.fields[fname][1]
    for ename, values in ENUMS.items():
        for vname, v in values.items():
            out[f"FMOE_ENUM_{ename}_{vname}"] = v
    return out


def decode_fault(raw: bytes) -> dict:
    """A FaultRecord's bytes as a plain dict (code as its name)."""
    rec = np.frombuffer(raw, dtype=FAULT_RECORD, count=1)[0]
    out = {name: int(rec[name]) for name in FAULT_RECORD.names}
    out["code_name"] = FAULT_CODES.get(out["code"], f"unknown({out['code']})")
    return out
