"""Expert parallelism on the CPU emulator: several PEs in one process, NVSHMEM emulated
between them, the same scenarios as the GPU tier's mpirun tests (test_gpu_ep.py).

Most run with every emulator check on (weak memory, races, preemption, lazy cp.async;
conftest.emulator_checks) under several seeds; the ones about timing (a busy peer, the
watchdog) run unchecked, at the emulator's full speed."""

import numpy as np
import pytest

from conftest import emulator_checks
from flashmoe_core import FlashMoETimeout, MoEConfig, MoEWeights, random_tokens
from flashmoe_core.emulator import EmulatedExpertParallel, EmulatorOptions
from flashmoe_core.cli.gpu_run import TOLERANCE, compare
from flashmoe_core.gpu.layer import MoELayer
from flashmoe_core.oracle.reference import Routing

pytestmark = pytest.mark.emulator

# Nine experts: 5 + 4 on two PEs, 3 + 2 + 2 + 2 on four (uneven on purpose).
TOKENS = 96


def config(world, **kw):
    return MoEConfig(tokens=TOKENS, hidden=128, ffn=192, experts=9, top_k=2, world_size=world,
                     **kw)


def inputs(cfg):
    return [random_tokens(cfg, 2, rank=r) for r in range(cfg.world_size)]


def joined(ys, routings):
    return np.concatenate(ys), Routing(*(np.concatenate([getattr(r, f) for r in routings])
                                         for f in Routing._fields))


def check(cfg, w, xs, ys, routings):
    y, routing = joined(ys, routings)
    res = compare(cfg, w, np.concatenate(xs), y, routing)
    assert res["rel_error"] <= TOLERANCE[cfg.dtype], res
    assert res["routing_agreement"] >= 0.999, res
    return y


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_matches_oracle_and_world_1(world):
    cfg = config(world)
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30, options=emulator_checks(1))
    xs = inputs(cfg)
    for launch in range(3):  # epochs, ring tags and done-signals advance
        ep.options = emulator_checks(seed=launch + world)  # another schedule each launch
        ys, routings = ep(xs, return_routing=True)
        y = check(cfg, w, xs, ys, routings)
        assert [ep.testing.state(r)["epoch"] for r in range(world)] == [launch + 1] * world
    one = cfg.replace(world_size=1, tokens=TOKENS * world)
    single = MoELayer(one, MoEWeights.random(one, 1), backend="emulator",
                      emulator_options=emulator_checks(7))
    y1 = single(np.concatenate(xs))
    # Dropless: the expert-parallel output equals the one-GPU output bit for bit.
    assert np.array_equal(y1.view(np.uint16), y.view(np.uint16))


def test_expert_parallel_with_capacity_below_the_token_bound():
    cfg = config(2, capacity_factor=0.6)
    w = MoEWeights.random(cfg, 4)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30, options=emulator_checks(4))
    xs = [random_tokens(cfg, 5, rank=r, tokens=61) for r in range(2)]
    ys, routings = ep(xs, return_routing=True)
    assert [y.shape[0] for y in ys] == [61, 61]
    assert not np.concatenate([r.kept for r in routings]).all()
    check(cfg, w, xs, ys, routings)


def test_random_schedules_and_stalls_keep_the_protocol_correct():
    cfg = config(2)
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30,
                                options=EmulatorOptions.strict(11, chaos=40, chaos_us=300))
    xs = inputs(cfg)
    for _ in range(2):
        ys, routings = ep(xs, return_routing=True)
        check(cfg, w, xs, ys, routings)


def test_subscriber_threads_with_many_events_each():
    # 256 experts, top-8: each PE sends ~128 tiles and receives as many, so every
    # subscriber thread watches several events at once; stalls shuffle their arrival.
    cfg = MoEConfig(tokens=128, hidden=128, ffn=128, experts=256, top_k=8, world_size=2)
    w = MoEWeights.random(cfg, 3)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30,
                                options=EmulatorOptions.strict(5, chaos=20, chaos_us=200))
    xs = inputs(cfg)
    ys, routings = ep(xs, return_routing=True)
    check(cfg, w, xs, ys, routings)


def test_delayed_rank_still_correct():
    cfg = config(2)
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30, options=emulator_checks(6))
    ep.testing.inject_delay(0, 0.3)
    xs = inputs(cfg)
    for _ in range(2):
        ys, routings = ep(xs, return_routing=True)
        check(cfg, w, xs, ys, routings)


@pytest.mark.parametrize("world", [2, 4])
def test_absent_rank_makes_the_others_time_out(world):
    cfg = config(world)
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=1.0, options=emulator_checks(world))
    xs = inputs(cfg)
    with pytest.raises(FlashMoETimeout) as exc:
        ep(xs, absent=[world - 1])
    records = exc.value.records
    assert records[world - 1] is None  # the absent PE never ran
    for r in range(world - 1):
        rec = records[r]
        assert rec["code_name"] == "timeout" and rec["rank"] == r, rec
        assert rec["peer"] == world - 1 and rec["phase"] == 8, rec  # its header never came
    assert "peer" in str(exc.value) and f"peer {world - 1}" in str(exc.value)
    # Recovery keeps the failed launch's signals (PE 0 had put its header, tag 1, to
    # the absent PE) and moves every PE to one epoch past them instead.
    assert ep.testing.workspace(world - 1, "header_sig", (world,), np.uint64)[0] == 1
    assert [ep.testing.state(r)["epoch"] for r in range(world)] == [1] * world
    ys, routings = ep(xs, return_routing=True)
    check(cfg, w, xs, ys, routings)
    assert [ep.testing.state(r)["epoch"] for r in range(world)] == [2] * world


def test_the_emulator_honours_the_timeout_variable(monkeypatch):
    # An absent PE used to time out after the emulator's 60 s whatever this said.
    import time

    monkeypatch.setenv("FLASHMOE_TIMEOUT_S", "0.5")
    cfg = config(2)
    ep = EmulatedExpertParallel(cfg, MoEWeights.random(cfg, 1))
    t0 = time.monotonic()
    with pytest.raises(FlashMoETimeout) as exc:
        ep(inputs(cfg), absent=[1])
    assert time.monotonic() - t0 < 20
    assert 0.5 <= exc.value.records[0]["elapsed_ns"] / 1e9 < 5
    monkeypatch.setenv("FLASHMOE_TIMEOUT_S", "nan")
    with pytest.raises(ValueError, match="FLASHMOE_TIMEOUT_S='nan'"):
        EmulatedExpertParallel(cfg, MoEWeights.random(cfg, 1))


def test_a_peer_busy_for_longer_than_the_timeout_is_not_a_fault():
    # Every token goes to PE 1's experts: PE 0 sends its rows and then idles while PE 1
    # computes for seconds. Waits are bounded by time without progress anywhere (this
    # PE's or a peer's), not by their own length.
    cfg = MoEConfig(tokens=TOKENS, hidden=512, ffn=768, experts=9, top_k=2, world_size=2)
    w = MoEWeights.random(cfg, 1)
    owned_by_0 = list(cfg.local_experts(0))
    w.router[:, owned_by_0] = 0.0
    w.router[0, owned_by_0] = -30.0
    xs = inputs(cfg)
    for x in xs:
        x[:, 0] = np.abs(x[:, 0]) + 4.0  # logits of PE 0's experts <= -120
    ep = EmulatedExpertParallel(cfg, w, timeout_s=0.5)
    ys, routings = ep(xs, return_routing=True)
    assert not np.isin(np.concatenate([r.experts for r in routings]), owned_by_0).any()
    check(cfg, w, xs, ys, routings)


@pytest.mark.parametrize("mode", ["gate_only", "dispatch_only"])
def test_component_modes_end_the_launch_for_the_peers_too(mode):
    # A component pass must still tell every peer it is done: the next full pass
    # waits for that before overwriting what the peer may read.
    cfg = config(2)
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=2.0, options=emulator_checks(3))
    xs = inputs(cfg)
    ep.testing.run_mode(xs, mode)
    k = cfg.top_k
    experts = ep.testing.workspace(0, "topk_expert", (TOKENS, k), np.int32)
    assert ((experts >= 0) & (experts < cfg.experts)).all()
    ys, routings = ep(xs, return_routing=True)
    check(cfg, w, xs, ys, routings)
    assert ep.testing.state(0)["epoch"] == ep.testing.state(1)["epoch"] == 2


def test_watchdog_stops_a_launch_the_kernel_would_wait_on_for_long():
    from flashmoe_core.emulator import EmulatorError

    cfg = config(2)
    ep = EmulatedExpertParallel(cfg, MoEWeights.random(cfg, 1), timeout_s=120.0,
                                options=EmulatorOptions.strict(1, watchdog_s=1.0))
    with pytest.raises(EmulatorError, match="watchdog") as exc:
        ep(inputs(cfg), absent=[1])
    assert "__nanosleep at wait.cuh:" in str(exc.value)  # where the threads were spinning


def test_bad_expert_parallel_input_is_rejected():
    cfg = config(2)
    w = MoEWeights.random(cfg, 1)
    with pytest.raises(ValueError, match="world_size >= 2"):
        EmulatedExpertParallel(cfg.replace(world_size=1), MoEWeights.random(cfg.replace(world_size=1), 1))
    with pytest.raises(ValueError, match="EmulatedExpertParallel"):
        MoELayer(cfg, w, backend="emulator")
    ep = EmulatedExpertParallel(cfg, w, options=emulator_checks())
    with pytest.raises(ValueError, match="one per PE"):
        ep(inputs(cfg)[:1])
    with pytest.raises(ValueError, match="absent PEs"):
        ep(inputs(cfg), absent=[5])
    with pytest.raises(ValueError, match="grid=1"):
        EmulatedExpertParallel(cfg, w, grid=1)


def test_expert_parallel_with_deepseek_routing_equals_world_1():
    """Routing rules run per rank in the gate: EP output still equals one PE's."""
    cfg = config(2, scoring="sigmoid", selection_bias=True, n_group=3, topk_group=2,
                 routed_scaling=2.5).replace(top_k=3)
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30)
    xs = inputs(cfg)
    ys, routings = ep(xs, return_routing=True)
    y = check(cfg, w, xs, ys, routings)
    one = cfg.replace(world_size=1, tokens=TOKENS * 2)
    y1 = MoELayer(one, MoEWeights.random(one, 1), backend="emulator")(np.concatenate(xs))
    assert np.array_equal(y1.view(np.uint16), y.view(np.uint16))
