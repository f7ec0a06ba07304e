"""Which device kernels exist and which compile-time constants each one takes.

This is where MoE meaning becomes plain constants for the host JIT: a config
value that changes the generated code (element type, activation, tile shape) is a
macro here; everything else (token count, capacity, pointers) is a kernel argument.
"""

from __future__ import annotations

from typing import Dict, List

from .host.abi import abi_defines
from .host.compiler import KernelSpec

__all__ = ["DTYPE_IDS", "ACT_IDS", "tile_config", "tile_gemm_spec", "nvshmem_ping_spec",
           "ring_test_spec", "abi_check_spec", "test_specs", "moe_defines", "moe_spec",
           "moe_specs"]

DTYPE_IDS: Dict[str, int] = {"float32": 0, "tfloat32": 1, "bfloat16": 2, "float16": 3}
ACT_IDS: Dict[str, int] = {"relu": 0, "gelu": 1, "silu": 2, "identity": 3}


def tile_config(dtype: str) -> Dict[str, int]:
    """Tensor-core tile of the SM80-style mainloop for an element type.

    Each stage holds BM x BK of A and BN x BK of B; three stages take 96 KiB, so two
    blocks fit on an SM of Ampere or Hopper.
    """
    bk = 64 if dtype in ("bfloat16", "float16") else 32
    return {"FMOE_BM": 128, "FMOE_BN": 128, "FMOE_BK": bk, "FMOE_STAGES": 3}


def tile_gemm_spec(dtype: str) -> KernelSpec:
    """The stand-alone tile GEMM (kernel tests, unfused baseline)."""
    defines = {"FMOE_DTYPE": DTYPE_IDS[dtype], **tile_config(dtype)}
    return KernelSpec.make("kernels/tile_gemm.cu", defines, label=f"the {dtype} tile GEMM",
                           family="tile_gemm", context={"dtype": dtype})


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
        "FMOE_BK": tile_config(cfg.dtype)["FMOE_BK"],
        "FMOE_STAGES": tile_config(cfg.dtype)["FMOE_STAGES"],
        "FMOE_EP": int(cfg.world_size > 1),
    }


def moe_spec(cfg) -> KernelSpec:
    """The fused MoE forward kernel for a configuration."""
    ep = cfg.world_size > 1
    return KernelSpec.make("kernels/moe_fused.cu", moe_defines(cfg), nvshmem=ep,
                           label="the expert-parallel fused MoE kernel" if ep
                           else "the fused MoE kernel",
                           family="moe_fused_ep" if ep else "moe_fused",
                           context={"config": cfg.to_json()})


def moe_specs(cfg) -> List[KernelSpec]:
    """Every kernel a layer of this configuration uses."""
    return [moe_spec(cfg)]
