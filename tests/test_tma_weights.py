"""Weight tiles by TMA in the fused kernel's sm_90a mainloop (gemm/tile_gemm.cuh,
compute_tile_tma): the tensor maps the layers encode, the forward on the emulator
against the oracle at the shapes where TMA's bounds matter, and the bugs of this path
the emulator must catch (every emulator run forces the sm_90a mainloop)."""


import re

import numpy as np
import pytest

from conftest import emulator_checks, seed_mutant
from flashmoe_core import FlashMoETimeout, KernelFault, MoEConfig, MoEWeights, random_tokens
from flashmoe_core.cli.gpu_run import TOLERANCE, compare
from flashmoe_core.emulator import EmulatedExpertParallel, EmulatorError
from flashmoe_core.gpu.layer import MoELayer
from flashmoe_core.host.abi import TENSOR_MAP_SLOTS, TENSOR_MAPS
from flashmoe_core.host.tma import TENSOR_MAP_BYTES, encode_emulated
from flashmoe_core.kernel.contract import tensor_map_fields, tensor_maps

GEMM = "include/flashmoe/gemm/tile_gemm.cuh"


# ---------------------------------------------------------------- the maps (CPU)
def test_tensor_map_fields_of_every_weight():
    cfg = MoEConfig(tokens=64, hidden=256, ffn=320, experts=8, top_k=2, mlp="gated",
                    n_shared=1, shared_ffn=192, dtype="bfloat16")
    addr = {n: 4096 * (i + 1) for i, n in enumerate(TENSOR_MAP_SLOTS)}
    f = tensor_map_fields(cfg, addr.get, local_experts=4)
    assert set(f) == set(TENSOR_MAP_SLOTS)
    # {in, out, expert}; a box is 32 bf16 (64 B, the sm_90a tile's BK) of K by the rows
    # of one B-tile part: gated up tiles are 64 Wg rows then 64 Wu rows, down tiles 128.
    assert f["w_up"] == dict(address=addr["w_up"], elem_bytes=2, dims=(256, 320, 4),
                             strides=(512, 320 * 512), box=(32, 64, 1), swizzle="64B")
    assert f["w_up2"]["address"] == addr["w_up2"] and f["w_up2"]["dims"] == (256, 320, 4)
    assert f["w_down"] == dict(address=addr["w_down"], elem_bytes=2, dims=(320, 256, 4),
                               strides=(640, 256 * 640), box=(32, 128, 1), swizzle="64B")
    assert f["ws_up"]["dims"] == (256, 192, 1) and f["ws_up2"]["box"] == (32, 64, 1)
    assert f["ws_down"]["dims"] == (192, 256, 1) and f["ws_down"]["strides"] == (384, 256 * 384)

    plain = cfg.replace(mlp="vanilla", n_shared=0, shared_ffn=None, dtype="float16")
    g = tensor_map_fields(plain, addr.get)
    assert set(g) == {"w_up", "w_down"}
    assert g["w_up"]["dims"] == (256, 320, 8) and g["w_up"]["box"] == (32, 128, 1)
    blob = tensor_maps(plain, addr.get, encode_emulated)
    assert blob.shape == (TENSOR_MAPS * TENSOR_MAP_BYTES,)
    for name, slot in TENSOR_MAP_SLOTS.items():
        m = blob[slot * TENSOR_MAP_BYTES:(slot + 1) * TENSOR_MAP_BYTES]
        want = encode_emulated(**g[name]) if name in g else np.zeros(TENSOR_MAP_BYTES, np.uint8)
        assert (m == want).all(), name


# ---------------------------------------------------------------- the forward
# Ragged shapes: K = 200 and 136 end inside a 128-byte span (the boxes read zeros past
# it), N = 200 and 136 end inside a tile (rows past the tensor load as zeros), a shared
# expert (2-D maps), and tail tiles of at most 64 rows.
LAYERS = {
    "bf16-vanilla-shared-ragged": dict(tokens=150, hidden=200, ffn=136, experts=5, top_k=2,
                                       n_shared=1, shared_ffn=72, dtype="bfloat16"),
    "f16-gated-shared-gate": dict(tokens=130, hidden=128, ffn=192, experts=4, top_k=2,
                                  mlp="gated", n_shared=2, shared_ffn=64, shared_gate=True,
                                  dtype="float16"),
}


@pytest.mark.emulator
@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_with_weights_by_tma_matches_the_oracle(name, monkeypatch):
    monkeypatch.setenv("FLASHMOE_EMULATOR_MAINLOOP", "sm90")
    cfg = MoEConfig(**LAYERS[name])
    w = MoEWeights.random(cfg, 0)
    layer = MoELayer(cfg, w, backend="emulator", emulator_options=emulator_checks(3))
    for launch in range(2):  # the stage barriers' phases carry over between launches
        x = random_tokens(cfg, launch + 1)
        y, routing = layer(x, return_routing=True)
        res = compare(cfg, w, x, y, routing)
        assert res["rel_error"] <= TOLERANCE[cfg.dtype], (launch, res)
        assert res["routing_agreement"] >= 0.999, res


@pytest.mark.emulator
def test_expert_parallel_maps_index_each_pes_own_experts(monkeypatch):
    # Nine experts as 5 + 4: each PE's maps cover its local experts only.
    monkeypatch.setenv("FLASHMOE_EMULATOR_MAINLOOP", "sm90")
    cfg = MoEConfig(tokens=96, hidden=128, ffn=192, experts=9, top_k=2, world_size=2,
                    mlp="gated", dtype="bfloat16")
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30, options=emulator_checks(2))
    xs = [random_tokens(cfg, 2, rank=r) for r in range(2)]
    ys, routings = ep(xs, return_routing=True)
    for r in range(2):
        res = compare(cfg.replace(world_size=1, tokens=96), w, xs[r], ys[r], routings[r])
        assert res["rel_error"] <= TOLERANCE[cfg.dtype], (r, res)


@pytest.mark.emulator
def test_a_layer_without_the_maps_is_refused(monkeypatch):
    import flashmoe_core.emulator as emulated

    monkeypatch.setenv("FLASHMOE_EMULATOR_MAINLOOP", "sm90")
    original = emulated._PeBuffers._upload_weights

    def without_maps(self, w):  # a host that forgot them
        original(self, w)
        self.buf.pop("tensor_maps")
    monkeypatch.setattr(emulated._PeBuffers, "_upload_weights", without_maps)
    cfg = MoEConfig(tokens=40, hidden=128, ffn=128, experts=4, top_k=2)
    layer = MoELayer(cfg, MoEWeights.random(cfg, 0), backend="emulator")
    with pytest.raises(KernelFault, match="refused its launch.*tensor_maps is null"):
        layer(random_tokens(cfg, 1))


# ---------------------------------------------------------------- seeded bugs
def _mutant(tmp_path, monkeypatch, *edits):
    """device/ with one bug in the tile GEMM (edits: old, new, ...), sm_90a mainloop."""
    seed_mutant(tmp_path, monkeypatch, GEMM, *edits)
    monkeypatch.setenv("FLASHMOE_EMULATOR_MAINLOOP", "sm90")


def _run(cfg, options=None):
    w = MoEWeights.random(cfg, 0)
    layer = MoELayer(cfg, w, backend="emulator", emulator_options=options)
    x = random_tokens(cfg, 1)
    y, routing = layer(x, return_routing=True)
    return compare(cfg, w, x, y, routing)


SMALL = MoEConfig(tokens=64, hidden=128, ffn=256, experts=4, top_k=2, dtype="bfloat16")


@pytest.mark.emulator
def test_reading_a_stage_before_its_barrier_phase_gives_wrong_results(tmp_path, monkeypatch):
    # The consumers do not wait for a stage's full phase: the wgmmas read bytes that
    # have not landed (NaN), or the loads land under them, or the producer's arrivals
    # meet phases that already moved on.
    _mutant(tmp_path, monkeypatch,
            "      if (!wait_barrier(stage_barriers(smem) + stage, phase, timeout_ns, &ws->gone)) {",
            "      if (false) {")
    try:
        res = _run(SMALL)
    except EmulatorError as exc:
        assert re.search("every arrival already|lands after the phase|before the wait_group|"
                         "never waited for", str(exc)), exc
    else:
        assert not res["rel_error"] <= TOLERANCE[SMALL.dtype], res


@pytest.mark.emulator
def test_a_weight_tile_that_never_lands_is_a_timeout_naming_the_wait(tmp_path, monkeypatch):
    # The first box of every stage is declared but never loaded: its phase stays open;
    # the consumers' bounded wait gives up and the fault record says which wait it was.
    _mutant(tmp_path, monkeypatch,
            "      sm90::tma_load_3d(dst + kb * BN * kSpanBytes, static_cast<const "
            "sm90::TensorMap*>(b.map0),\n                        bar, k0 + kb * kBoxK, b.n0, "
            "b.e);\n", "")
    w = MoEWeights.random(SMALL, 0)
    layer = MoELayer(SMALL, w, backend="emulator", timeout_s=0.5)
    with pytest.raises(FlashMoETimeout, match="TMA load of a weight tile"):
        layer(random_tokens(SMALL, 1))


@pytest.mark.emulator
def test_a_refill_without_the_proxy_fence_is_reported(tmp_path, monkeypatch):
    # The producer's TMA refill over B rows its other lanes wrote by cp.async for the
    # gate (generic-proxy writes), without fence.proxy.async after they reached it.
    _mutant(tmp_path, monkeypatch,
            "            sm90::fence_proxy_async();\n            load_stage_b_tma(",
            "            load_stage_b_tma(")
    with pytest.raises(EmulatorError, match=r"cp\.async\.bulk\.tensor\.3d at \S*sm90\.cuh:\d+ "
                                            r"overwrites .* wrote through the generic proxy"):
        _run(SMALL, emulator_checks(1))


@pytest.mark.emulator
def test_a_store_over_a_live_stage_barrier_is_reported(tmp_path, monkeypatch):
    # The consumers' stage word stored over the job barrier.
    _mutant(tmp_path, monkeypatch,
            "      ws->stage = stage;\n",
            "      reinterpret_cast<uint32_t*>(&ws->job)[0] = stage;\n")
    with pytest.raises(EmulatorError, match="ordinary store overwrote since its mbarrier.init"):
        _run(SMALL)
