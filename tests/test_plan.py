"""Buffer plans and compile-time constants of the fused kernel (CPU tier)."""

import math

import pytest

from flashmoe_core import MoEConfig
from flashmoe_core.kernels import moe_defines
from flashmoe_core.plan import plan_layer


def test_plan_sizes():
    cfg = MoEConfig(tokens=1000, hidden=256, ffn=512, experts=10, top_k=3)
    p = plan_layer(cfg)
    assert p.token_tiles == 8 and p.logits_stride == 16
    assert p.max_rowtiles == math.ceil(3000 / 128) + 10
    assert p.up_tiles == 4 and p.down_tiles == 2
    assert p.ring_capacity == p.max_rowtiles * 2 + 8 * 2
    ws = p.workspace
    assert ws["z"] == 3000 * 512 * 2 and ws["y_expert"] == 3000 * 256 * 2
    assert ws["logits"] == 1000 * 16 * 4 and ws["ring"] == p.ring_capacity * 8
    assert p.weights == {"router_t": 10 * 256 * 2, "w_up": 10 * 512 * 256 * 2,
                         "b_up": 10 * 512 * 2, "w_down": 10 * 256 * 512 * 2,
                         "b_down": 10 * 256 * 2}
    assert p.total_bytes == sum(ws.values()) + sum(p.weights.values())
    assert "total" in p.describe()


def test_gated_plan_has_two_up_matrices_and_half_width_tiles():
    p = plan_layer(MoEConfig(tokens=64, hidden=64, ffn=200, experts=2, mlp="gated",
                             dtype="float32"))
    assert set(p.weights) == {"router_t", "w_up", "w_up2", "w_down"}
    assert p.up_tiles == math.ceil(200 / 64)
    assert p.weights["w_up"] == 2 * 200 * 64 * 4


def test_runtime_values_are_not_compile_time():
    base = MoEConfig(tokens=128, hidden=256, ffn=256, experts=8)
    d = moe_defines(base)
    for changed in (base.replace(tokens=4096), base.replace(capacity_factor=1.25),
                    base.replace(world_size=2), base.replace(world_size=2, placement=(1,) * 8)):
        assert moe_defines(changed) == d
    assert moe_defines(base.replace(top_k=3)) != d
    assert moe_defines(base.replace(dtype="float16"))["FMOE_DTYPE"] == 3
    assert moe_defines(base.replace(mlp="gated"))["FMOE_GATED"] == 1


def test_layer_without_gpu_raises_one_clear_error():
    from conftest import HAS_GPU

    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    from flashmoe_core import CudaUnavailableError, MoEWeights
    from flashmoe_core.layer import MoELayer

    cfg = MoEConfig(tokens=8, hidden=8, ffn=8, experts=2)
    with pytest.raises(CudaUnavailableError, match="needs an NVIDIA GPU"):
        MoELayer(cfg, MoEWeights.random(cfg))


def test_layer_rejects_bad_construction_before_touching_a_gpu():
    from flashmoe_core import MoEWeights
    from flashmoe_core.layer import MoELayer

    cfg = MoEConfig(tokens=8, hidden=8, ffn=8, experts=2)
    other = MoEConfig(tokens=8, hidden=8, ffn=8, experts=3)
    with pytest.raises(ValueError, match="same config"):
        MoELayer(cfg, MoEWeights.random(other))
    with pytest.raises(TypeError):
        MoELayer("cfg", MoEWeights.random(cfg))
    two = cfg.replace(world_size=2)
    with pytest.raises(ValueError, match="world_size=1"):
        MoELayer(two, MoEWeights.random(two))
