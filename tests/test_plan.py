"""Buffer plans and compile-time constants of the fused kernel (CPU tier)."""

import math

import pytest

from flashmoe_core import MoEConfig
from flashmoe_core.kernel.specs import moe_defines
from flashmoe_core.kernel.plan import plan_layer


def test_plan_sizes():
    cfg = MoEConfig(tokens=1000, hidden=256, ffn=512, experts=10, top_k=3)
    p = plan_layer(cfg)
    assert p.token_tiles == 8 and p.logits_stride == 16
    assert p.max_rowtiles == math.ceil(3000 / 128) + 10
    assert p.up_tiles == 4 and p.down_tiles == 2
    assert p.ring_capacity == p.max_rowtiles * 2  # down tasks (combines run inline)
    ws = p.workspace
    assert ws["z"] == 3000 * 512 * 2 and ws["y_expert"] == 3000 * 256 * 2
    assert ws["logits"] == 1000 * 16 * 4 and ws["ring"] == p.ring_capacity * 8
    assert p.weights == {"router_t": 10 * 256 * 2, "w_up": 10 * 512 * 256 * 2,
                         "b_up": 10 * 512 * 2, "w_down": 10 * 256 * 512 * 2,
                         "b_down": 10 * 256 * 2}
    assert p.total_bytes == sum(ws.values()) + sum(p.weights.values())
    assert "total" in p.describe()


def test_ring_holds_remote_tasks_with_several_ranks():
    from flashmoe_core.kernel.plan import max_peer_tiles

    one = plan_layer(MoEConfig(tokens=256, hidden=256, ffn=256, experts=8))
    cfg = MoEConfig(tokens=256, hidden=256, ffn=256, experts=8, world_size=4)
    four = plan_layer(cfg)
    # Combine tasks (2 token tiles x 2 columns) and every tile peers may send.
    assert four.ring_capacity == one.ring_capacity + 2 * 2 + 4 * max_peer_tiles(cfg) * (2 + 2)


def test_gated_plan_has_two_up_matrices_and_half_width_tiles():
    p = plan_layer(MoEConfig(tokens=64, hidden=64, ffn=200, experts=2, mlp="gated",
                             dtype="float32"))
    assert set(p.weights) == {"router_t", "w_up", "w_up2", "w_down"}
    assert p.up_tiles == math.ceil(200 / 64)
    assert p.weights["w_up"] == 2 * 200 * 64 * 4


def test_runtime_values_are_not_compile_time():
    base = MoEConfig(tokens=128, hidden=256, ffn=256, experts=8)
    d = moe_defines(base)
    for changed in (base.replace(tokens=4096), base.replace(capacity_factor=1.25)):
        assert moe_defines(changed) == d
    # Several GPUs need the NVSHMEM build, but not one per world size or placement.
    ep = moe_defines(base.replace(world_size=2))
    assert ep["FMOE_EP"] == 1 and d["FMOE_EP"] == 0
    for changed in (base.replace(world_size=8), base.replace(world_size=2, placement=(1,) * 8)):
        assert moe_defines(changed) == ep
    assert moe_defines(base.replace(top_k=3)) != d
    assert moe_defines(base.replace(dtype="float16"))["FMOE_DTYPE"] == 3
    assert moe_defines(base.replace(mlp="gated"))["FMOE_GATED"] == 1


def test_layer_without_gpu_raises_one_clear_error():
    from conftest import HAS_GPU

    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    from flashmoe_core import CudaUnavailableError, MoEWeights
    from flashmoe_core.gpu.layer import MoELayer

    cfg = MoEConfig(tokens=8, hidden=8, ffn=8, experts=2)
    with pytest.raises(CudaUnavailableError, match="needs an NVIDIA GPU"):
        MoELayer(cfg, MoEWeights.random(cfg))


def test_layer_rejects_bad_construction_before_touching_a_gpu():
    from flashmoe_core import MoEWeights
    from flashmoe_core.gpu.layer import MoELayer

    cfg = MoEConfig(tokens=8, hidden=8, ffn=8, experts=2)
    other = MoEConfig(tokens=8, hidden=8, ffn=8, experts=3)
    with pytest.raises(ValueError, match="built for MoEConfig.experts=3"):
        MoELayer(cfg, MoEWeights.random(other))
    with pytest.raises(TypeError):
        MoELayer("cfg", MoEWeights.random(cfg))
    two = cfg.replace(world_size=2)
    with pytest.raises(ValueError, match="world_size=2 needs comm=.*mpirun -np 2"):
        MoELayer(two, MoEWeights.random(two))
    with pytest.raises(ValueError, match="max_blocks=1"):
        MoELayer(cfg, MoEWeights.random(cfg), max_blocks=1)
    with pytest.raises(ValueError, match="timeout_s"):
        MoELayer(cfg, MoEWeights.random(cfg), timeout_s=0)


def test_layer_checks_the_ranks_experts_are_held():
    from flashmoe_core import MoEWeights
    from flashmoe_core.gpu.layer import MoELayer

    class FakeComm:  # two ranks, this is rank 1: the check must fire before any GPU use
        def Get_size(self):
            return 2

        def Get_rank(self):
            return 1

        def allgather(self, value):  # rank 0 had no problem with the same config
            return [(value[0], None), value]

    cfg = MoEConfig(tokens=8, hidden=8, ffn=8, experts=4, world_size=2)
    w = MoEWeights.random(cfg, expert_ids=[0, 1])
    with pytest.raises(ValueError, match=r"rank 1 owns experts \[2, 3\]"):
        MoELayer(cfg, w, comm=FakeComm())
