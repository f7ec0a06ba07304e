"""Sizes of every buffer a layer allocates, computed from its configuration.

No GPU is needed: the plan is checked against free memory before anything is
allocated, printed with ``--verbose``, and tested on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict

from ..config import MoEConfig
from .specs import TILE, tile_config
from ..numerics import itemsize

__all__ = ["LayerPlan", "plan_layer", "TILE", "slot_rows", "max_peer_tiles", "BackwardPlan",
           "plan_backward", "SAVED_ROUTING", "saved_buffers"]



def slot_rows(cfg: MoEConfig) -> int:
    """Rows one source can send one peer at most: tokens * min(top_k, max local experts)."""
    return cfg.tokens * min(cfg.top_k, cfg.max_local_experts)


def max_peer_tiles(cfg: MoEConfig) -> int:
    """Tiles of one source -> peer stream at most (each expert may add a partial tile)."""
    return math.ceil(slot_rows(cfg) / TILE) + cfg.max_local_experts


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """Derived sizes of one layer on one rank.

    Attributes
    ----------
    token_tiles : int
        ceil(tokens / TILE).
    logits_stride : int
        Experts rounded up to 8 (row stride of the logits).
    max_rowtiles : int
        Row tiles in the worst case: ceil(tokens * top_k / TILE) + experts.
    up_tiles, down_tiles : int
        Column tiles of the up (F) and down (H) projections.
    ring_capacity : int
        Task-ring slots: every published task of the worst case (local down tasks,
        and with several ranks the combine tasks and the up and down tasks of every
        tile that can arrive from peers).
    workspace : dict
        Buffer name -> bytes (device memory).
    weights : dict
        Buffer name -> bytes of the uploaded (K-major) weights.
    """

    token_tiles: int
    logits_stride: int
    max_rowtiles: int
    up_tiles: int
    down_tiles: int
    ring_capacity: int
    workspace: Dict[str, int]
    weights: Dict[str, int]

    @property
    def total_bytes(self) -> int:
        return sum(self.workspace.values()) + sum(self.weights.values())

    def describe(self) -> str:
        """Human-readable table of the plan."""
        lines = [f"{'buffer':<14}{'MiB':>12}"]
        for group in (self.weights, self.workspace):
            for name, n in group.items():
                lines.append(f"{name:<14}{n / 2**20:>12.2f}")
        lines.append(f"{'total':<14}{self.total_bytes / 2**20:>12.2f}")
        return "\n".join(lines)


def plan_layer(cfg: MoEConfig, local_experts: int = None) -> LayerPlan:
    """The buffers of one rank of a layer (``local_experts`` defaults to all)."""
    el = cfg.experts if local_experts is None else local_experts
    t, k, e, h, f = cfg.tokens, cfg.top_k, cfg.experts, cfg.hidden, cfg.ffn
    b = itemsize(cfg.dtype)
    tt = math.ceil(t / TILE)
    ep = math.ceil((e + int(cfg.shared_gate)) / 8) * 8  # gate columns: + the shared gate's
    tile = tile_config(cfg.dtype)
    up_tiles = math.ceil(f / tile.up_cols(cfg.mlp == "gated"))
    down_tiles = math.ceil(h / tile.bn)
    max_rowtiles = math.ceil(t * k / TILE) + e
    ring = max_rowtiles * down_tiles
    if cfg.world_size > 1:  # (one GPU combines in the down epilogue: no combine tasks)
        ring += tt * down_tiles + cfg.world_size * max_peer_tiles(cfg) * (up_tiles + down_tiles)
    if cfg.n_shared:  # the shared MLP's down tasks, published per token tile
        ring += tt * down_tiles
    workspace = {
        "logits": t * ep * 4,
        "topk_expert": t * k * 4,
        "topk_weight": t * k * 4,
        "token_rows": t * k * 4,
        "row_token": t * k * 4,
        "tile_counts": tt * e * 4 * (k if cfg.capacity_order == "slot" else 1),
        "expert_total": e * 4,
        "expert_kept": e * 4,
        "tile_kept": tt * 4,
        "z": t * k * f * b,
        "y_expert": t * k * h * b,
        "dep_rowtile": max_rowtiles * 4,
        "dep_combine": tt * down_tiles * 4,
        "ring": ring * 8,
        "state": 16 * 4,
        "x_stage": t * h * b,
        "y_stage": t * h * b,
    }
    s = cfg.shared_width
    if s:  # the shared MLP over every token
        workspace.update(zs=t * s * b, ys=t * h * b, dep_shared=tt * 4)
        if cfg.shared_gate:
            workspace["shared_scale"] = t * 4
    weights = {"router_t": e * h * b}
    for name in ("router_bias", "selection_bias"):
        if getattr(cfg, name):
            weights[name] = e * 4
    if cfg.mlp == "vanilla":
        weights.update(w_up=el * f * h * b, b_up=el * f * b, w_down=el * h * f * b,
                       b_down=el * h * b)
    else:
        weights.update(w_up=el * f * h * b, w_up2=el * f * h * b, w_down=el * h * f * b)
        if cfg.mlp_bias:
            weights.update(b_up=el * 2 * f * b, b_down=el * h * b)
    if s:  # replicated on every rank
        gated = cfg.mlp == "gated"
        weights.update(ws_up=s * h * b, ws_down=h * s * b)
        if gated:
            weights["ws_up2"] = s * h * b
        if not gated or cfg.mlp_bias:
            weights.update(bs_up=(2 * s if gated else s) * b, bs_down=h * b)
        if cfg.shared_gate:
            weights["ws_gate"] = h * b
    return LayerPlan(token_tiles=tt, logits_stride=ep, max_rowtiles=max_rowtiles,
                     up_tiles=up_tiles, down_tiles=down_tiles, ring_capacity=ring,
                     workspace=workspace, weights=weights)


# ============================================================================ backward

# Per-call buffers a forward writes that its backward reads: a save slot has its own.
SAVED_ROUTING = ("topk_expert", "topk_weight", "token_rows", "row_token", "expert_kept",
                 "tile_kept")


def saved_buffers(cfg: MoEConfig, recompute: bool = False) -> Dict[str, int]:
    """Buffer name -> bytes of one save slot: the input ``x`` and the routing, and unless
    ``recompute`` the expert intermediates (``z``, ``y_expert``, the pre-activation
    ``pre``: vanilla ``x W1 + b1``, gated ``x Wg`` and ``x Wu``) and the shared experts'
    (``zs``, ``ys``, ``pre_s``, the gate ``shared_scale``)."""
    t, k, e, h, f = cfg.tokens, cfg.top_k, cfg.experts, cfg.hidden, cfg.ffn
    b = itemsize(cfg.dtype)
    tt = math.ceil(t / TILE)
    out = {"x": t * h * b, "topk_expert": t * k * 4, "topk_weight": t * k * 4,
           "token_rows": t * k * 4, "row_token": t * k * 4, "expert_kept": e * 4,
           "tile_kept": tt * 4}
    if not recompute:
        pf = 2 * f if cfg.mlp == "gated" else f
        out.update(z=t * k * f * b, y_expert=t * k * h * b, pre=t * k * pf * b)
        if cfg.n_shared:
            s = cfg.shared_width
            spf = 2 * s if cfg.mlp == "gated" else s
            out.update(zs=t * s * b, ys=t * h * b, pre_s=t * spf * b, shared_scale=t * 4)
        if cfg.world_size > 1:  # the owner's side: rows received from every source
            sr = cfg.world_size * slot_rows(cfg)
            out.update(recv_saved=sr * h * b, z_remote=sr * f * b, pre_remote=sr * pf * b)
    return out


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    """Sizes of what a layer adds for its backward (allocated at its first backward).

    Attributes
    ----------
    rp_capacity : int
        Columns of the transposed per-row buffers: every local expert's rows rounded up
        to 8, at most ``tokens * top_k + 7 * local experts`` (rounded up to 8).
    tp_capacity : int
        Tokens rounded up to 8 (columns of ``x_t`` and ``dz_t``).
    ring_capacity : int
        Task-ring slots: every published backward task of the worst case.
    weights : dict
        Buffer name -> bytes of the weights in the backward's layouts (a second copy of
        the weights while training).
    workspace : dict
        Buffer name -> bytes.
    symmetric : dict
        Expert parallelism: name -> bytes of the backward's symmetric buffers (``dxe``,
        where owners put dX rows, and ``dxe_remote``, their put source).
    """

    rp_capacity: int
    tp_capacity: int
    ring_capacity: int
    weights: Dict[str, int]
    workspace: Dict[str, int]
    symmetric: Dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.workspace.values()) + sum(self.weights.values()) + \
            sum(self.symmetric.values())


def plan_backward(cfg: MoEConfig, local_experts: int = None) -> BackwardPlan:
    """The backward's buffers on one rank (``local_experts`` defaults to all)."""
    el = cfg.experts if local_experts is None else local_experts
    t, k, e, h, f = cfg.tokens, cfg.top_k, cfg.experts, cfg.hidden, cfg.ffn
    b = itemsize(cfg.dtype)
    gated = cfg.mlp == "gated"
    pf = 2 * f if gated else f
    gate = bool(cfg.n_shared and cfg.shared_gate)
    ep = math.ceil((e + gate) / 8) * 8  # logit columns: the experts, the shared gate
    tt = math.ceil(t / TILE)
    w = cfg.world_size
    received = (w * slot_rows(cfg)) if w > 1 else 0  # rows an owner can receive at most
    rp = math.ceil((t * k + received + 7 * el) / 8) * 8
    tp = math.ceil(t / 8) * 8
    ht, ft, pt = (math.ceil(n / TILE) for n in (h, f, pf))
    max_rowtiles = math.ceil(t * k / TILE) + e
    biases = not gated or cfg.mlp_bias  # db1 (gated: dbg | dbu over 2 ffn) and db2 tasks
    ring = max_rowtiles * ht + el * ht * pt + (el * pt if biases else 0) + tt * ht
    if w > 1:  # received tiles' dH and dX; dW2 and db2 are published there
        ring += w * max_peer_tiles(cfg) * (ft + ht) + el * ft * ht + (el * ht if biases else 0)
    sw = cfg.shared_width
    spf = 2 * sw if gated else sw
    spt = math.ceil(spf / TILE)
    if sw:  # the shared MLP's dX tiles, dW1s tiles and db1s columns
        ring += tt * ht + ht * spt + (spt if biases else 0)
    weights = {"router_b": h * ep * b, "w_up_b": el * h * pf * b, "w_down_b": el * f * h * b}
    workspace = {
        "dye": t * k * h * b, "dye_t": h * rp * b, "z_t": f * rp * b, "xg_t": h * rp * b,
        "da": t * k * pf * b, "da_t": pf * rp * b, "dxe": t * k * h * 4, "dz": t * ep * b,
        "dz_t": ep * tp * b, "x_t": h * tp * b, "dep_dx": max_rowtiles * 4,
        "dep_expert": el * 4, "dep_dxsum": tt * ht * 4, "ring": ring * 8,
        "dy_stage": t * h * b, "dx_stage": t * h * b,
    }
    if sw:
        weights.update(ws_up_b=h * spf * b, ws_down_b=sw * h * b)
        workspace.update(dys=t * h * b, dys_t=h * tp * b, zs_t=sw * tp * b, das=t * spf * b,
                         das_t=spf * tp * b, dxs=t * h * 4, dep_sh=(tt + 1) * 4)
    workspace["d_weights"] = t * k * 4  # the caller's routing: its weights' gradient
    symmetric = {}
    if w > 1:
        symmetric = {"dxe": workspace.pop("dxe"), "dxe_remote": received * h * 4}
        workspace.update(da_remote=received * pf * b, dep_remote=w * max_peer_tiles(cfg) * 8)
    return BackwardPlan(rp_capacity=rp, tp_capacity=tp, ring_capacity=ring, weights=weights,
                        workspace=workspace, symmetric=symmetric)
