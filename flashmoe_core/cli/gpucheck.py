"""What the short GPU check runs, and so which kernels its kit must hold.

``tools/gpu_check.sh`` runs on a GPU machine for a few minutes with kernels built
ahead of time (``python -m flashmoe_core.build --for-check DIR``). Both take their
configurations from here, so the kit holds exactly what the check loads; the tests
of the kit replay these requests against it.

No GPU is needed to import this module.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Dict, Iterable, List, Mapping, Tuple

from ..config import MoEConfig
from ..host.compiler import KernelSpec
from ..kernel.specs import (moe_backward_spec, moe_spec, nvshmem_ping_spec, ring_test_spec,
                            tile_gemm_spec)

__all__ = ["ARCH", "FORWARD", "EP_WORLDS", "BENCH_ROW", "BENCH_CONFIG", "SANITIZE_CONFIG",
           "Request", "ep_config", "cli_args", "stage_requests", "all_requests",
           "dump_requests", "load_requests"]

ARCH = "sm_90a"
"""The check's target: H100 and H200."""

_DTYPES = ("bfloat16", "float16", "tfloat32", "float32")

FORWARD: Dict[str, MoEConfig] = {
    **{d: MoEConfig(tokens=512, hidden=256, ffn=512, experts=16, top_k=2, dtype=d)
       for d in _DTYPES},
    "gated": MoEConfig(tokens=256, hidden=1000, ffn=1032, experts=7, top_k=7, mlp="gated",
                       activation="silu"),
    "capacity": MoEConfig(tokens=200, hidden=192, ffn=320, experts=12, top_k=3,
                          capacity_factor=0.5),
    "partial-tiles": MoEConfig(tokens=333, hidden=256, ffn=384, experts=8, top_k=2),
    "one-token": MoEConfig(tokens=1, hidden=64, ffn=64, experts=4, top_k=2, renormalize=False),
    "e256-k8": MoEConfig(tokens=300, hidden=256, ffn=256, experts=256, top_k=8,
                         activation="gelu"),
}
"""Fused forward vs the oracle: each dtype, gated, capacity, partial tiles, one token."""

EP_WORLDS = (2, 4)
"""PE counts of the expert-parallel runs (the check runs 2; the GPU test tier 2 and 4)."""


def ep_config(world: int) -> MoEConfig:
    """The expert-parallel layer the check and the GPU tier's MPI worker run on ``world``
    PEs sharing the GPU(s): an odd expert count, so the owners' shares differ."""
    return MoEConfig(tokens=300, hidden=256, ffn=384, experts=2 * world + 1, top_k=2,
                     world_size=world, dtype="bfloat16")


BENCH_ROW = {"dtype": "bfloat16", "tokens": 16384, "experts": 64, "mlp": "vanilla",
             "routing": "balanced"}
"""The benchmark row the check times (``tools/bench.py --row``)."""

BENCH_CONFIG = MoEConfig(tokens=16384, hidden=2048, ffn=2048, experts=64, top_k=2,
                         dtype="bfloat16")
"""The layer of :data:`BENCH_ROW` (tools/bench.py builds the same one)."""

SANITIZE_CONFIG = MoEConfig(tokens=200, hidden=128, ffn=256, experts=8, top_k=2)
"""The small layer run under compute-sanitizer (built with source lines)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One kernel a stage loads: its spec, whether it keeps source lines, who asks."""

    spec: KernelSpec
    lineinfo: bool = False
    origins: Tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"spec": self.spec.to_dict(), "lineinfo": self.lineinfo,
                "origins": list(self.origins)}

    @staticmethod
    def from_dict(d: Mapping) -> "Request":
        return Request(KernelSpec.from_dict(d["spec"]), bool(d.get("lineinfo", False)),
                       tuple(d.get("origins", ())))


def cli_args(cfg: MoEConfig) -> List[str]:
    """``python -m flashmoe_core.run`` flags that build exactly ``cfg``."""
    out = ["--tokens", str(cfg.tokens), "--hidden", str(cfg.hidden), "--ffn", str(cfg.ffn),
           "--experts", str(cfg.experts), "--top-k", str(cfg.top_k), "--mlp", cfg.mlp,
           "--activation", cfg.activation, "--dtype", cfg.dtype,
           "--capacity-factor", "none" if cfg.capacity_factor is None
           else repr(cfg.capacity_factor),
           "--renormalize" if cfg.renormalize else "--no-renormalize"]
    return out


def _layer(cfg: MoEConfig, origin: str, lineinfo: bool = False) -> Request:
    return Request(moe_spec(cfg), lineinfo, (origin,))


def stage_requests() -> Dict[str, List[Request]]:
    """The kernels each stage of the check loads, by stage name."""
    ep = []
    for world in EP_WORLDS:
        cfg = ep_config(world)
        one = cfg.replace(world_size=1, tokens=cfg.tokens * world)
        ep.append(_layer(cfg, f"ep:{world} PEs"))
        # The worker's world-1 layer over all PEs' tokens (bitwise comparison).
        ep.append(_layer(one, f"ep:world 1 of {world}"))
        # Its backward mode: the expert-parallel backward against world 1's.
        ep += [Request(moe_backward_spec(c), origins=(f"ep:backward {what}",))
               for c, what in ((cfg, f"{world} PEs"), (one, f"world 1 of {world}"))]
    return {
        "forward": [_layer(cfg, f"forward:{name}") for name, cfg in FORWARD.items()],
        "kernels": [Request(ring_test_spec(), origins=("kernels:ring",)),
                    Request(nvshmem_ping_spec(), origins=("kernels:nvshmem ping",))] +
                   [Request(tile_gemm_spec(d), origins=(f"kernels:tile gemm {d}",))
                    for d in _DTYPES],
        "ep": ep,
        "bench": [_layer(BENCH_CONFIG, "bench:fused"),
                  Request(tile_gemm_spec(BENCH_CONFIG.dtype),
                          origins=("bench:dense tile and unfused",))],
        "sanitize": [_layer(SANITIZE_CONFIG, "sanitize", lineinfo=True)],
    }


def all_requests(extra: Iterable[Request] = ()) -> List[Request]:
    """Every distinct (spec, lineinfo) of the check plus ``extra``, origins merged."""
    merged: Dict[Tuple[KernelSpec, bool], List[str]] = {}
    for r in [r for rs in stage_requests().values() for r in rs] + list(extra):
        merged.setdefault((r.spec, r.lineinfo), []).extend(r.origins)
    return [Request(spec, li, tuple(dict.fromkeys(o))) for (spec, li), o in merged.items()]


def dump_requests(requests: Iterable[Request]) -> str:
    """JSON text of a request list (a kernel listing file)."""
    return json.dumps([r.to_dict() for r in requests], indent=1, sort_keys=True)


def load_requests(text: str) -> List[Request]:
    """Parse :func:`dump_requests` output; raises ValueError on anything else."""
    try:
        data = json.loads(text)
        return [Request.from_dict(d) for d in data]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"not a kernel listing ({type(exc).__name__}: {exc})") from None
