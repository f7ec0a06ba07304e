"""Which device kernels exist and which compile-time constants each one takes.

This is where MoE meaning becomes plain constants for the host JIT: a config
value that changes the generated code (element type, activation, tile shape) is a
macro here; everything else (token count, capacity, pointers) is a kernel argument.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List

import numpy as np

from ..host.abi import ACT_IDS, DTYPE_IDS, abi_defines
from ..host.compiler import KernelSpec

__all__ = ["DTYPE_IDS", "ACT_IDS", "TILE", "HALF_TILE", "computed_rows", "TileConfig", "tile_config", "tile_gemm_spec",
           "GMMA_SWIZZLES", "gmma_test_spec", "ws_gemm_test_spec", "nvshmem_ping_spec",
           "ring_test_spec", "abi_check_spec", "test_specs", "moe_defines", "moe_spec",
           "moe_backward_spec", "moe_specs"]



TILE = 128
"""Rows of a row tile, tokens of a token tile and output columns of a column tile: the
tile GEMM's BM = BN, which every kernel, plan and launch derives its tiling from."""

HALF_TILE = TILE // 2
"""A tile with at most this many valid rows (an expert's tail, the last token tile) is a
half tile: the GEMM loads and multiplies only its first HALF_TILE rows
(gemm/tile_gemm.cuh, both mainloops)."""


def computed_rows(rows: int, half: bool = True) -> int:
    """Rows the tile GEMM multiplies for ``rows`` rows of one expert (or tokens): whole
    tiles, the tail as a half tile when it fits in one (and ``half``: False counts
    whole tiles only)."""
    full, tail = divmod(int(rows), TILE)
    if tail == 0:
        return full * TILE
    return full * TILE + (HALF_TILE if half and tail <= HALF_TILE else TILE)



@dataclasses.dataclass(frozen=True)
class TileConfig:
    """The tensor-core tile of one element type.

    Each stage holds bm x bk of A and bn x bk of B. The mma.sync mainloop runs three
    stages of bk (96 KiB for 16-bit types: two blocks fit on an SM of Ampere or Hopper);
    the sm_90a wgmma builds (16-bit types) run ``stages90`` stages of ``bk90`` instead:
    six of 32 (64-byte swizzle spans) in the same 96 KiB, so the producer keeps up to
    five stages in flight, not two. The kernels take both; each arch builds its own.
    """

    bm: int
    bn: int
    bk: int
    stages: int
    bk90: int
    stages90: int

    def up_cols(self, gated: bool) -> int:
        """Output columns of one up-projection task (gated: Wg and Wu rows share B)."""
        return self.bn // 2 if gated else self.bn

    def defines(self) -> Dict[str, int]:
        """The kernels' compile-time constants for this tile."""
        return {"FMOE_BM": self.bm, "FMOE_BN": self.bn, "FMOE_BK": self.bk,
                "FMOE_STAGES": self.stages, "FMOE_BK90": self.bk90,
                "FMOE_STAGES90": self.stages90}


def tile_config(dtype: str) -> TileConfig:
    """The tile of an element type (BK spans one 128-byte shared-memory row; the
    sm_90a tile of 16-bit types one 64-byte span)."""
    if dtype in ("bfloat16", "float16"):
        return TileConfig(bm=TILE, bn=TILE, bk=64, stages=3, bk90=32, stages90=6)
    return TileConfig(bm=TILE, bn=TILE, bk=32, stages=3, bk90=32, stages90=3)


def tile_gemm_spec(dtype: str) -> KernelSpec:
    """The stand-alone tile GEMM (kernel tests, unfused baseline)."""
    defines = {"FMOE_DTYPE": DTYPE_IDS[dtype], **tile_config(dtype).defines()}
    return KernelSpec.make("kernels/tile_gemm.cu", defines, label=f"the {dtype} tile GEMM",
                           family="tile_gemm", context={"dtype": dtype})


GMMA_SWIZZLES = {"interleave": 0, "32B": 1, "64B": 2, "128B": 3}
"""Shared-memory layouts of the wgmma operand tiles (CuTe's GMMA layout atoms)."""


def gmma_test_spec(dtype: str = "bfloat16", n: int = 64, swizzle: str = "128B") -> KernelSpec:
    """The sm_90a building blocks on their own: a 64 x n wgmma tile product handed over
    with an mbarrier (kernel-level test; Hopper only)."""
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"the wgmma test takes bfloat16 or float16, not {dtype!r}")
    if n not in (64, 128, 256):
        raise ValueError(f"the wgmma test's N is 64, 128 or 256, not {n}")
    if swizzle not in GMMA_SWIZZLES:
        raise ValueError(f"swizzle must be one of {sorted(GMMA_SWIZZLES)}, not {swizzle!r}")
    defines = {"FMOE_DTYPE": DTYPE_IDS[dtype], "FMOE_N": n, "FMOE_SWIZZLE": GMMA_SWIZZLES[swizzle]}
    return KernelSpec.make("kernels/gmma_test.cu", defines,
                           label=f"the {dtype} wgmma test kernel (N={n}, {swizzle})",
                           family="gmma_test", context={"dtype": dtype})


def nvshmem_ping_spec() -> KernelSpec:
    """Put-with-signal round trip (proves the NVSHMEM device path)."""
    return KernelSpec.make("kernels/nvshmem_ping.cu", {}, nvshmem=True,
                           label="the NVSHMEM ping kernel", family="nvshmem_ping")


def ring_test_spec() -> KernelSpec:
    """The task-ring protocol on its own (kernel-level test)."""
    return KernelSpec.make("kernels/ring_test.cu", {}, label="the task-ring test kernel",
                           family="ring_test")


def abi_check_spec() -> KernelSpec:
    """Compile-only check of host/abi.py against abi.cuh."""
    return KernelSpec.make("kernels/abi_check.cu", abi_defines(), label="the ABI check",
                           family="abi_check")


def ws_gemm_test_spec(dtype: str = "bfloat16", stages: int = 4, bk: int = 64) -> KernelSpec:
    """The warp-specialised sm_90a mainloop on its own: a persistent grid of 128 x 128
    tiles, a producer warp filling ``stages`` stages of ``bk`` (64: 128-byte spans, 32:
    64-byte) (kernel-level test; Hopper only)."""
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"the warp-specialised test takes bfloat16 or float16, not {dtype!r}")
    if not 2 <= int(stages) <= 8:
        raise ValueError(f"stages must be 2..8, not {stages}")
    if bk not in (32, 64):
        raise ValueError(f"bk must be 32 or 64, not {bk}")
    defines = {"FMOE_DTYPE": DTYPE_IDS[dtype], "FMOE_STAGES": int(stages), "FMOE_BK": int(bk),
               "FMOE_MAINLOOP": 90}
    return KernelSpec.make("kernels/ws_gemm_test.cu", defines,
                           label=f"the {dtype} warp-specialised GEMM test ({stages} stages "
                                 f"of k {bk})",
                           family="ws_gemm_test", context={"dtype": dtype})


def test_specs() -> List[KernelSpec]:
    """Every kernel the test tier and ahead-of-time builds compile."""
    specs = [tile_gemm_spec(d) for d in DTYPE_IDS]
    specs += [nvshmem_ping_spec(), ring_test_spec(), abi_check_spec()]
    return specs


def moe_defines(cfg) -> Dict[str, int]:
    """Compile-time constants of the fused kernel for a MoEConfig.

    Token count, capacity and placement are runtime values: one build serves every
    token count up to the layer's bound. Only whether experts are spread over several
    GPUs (world_size > 1: the NVSHMEM build) is compile-time, not the world size.
    """
    return {
        "FMOE_DTYPE": DTYPE_IDS[cfg.dtype],
        "FMOE_H": cfg.hidden,
        "FMOE_F": cfg.ffn,
        "FMOE_E": cfg.experts,
        "FMOE_K": cfg.top_k,
        "FMOE_GATED": int(cfg.mlp == "gated"),
        "FMOE_ACT": ACT_IDS[cfg.activation],
        "FMOE_RENORM": int(cfg.renormalize),
        **tile_config(cfg.dtype).defines(),
        "FMOE_EP": int(cfg.world_size > 1),
        **routing_defines(cfg),
        "FMOE_MLP_BIAS": int(cfg.mlp_bias),
        "FMOE_SWIGLU_ALPHA_BITS": _float_bits(cfg.swiglu_alpha),
        "FMOE_SWIGLU_LIMIT_BITS": _float_bits(cfg.swiglu_limit),
        "FMOE_SHARED_F": cfg.shared_width,
        "FMOE_SHARED_GATE": int(cfg.shared_gate),
    }


def _float_bits(v: float) -> str:
    """A float32 constant as the unsigned literal of its bits (exact in a macro)."""
    return f"0x{int(np.float32(v).view(np.uint32)):08x}u"


def routing_defines(cfg) -> Dict[str, object]:
    """The routing rules' constants (every value, so that a key names the whole rule)."""
    return {
        "FMOE_SIGMOID": int(cfg.scoring == "sigmoid"),
        "FMOE_SOFTMAX_AFTER_TOPK": int(cfg.softmax_after_topk),
        "FMOE_ROUTER_BIAS": int(cfg.router_bias),
        "FMOE_SELECTION_BIAS": int(cfg.selection_bias),
        "FMOE_GROUPS": cfg.n_group,
        "FMOE_TOPK_GROUPS": cfg.topk_group,
        "FMOE_SCALE_BITS": _float_bits(cfg.routed_scaling),
        "FMOE_ROUND_LOGITS": int(cfg.router_logits == "storage"),
        "FMOE_SLOT_MAJOR": int(cfg.capacity_order == "slot"),
        "FMOE_DROP_RENORM": int(cfg.renormalize_after_drop),
    }


def moe_spec(cfg) -> KernelSpec:
    """The fused MoE forward kernel for a configuration."""
    ep = cfg.world_size > 1
    return KernelSpec.make("kernels/moe_fused.cu", moe_defines(cfg), nvshmem=ep,
                           label="the expert-parallel fused MoE kernel" if ep
                           else "the fused MoE kernel",
                           family="moe_fused_ep" if ep else "moe_fused",
                           context={"config": cfg.to_json()})


def moe_backward_spec(cfg) -> KernelSpec:
    """The fused MoE backward kernel for a configuration (same constants as the forward;
    ``world_size > 1``: the NVSHMEM build)."""
    ep = cfg.world_size > 1
    return KernelSpec.make("kernels/moe_backward.cu", moe_defines(cfg), nvshmem=ep,
                           label="the expert-parallel fused MoE backward kernel" if ep
                           else "the fused MoE backward kernel",
                           family="moe_backward_ep" if ep else "moe_backward",
                           context={"config": cfg.to_json()})


def moe_specs(cfg, training: bool = False) -> List[KernelSpec]:
    """Every kernel a layer of this configuration uses (``training``: the backward too)."""
    specs = [moe_spec(cfg)]
    if training:
        specs.append(moe_backward_spec(cfg))
    return specs
