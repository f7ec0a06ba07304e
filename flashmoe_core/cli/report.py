"""A static report of the fused kernel for one configuration, without a GPU.

    python -m flashmoe_core.build --report --arch sm_90a --tokens 16384 --experts 64

Per kernel and arch: registers, stack and spills, shared memory, blocks per SM on an
H100 (from the assembler's numbers and the SM's limits), and the SASS instruction mix
of every GEMM mainloop per k-tile (tensor-core ops, global->shared copies, ldmatrix,
barriers, the rest). Per configuration, at a balanced random routing like the
benchmark's: tasks, row tiles and padded rows, FLOPs and bytes, and the roofline bound
on an H100. Numbers to compare builds by, not timings.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import numpy as np

from ..config import MoEConfig
from ..host import sass
from ..kernel.specs import TILE, computed_rows, moe_backward_spec, moe_spec, tile_config
from ..numerics import itemsize

__all__ = ["H100", "kernel_report", "layer_report", "report", "format_report"]

H100 = {
    "name": "H100 SXM",
    "sms": 132,
    "regs_per_sm": 65536,
    "smem_per_sm": 228 * 1024,
    "smem_reserved_per_block": 1024,
    "max_blocks_per_sm": 32,
    "max_warps_per_sm": 64,
    "tflops": {"bfloat16": 989.4, "float16": 989.4, "tfloat32": 494.7, "float32": 494.7},
    "hbm_tb_s": 3.35,
}
"""The limits and peaks the report assumes (dense tensor-core rates, vendor figures)."""

def blocks_per_sm(registers: int, smem_bytes: int, gpu: dict = H100,
                  threads: int = 128) -> Dict[str, int]:
    """Resident blocks of ``threads`` threads per SM by each limit (registers are
    allotted per warp in units of 256)."""
    per_warp = math.ceil(registers * 32 / 256) * 256
    warps = math.ceil(threads / 32)
    by_regs = (gpu["regs_per_sm"] // per_warp) // warps if per_warp else gpu["max_blocks_per_sm"]
    need = smem_bytes + gpu["smem_reserved_per_block"]
    by_smem = gpu["smem_per_sm"] // need
    by_warps = gpu["max_warps_per_sm"] // warps
    out = {"registers": by_regs, "shared_memory": by_smem, "warps": by_warps,
           "block_limit": gpu["max_blocks_per_sm"]}
    out["blocks"] = min(out.values())
    return out


def kernel_report(cubin: bytes, kernel: str = "flashmoe_moe_forward",
                  smem_symbol: Optional[str] = "flashmoe_moe_smem",
                  threads_symbol: Optional[str] = "flashmoe_moe_threads") -> dict:
    """Resources, occupancy and mainloop instruction mix of one kernel in a cubin."""
    res = sass.resources(cubin)[kernel]
    insns = sass.disassemble(cubin)[kernel]
    dynamic = 0
    if smem_symbol:
        dynamic = int(np.frombuffer(sass.read_symbol(cubin, smem_symbol), np.int32)[0])
    threads = 128
    if threads_symbol:
        threads = int(np.frombuffer(sass.read_symbol(cubin, threads_symbol), np.int32)[0])
    spills = {op: sum(1 for i in insns if i.opcode.split(".")[0] == op) for op in ("LDL", "STL")}
    # Global atomics, exchanges apart: each returns a value the thread waits for.
    atomic = [i.opcode for i in insns if i.opcode.split(".")[0] in ("ATOM", "ATOMG", "RED")]
    atomics = {"exchange": sum(1 for op in atomic if ".EXCH" in op),
               "other": sum(1 for op in atomic if ".EXCH" not in op)}
    loops = []
    for loop in sass.mma_loops(insns):
        loops.append({"address": f"0x{loop.start:x}-0x{loop.end:x}",
                      "instructions_per_k_tile": loop.instructions,
                      "kinds": loop.kinds, "wgmma_waits": loop.wgmma_waits,
                      "mma_opcodes": {op: n for op, n in loop.opcodes.items()
                                      if sass.instruction_kind(op) == "mma"}})
    return {"kernel": kernel, "registers": res.registers, "stack_bytes": res.stack,
            "local_bytes": res.local, "static_smem": res.shared, "dynamic_smem": dynamic,
            "spill_instructions": spills, "atomics": atomics, "instructions": len(insns),
            "threads": threads,
            "blocks_per_sm_h100": blocks_per_sm(res.registers, res.shared + dynamic,
                                                threads=threads),
            "mainloops": loops}


def balanced_counts(cfg: MoEConfig, seed: int = 0, tokens: Optional[int] = None) -> np.ndarray:
    """Assignments per expert at a random router and random tokens (the benchmark's
    balanced routing): softmax top-k of x R with R ~ N(0, 1/hidden)."""
    t = cfg.tokens if tokens is None else tokens
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, cfg.hidden), dtype=np.float32)
    router = rng.standard_normal((cfg.hidden, cfg.experts), dtype=np.float32) \
        / np.float32(np.sqrt(cfg.hidden))
    logits = x @ router
    top = np.argpartition(-logits, cfg.top_k - 1, axis=1)[:, :cfg.top_k]
    return np.bincount(top.ravel(), minlength=cfg.experts)


def layer_report(cfg: MoEConfig, counts: Optional[np.ndarray] = None,
                 gpu: dict = H100) -> dict:
    """Tasks, padding, FLOPs, bytes and the roofline bound of one dropless forward."""
    counts = balanced_counts(cfg) if counts is None else np.asarray(counts)
    t = cfg.tokens
    tile = tile_config(cfg.dtype)
    gated = cfg.mlp == "gated"
    up_tiles = math.ceil(cfg.ffn / tile.up_cols(gated))
    down_tiles = math.ceil(cfg.hidden / tile.bn)
    row_tiles = int(sum(math.ceil(int(n) / TILE) for n in counts))
    rows = int(counts.sum())
    computed = int(sum(computed_rows(n) for n in counts))
    tt = math.ceil(t / TILE)
    b = itemsize(cfg.dtype)
    flops = cfg.flops(t, kept=rows)
    up_w = (2 if gated else 1) * cfg.ffn * cfg.hidden
    weights = cfg.experts * (up_w + cfg.ffn * cfg.hidden) * b + cfg.hidden * cfg.experts * b
    # x read by the gate and the gathers, z and y_expert written then read, y written.
    moved = weights + (2 * t * cfg.hidden + 2 * rows * cfg.ffn + 2 * rows * cfg.hidden
                       + t * cfg.hidden) * b
    compute_s = flops / (gpu["tflops"][cfg.dtype] * 1e12)
    memory_s = moved / (gpu["hbm_tb_s"] * 1e12)
    return {
        "tokens": t, "assignments": rows, "expert_rows_min_max": [int(counts.min()),
                                                                  int(counts.max())],
        "row_tiles": row_tiles, "row_tiles_if_unpadded": math.ceil(rows / TILE),
        # Rows multiplied but not routed (tails of at most TILE / 2 rows are half
        # tiles); beside it, the padding if every tile were whole.
        "padded_rows": computed - rows,
        "padding_percent": 100.0 * (computed - rows) / max(rows, 1),
        "padded_rows_whole_tiles": row_tiles * TILE - rows,
        "padding_percent_whole_tiles": 100.0 * (row_tiles * TILE - rows) / max(rows, 1),
        # One GPU combines in the down epilogue (no combine tasks); with peers the
        # subscriber publishes a combine task per (token tile, column).
        "tasks": {"gate": tt * math.ceil(cfg.experts / tile.bn), "up": row_tiles * up_tiles,
                  "down": row_tiles * down_tiles,
                  "combine": tt * down_tiles if cfg.world_size > 1 else 0},
        "flops": flops, "bytes": moved,
        "roofline_us": 1e6 * max(compute_s, memory_s),
        "bound": "compute" if compute_s >= memory_s else "memory",
        "gpu": gpu["name"],
    }


def report(cfg: MoEConfig, arch: str = "sm_90a", training: bool = False) -> dict:
    """The whole report: the fused kernel of ``cfg`` for ``arch`` (compiled or cached),
    with ``training`` its backward kernel too, and the configuration's numbers."""
    from ..kernel.jit import compile_kernel

    cubin = compile_kernel(moe_spec(cfg), arch).cubin
    rep = {"config": cfg.to_dict(), "arch": arch, "kernel": kernel_report(cubin),
           "layer": layer_report(cfg)}
    if training:
        # The backward: 128 threads (no producer warp), its own shared memory symbol.
        rep["backward"] = kernel_report(compile_kernel(moe_backward_spec(cfg), arch).cubin,
                                        "flashmoe_moe_backward", "flashmoe_moe_backward_smem",
                                        threads_symbol=None)
    return rep


def _format_kernel(k: dict, arch: str) -> list:
    occ = k["blocks_per_sm_h100"]
    lines = [
        f"{k['kernel']} for {arch}: {k['registers']} registers, stack "
        f"{k['stack_bytes']} B, spills {k['spill_instructions']['LDL']} LDL / "
        f"{k['spill_instructions']['STL']} STL, shared {k['static_smem']} B static + "
        f"{k['dynamic_smem']} B dynamic, {k['instructions']} instructions, atomics "
        f"{k['atomics']['exchange']} exchange / {k['atomics']['other']} other",
        f"blocks per SM on an H100: {occ['blocks']} (registers {occ['registers']}, shared "
        f"memory {occ['shared_memory']}, warps {occ['warps']})",
    ]
    for i, loop in enumerate(k["mainloops"]):
        kinds = ", ".join(f"{n} {kind}" for kind, n in loop["kinds"].items() if n)
        mma = ", ".join(f"{n} {op}" for op, n in loop["mma_opcodes"].items())
        waits = f", {loop['wgmma_waits']} wgmma waits" if "HGMMA" in loop["mma_opcodes"] else ""
        lines.append(f"mainloop {i} [{loop['address']}]: {loop['instructions_per_k_tile']} "
                     f"instructions per k-tile ({mma}{waits}): {kinds}")
    return lines


def format_report(rep: dict) -> str:
    """The report as text."""
    lay = rep["layer"]
    lines = _format_kernel(rep["kernel"], rep["arch"])
    if "backward" in rep:
        lines += _format_kernel(rep["backward"], rep["arch"])
    tasks = ", ".join(f"{n} {kind}" for kind, n in lay["tasks"].items())
    lines += [
        f"layer at {lay['tokens']} tokens: {lay['assignments']} assignments (experts "
        f"{lay['expert_rows_min_max'][0]}..{lay['expert_rows_min_max'][1]} rows), "
        f"{lay['row_tiles']} row tiles ({lay['row_tiles_if_unpadded']} unpadded, "
        f"{lay['padding_percent']:.1f}% padded rows with half tail tiles, "
        f"{lay['padding_percent_whole_tiles']:.1f}% with whole ones); tasks: {tasks}",
        f"{lay['flops'] / 1e9:.1f} GFLOP, {lay['bytes'] / 2**20:.0f} MiB moved: roofline "
        f"{lay['roofline_us']:.0f} us on an {lay['gpu']} ({lay['bound']}-bound)",
    ]
    return "\n".join(lines)
