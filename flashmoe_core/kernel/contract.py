"""What a layer hands the fused kernel and reads back, for either backend: the weights
in the kernel's layout, the layout record, placement tables, input validation, the
fault record as an exception, the state words after a failed launch, and the ranks'
agreement on the layer.

The GPU layer (gpu/layer.py) and the emulator (emulator/) both import this module, so
the backends share one definition of the kernel's side of the contract, and the
emulator never imports the GPU layer (which imports the emulator only to dispatch
``backend="emulator"`` to it).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..config import MoEConfig
from ..host.abi import (MOE_EP_POINTERS, MOE_LAYOUT, MOE_LAYOUT_POINTERS, MOE_SHARED_POINTERS,
                        PHASES, STATE, STATE_WORDS, TENSOR_MAP_SLOTS, TENSOR_MAPS)
from ..host.tma import TENSOR_MAP_BYTES
from ..host.errors import FlashMoETimeout, KernelFault
from ..numerics import as_f32, check_finite, nonfinite_to_nan, round_to, storage_dtype
from .plan import max_peer_tiles, slot_rows
from .specs import ACT_IDS, DTYPE_IDS, tile_config
from ..weights import MoEWeights

__all__ = ["kernel_weights", "check_weights_finite", "placement_tables", "layout_record",
           "recovery_state", "validate_input", "fault_exception", "check_ranks_agree",
           "overlaps", "ranks_sharing", "gemm_operands", "tensor_map_fields", "tensor_maps"]


def _kmajor(a: np.ndarray) -> np.ndarray:
    """[E, in, out] -> [E, out, in], infinities as NaN."""
    return np.ascontiguousarray(nonfinite_to_nan(a).transpose(0, 2, 1))


def _mlp_buffers(cfg: MoEConfig, get, names) -> dict:
    """One MLP kind's weights in the kernel's layouts: ``get(name)`` gives an
    ``[E, ...]`` array of :func:`~flashmoe_core.weights.expert_tensor_names`' names;
    ``names`` are the buffers (up, up2, up bias, down, down bias)."""
    up, up2, b_up, down, b_down = names
    if cfg.mlp == "vanilla":
        return {up: _kmajor(get("w1")), b_up: nonfinite_to_nan(get("b1")),
                down: _kmajor(get("w2")), b_down: nonfinite_to_nan(get("b2"))}
    out = {up: _kmajor(get("wg")), up2: _kmajor(get("wu")), down: _kmajor(get("w2"))}
    if cfg.mlp_bias:  # the up biases side by side per expert: bg then bu
        both = np.concatenate([get("bg"), get("bu")], axis=1)
        out.update({b_up: np.ascontiguousarray(nonfinite_to_nan(both)),
                    b_down: nonfinite_to_nan(get("b2"))})
    return out


def kernel_weights(w: MoEWeights) -> dict:
    """The weight buffers the kernel reads, by plan name: every matrix transposed to
    K-major (out x in), since the tensor cores read both operands K-major, and every
    infinity stored as NaN (the oracle's rule 11)."""
    out = {"router_t": np.ascontiguousarray(nonfinite_to_nan(w.router).T)}
    # Routing vectors go to the kernel in float32 (a bf16 bias is exact in float32).
    for name in ("router_bias", "selection_bias"):
        if getattr(w.cfg, name):
            out[name] = nonfinite_to_nan(as_f32(getattr(w, name)).astype(np.float32))
    out.update(_mlp_buffers(w.cfg, lambda n: getattr(w, n),
                            ("w_up", "w_up2", "b_up", "w_down", "b_down")))
    if w.cfg.n_shared:  # one MLP: the same layouts without the expert axis
        shared = _mlp_buffers(w.cfg, lambda n: getattr(w, "shared_" + n)[None],
                              ("ws_up", "ws_up2", "bs_up", "ws_down", "bs_down"))
        out.update({k: v[0] for k, v in shared.items()})
        if w.cfg.shared_gate:
            out["ws_gate"] = nonfinite_to_nan(w.shared_gate)
    return out


def tensor_map_fields(cfg: MoEConfig, ptr, local_experts: Optional[int] = None) -> dict:
    """The tensor maps of the weights a TMA build of the fused kernel loads (MoeLayout's
    ``tensor_maps``), by buffer name: the fields each map is encoded from, as keyword
    arguments of :func:`~flashmoe_core.host.tma.encode_tiled`. Only the weights the
    layer has; ``ptr`` gives a buffer's address.

    Every map is 3-D, innermost first: {in (K), out (rows of the B tile), expert}; the
    shared experts' matrices are one expert. A box is one swizzle span of K of the sm_90a
    tile (64 bytes, 64-byte swizzle) by the GEMM tile's rows of one part: up maps the up
    task's columns (gated: Wg's and Wu's rows are two boxes of one B tile), the down map
    the tile's N.
    """
    tile = tile_config(cfg.dtype)
    eb = np.dtype(storage_dtype(cfg.dtype)).itemsize
    h, f = cfg.hidden, cfg.ffn
    el = cfg.experts if local_experts is None else local_experts
    up_rows = tile.up_cols(cfg.mlp == "gated")
    span = 64 if tile.bk90 * eb == 64 else 128  # bytes of K per swizzle span (TileGemm)

    def fields(name, k, n, e, rows):
        return dict(address=ptr(name), elem_bytes=eb, dims=(k, n, e),
                    strides=(k * eb, n * k * eb), box=(span // eb, rows, 1),
                    swizzle=f"{span}B")
    out = {"w_up": fields("w_up", h, f, el, up_rows), "w_down": fields("w_down", f, h, el, tile.bn)}
    if cfg.mlp == "gated":
        out["w_up2"] = fields("w_up2", h, f, el, up_rows)
    if cfg.n_shared:
        fs = cfg.shared_width
        out["ws_up"] = fields("ws_up", h, fs, 1, up_rows)
        out["ws_down"] = fields("ws_down", fs, h, 1, tile.bn)
        if cfg.mlp == "gated":
            out["ws_up2"] = fields("ws_up2", h, fs, 1, up_rows)
    return out


def tensor_maps(cfg: MoEConfig, ptr, encode, local_experts: Optional[int] = None) -> np.ndarray:
    """MoeLayout's ``tensor_maps`` block (uint8, TENSOR_MAPS x 128 bytes, by slot; zeros
    where the layer has no such weight), each map made by ``encode(**fields)`` (the
    driver's :func:`~flashmoe_core.host.tma.encode_tiled` on a GPU, the emulator's
    :func:`~flashmoe_core.host.tma.encode_emulated`)."""
    out = np.zeros(TENSOR_MAPS * TENSOR_MAP_BYTES, np.uint8)
    for name, f in tensor_map_fields(cfg, ptr, local_experts).items():
        i = TENSOR_MAP_SLOTS[name] * TENSOR_MAP_BYTES
        out[i:i + TENSOR_MAP_BYTES] = np.frombuffer(bytes(encode(**f)), np.uint8)
    return out


def check_weights_finite(weights: MoEWeights) -> None:
    """``check_finite=True``: raise ValueError naming the first weight that is not finite."""
    for name, array in weights.arrays().items():
        check_finite(f"weights.{name}", array)


def placement_tables(cfg: MoEConfig) -> dict:
    """The expert-parallel kernel's placement tables: ``expert_owner`` (rank of each
    expert) and ``expert_local`` (its position among that rank's experts), int32 [E]."""
    local_index = np.zeros(cfg.experts, np.int32)
    for r in range(cfg.world_size):
        for i, e in enumerate(cfg.local_experts(r)):
            local_index[e] = i
    return {"expert_owner": np.asarray(cfg.expert_owner, np.int32), "expert_local": local_index}


def layout_record(cfg: MoEConfig, plan, ptr, *, fault: int, timeout_s: float, rank: int = 0,
                  local_experts: Optional[int] = None, delay_ns: int = 0,
                  trace_capacity: int = 0) -> np.ndarray:
    """The MoeLayout a layer hands its kernel (one rank's view).

    Parameters
    ----------
    cfg, plan : the layer's configuration and its :class:`~flashmoe_core.kernel.plan.LayerPlan`
    ptr : callable
        Buffer name -> address (0 for buffers the layer does not have).
    fault : int
        Address of the host-visible fault record.
    """
    rec = np.zeros((), dtype=MOE_LAYOUT)
    for name in MOE_LAYOUT_POINTERS + MOE_EP_POINTERS + MOE_SHARED_POINTERS:
        rec[name] = fault if name == "fault" else ptr(name)
    rec["timeout_ns"] = int(timeout_s * 1e9)
    rec["max_tokens"] = cfg.tokens
    rec["experts"] = cfg.experts
    rec["local_experts"] = cfg.experts if local_experts is None else local_experts
    rec["max_rowtiles"] = plan.max_rowtiles
    rec["ring_capacity"] = plan.ring_capacity
    rec["rank"] = rank
    rec["world"] = cfg.world_size
    rec["delay_ns"] = delay_ns
    rec["trace"] = ptr("trace")
    rec["trace_capacity"] = trace_capacity
    rec["router_bias"] = ptr("router_bias")
    rec["selection_bias"] = ptr("selection_bias")
    rec["pre"] = ptr("pre")  # a save slot's pre-activations; 0: the forward keeps none
    rec["pre_remote"] = ptr("pre_remote")
    rec["recv_saved"] = ptr("recv_saved")
    rec["tensor_maps"] = ptr("tensor_maps")  # 0 unless the kernel loads weights by TMA
    if cfg.world_size > 1:
        rec["slot_rows"] = slot_rows(cfg)
        rec["max_peer_tiles"] = max_peer_tiles(cfg)
        rec["max_local_experts"] = cfg.max_local_experts
    return rec


def recovery_state(epochs) -> tuple:
    """State words after a failed launch, given every PE's epoch: all counters zero,
    and one epoch, past every epoch any PE used (stale tags are at most max + 1, the
    next launch's tag is max + 2). Returns (words, epoch)."""
    epoch = int(max(epochs)) + 1
    words = np.zeros(STATE_WORDS, np.uint32)
    words[STATE["epoch"]] = epoch
    return words, epoch


def validate_input(cfg: MoEConfig, shape, dtype, contiguous: bool = True) -> int:
    """Check an input's shape, dtype and layout against a layer; returns its token count.

    Raises
    ------
    ValueError
        Naming what is wrong and what the layer takes.
    """
    want = storage_dtype(cfg.dtype)
    if len(shape) != 2 or shape[1] != cfg.hidden:
        raise ValueError(f"x has shape {tuple(shape)}; expected [tokens, hidden={cfg.hidden}]")
    t = int(shape[0])
    if not 1 <= t <= cfg.tokens:
        raise ValueError(f"x carries {t} tokens; this layer takes 1..{cfg.tokens} "
                         "(MoEConfig.tokens is the bound; build a layer with a larger one)")
    if np.dtype(dtype) != want:
        raise ValueError(f"x has dtype {np.dtype(dtype)}; this layer stores {want} "
                         f"(dtype={cfg.dtype!r}); convert it first")
    if not contiguous:
        raise ValueError("x must be C-contiguous (rows of hidden elements)")
    return t


def fault_exception(info: dict) -> KernelFault:
    """The exception for a decoded fault record: FlashMoETimeout for a wait that ran
    out, KernelFault otherwise; the message names the phase, block, rank and peer."""
    phase = PHASES.get(info["phase"], f"phase {info['phase']}")
    if info["code_name"] == "timeout":
        return FlashMoETimeout(
            f"the fused MoE kernel gave up waiting at the {phase}: block {info['block']} "
            f"(task {info['task']}) saw {info['counter']} of {info['expected']} after "
            f"{info['elapsed_ns'] / 1e9:.3f} s without progress (rank {info['rank']}, peer "
            f"{info['peer']})",
            info)
    if info["code_name"] == "bad_launch":
        return KernelFault(f"the fused MoE kernel refused its launch: {phase}", info)
    return KernelFault(f"the fused MoE kernel stopped: {info['code_name']} at the {phase} "
                       f"(block {info['block']}, value {info['counter']}, limit "
                       f"{info['expected']})", info)


def check_ranks_agree(comm, cfg: MoEConfig, problem: Optional[str] = None) -> None:
    """Collective check that every rank builds the same layer and none failed to.

    Every rank passes its config and its own problem (None if it has none); every rank
    raises the same ValueError if any rank has a problem or a different config, so no
    rank goes on to a collective the others never reach.
    """
    views = comm.allgather((cfg.to_json(), problem))
    failed = [(r, p) for r, (_, p) in enumerate(views) if p]
    if failed:
        raise ValueError("building the expert-parallel layer failed on rank(s) " +
                         "; ".join(f"{r}: {p}" for r, p in failed))
    differ = [r for r, (j, _) in enumerate(views) if j != views[0][0]]
    if differ:
        a = MoEConfig.from_json(views[0][0]).to_dict()
        b = MoEConfig.from_json(views[differ[0]][0]).to_dict()
        fields = [k for k in a if a[k] != b[k]]
        raise ValueError(f"ranks build different layers: rank(s) {differ} differ from rank 0 "
                         f"in {', '.join(fields)} (rank 0: "
                         f"{', '.join(f'{k}={a[k]!r}' for k in fields)}; rank {differ[0]}: "
                         f"{', '.join(f'{k}={b[k]!r}' for k in fields)}); every rank must "
                         "pass the same MoEConfig")


def overlaps(a: int, a_bytes: int, b: int, b_bytes: int) -> bool:
    """Whether byte ranges [a, a + a_bytes) and [b, b + b_bytes) share a byte."""
    return a < b + b_bytes and b < a + a_bytes


def ranks_sharing(keys, rank: int) -> int:
    """How many ranks run on the same GPU as ``rank``, given every rank's (host, GPU
    UUID) key."""
    return sum(1 for k in keys if tuple(k) == tuple(keys[rank]))


def gemm_operands(a, b, dtype: str, bias=None, activation: str = "identity", gated: bool = False,
                  a_index=None):
    """Validate and round tile-GEMM operands (shared by the GPU and emulator paths).

    Returns
    -------
    (a, b, bias, a_index, m, n, k): contiguous arrays in the storage type (a_index
    int32), and the product's shape.
    """
    if dtype not in DTYPE_IDS:
        raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPE_IDS)}")
    if activation not in ACT_IDS or activation == "swiglu_clamped":
        known = sorted(a for a in ACT_IDS if a != "swiglu_clamped")
        raise ValueError(f"activation={activation!r}: expected one of {known} (the clamped "
                         "SwiGLU belongs to the fused gated MLP)")
    a = np.ascontiguousarray(round_to(a, dtype))
    b = np.ascontiguousarray(round_to(b, dtype))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a {a.shape} and b {b.shape} must be [M, K] and [N, K]")
    k = a.shape[1]
    if k % 8:
        raise ValueError(f"K={k} must be a multiple of 8 (16-byte rows)")
    n = b.shape[0] // 2 if gated else b.shape[0]
    if n % 8 or (gated and b.shape[0] % 2):
        raise ValueError(f"N={n} must be a multiple of 8" + (" and b must hold 2N rows"
                                                             if gated else ""))
    if gated and bias is not None:
        raise ValueError("the gated form takes no bias")
    if a_index is not None:
        a_index = np.ascontiguousarray(a_index, dtype=np.int32)
        if a_index.ndim != 1 or (a_index.size and (a_index.min() < 0 or
                                                  a_index.max() >= a.shape[0])):
            raise ValueError(f"a_index must be 1-D with values in [0, {a.shape[0]})")
    m = a.shape[0] if a_index is None else a_index.size
    return a, b, bias, a_index, m, n, k
