"""The backward's expert parallelism on the CPU emulator: several PEs in one process along
the forward's routes, against the one-GPU backward (bit for bit, dropless) and the
float64 oracle."""

import numpy as np
import pytest

from flashmoe_core import FlashMoETimeout, MoEConfig, MoELayer, MoEWeights, random_tokens
from flashmoe_core.emulator import EmulatedExpertParallel, EmulatorOptions
from flashmoe_core.numerics import round_to
from flashmoe_core.oracle.reference import Routing, moe_backward

pytestmark = pytest.mark.emulator

# The forward's expert-parallel test shape (its kernels are built once for both):
# nine experts, 5 + 4 on two PEs, 3 + 2 + 2 + 2 on four.
TOKENS = 48


def config(world):
    return MoEConfig(tokens=TOKENS, hidden=128, ffn=192, experts=9, top_k=2, world_size=world)


def upstream(cfg, tokens, rank):
    rng = np.random.default_rng([7, rank])
    return round_to(rng.standard_normal((tokens, cfg.hidden), dtype=np.float32), cfg.dtype)


_single = {}


def one_gpu(cfg, seed):
    """The same layer on one PE, all tokens (rank-major)."""
    one = cfg.replace(world_size=1, tokens=cfg.tokens * cfg.world_size)
    if one not in _single:
        _single[one] = MoELayer(one, MoEWeights.random(one, seed), backend="emulator")
    return _single[one]


def check_equals_world_1(cfg, ep, xs, dys):
    ys, saved, routings = ep(xs, save_for_backward=True, return_routing=True)
    dxs, grads = ep.backward(dys, saved)
    single = one_gpu(cfg, 1)
    y1, s1 = single(np.concatenate(xs), save_for_backward=True)
    dx1, g1 = single.backward(np.concatenate(dys), s1)
    assert np.array_equal(np.concatenate(ys).view(np.uint16), y1.view(np.uint16))
    # Dropless: dx and every expert's gradients equal the one-GPU ones bit for bit (each
    # owner reduces its experts' rows in the one-GPU order, sources in rank order).
    assert np.array_equal(np.concatenate(dxs).view(np.uint16), dx1.view(np.uint16))
    for r, g in enumerate(grads):
        assert g.expert_ids == cfg.local_experts(r)
    ids = np.concatenate([g.expert_ids for g in grads])
    for name in g1.names[1:]:
        got = np.concatenate([getattr(g, name) for g in grads])
        assert np.array_equal(got, getattr(g1, name)[ids]), name
    # The router is replicated: each PE has the partial over its tokens; their sum is the
    # one-GPU gradient up to float32 summation order.
    total = sum(g.router for g in grads)
    assert np.abs(total - g1.router).max() <= 1e-6 * np.abs(g1.router).max()
    return dxs, grads, routings


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_backward_equals_world_1_and_the_oracle(world):
    cfg = config(world)
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30)
    xs = [random_tokens(cfg, 2, rank=r) for r in range(world)]
    dys = [upstream(cfg, TOKENS, r) for r in range(world)]
    for _ in range(2):  # a second step reuses the slot, ring tags and signals move on
        dxs, grads, routings = check_equals_world_1(cfg, ep, xs, dys)
    routing = Routing(*(np.concatenate([getattr(r, f) for r in routings])
                        for f in Routing._fields))
    ref_dx, ref = moe_backward(cfg, w, np.concatenate(xs), np.concatenate(dys), routing)
    scale = np.abs(ref_dx).max()
    assert np.abs(np.concatenate(dxs).astype(np.float64) - ref_dx).max() <= 2e-2 * scale
    got_w1 = np.concatenate([g.w1 for g in grads])
    assert np.abs(got_w1 - ref.w1).max() <= 2e-2 * np.abs(ref.w1).max()
    assert ep._saved_pool.slots == 1


def test_uneven_tokens_under_random_schedules_and_stalls():
    cfg = config(2)
    ep = EmulatedExpertParallel(cfg, MoEWeights.random(cfg, 1), timeout_s=30,
                                options=EmulatorOptions(seed=3, lazy_cp_async=True, chaos=60,
                                                        chaos_us=200))
    xs = [random_tokens(cfg, 6, rank=0, tokens=TOKENS),
          random_tokens(cfg, 6, rank=1, tokens=TOKENS - 19)]
    dys = [upstream(cfg, x.shape[0], r) for r, x in enumerate(xs)]
    # One PE with fewer tokens: the world-1 layer sees them concatenated, as the oracle.
    ys, saved = ep(xs, save_for_backward=True)
    dxs, grads = ep.backward(dys, saved)
    single = MoELayer(cfg.replace(world_size=1, tokens=2 * TOKENS), MoEWeights.random(
        cfg.replace(world_size=1, tokens=2 * TOKENS), 1), backend="emulator")
    _, s1 = single(np.concatenate(xs), save_for_backward=True)
    dx1, g1 = single.backward(np.concatenate(dys), s1)
    assert np.array_equal(np.concatenate(dxs).view(np.uint16), dx1.view(np.uint16))
    ids = np.concatenate([g.expert_ids for g in grads])
    for name in g1.names[1:]:
        assert np.array_equal(np.concatenate([getattr(g, name) for g in grads]),
                              getattr(g1, name)[ids]), name


def test_silent_peer_in_the_backward_is_a_timeout_naming_it():
    cfg = config(2)
    ep = EmulatedExpertParallel(cfg, MoEWeights.random(cfg, 1), timeout_s=1.0)
    xs = [random_tokens(cfg, 2, rank=r) for r in range(2)]
    dys = [upstream(cfg, TOKENS, r) for r in range(2)]
    _, saved = ep(xs, save_for_backward=True)
    with pytest.raises(FlashMoETimeout, match="backward's wait for a peer's header") as exc:
        ep.backward(dys, saved, absent=[1])
    rec = exc.value.records[0]
    assert rec["rank"] == 0 and rec["peer"] == 1 and rec["phase"] == 17, rec
    assert exc.value.records[1] is None  # the silent PE never ran
    assert "peer 1" in str(exc.value)
    # Every PE recovered; the record was not consumed by the failed call.
    dxs, _ = ep.backward(dys, saved)
    _, again = ep(xs, save_for_backward=True)
    dxs2, _ = ep.backward(dys, again)
    assert all(np.array_equal(a.view(np.uint16), b.view(np.uint16)) for a, b in zip(dxs, dxs2))


def test_misuse():
    cfg = config(2)
    ep = EmulatedExpertParallel(cfg, MoEWeights.random(cfg, 1), timeout_s=30)
    xs = [random_tokens(cfg, 2, rank=r) for r in range(2)]
    _, saved = ep(xs, save_for_backward=True)
    with pytest.raises(ValueError, match="one per PE"):
        ep.backward([upstream(cfg, TOKENS, 0)], saved)
    with pytest.raises(ValueError, match=r"dy has shape \(47, 128\)"):
        ep.backward([upstream(cfg, TOKENS, 0), upstream(cfg, TOKENS - 1, 1)], saved)
    with pytest.raises(ValueError, match="save_for_backward=True runs every PE"):
        ep(xs, absent=[1], save_for_backward=True)


def test_recompute_under_expert_parallelism_equals_the_saved_backward():
    """recompute=True keeps each PE's x and routing only; the backward runs the forward
    again on every PE along the same routes, and the gradients are the saved ones bit
    for bit."""
    cfg = config(2)
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30)
    xs = [random_tokens(cfg, 5, rank=r) for r in range(2)]
    dys = [upstream(cfg, TOKENS, r) for r in range(2)]
    ys, full = ep(xs, save_for_backward=True)
    ys_light, light = ep(xs, save_for_backward=True, recompute=True)
    assert light.recompute and light.nbytes < full.nbytes / 2
    for a, b in zip(ys, ys_light):
        assert np.array_equal(a.view(np.uint16), b.view(np.uint16))
    dxs, grads = ep.backward(dys, full)
    for _ in range(2):  # the scratch slot is reused
        dxs_l, grads_l = ep.backward(dys, light)
        for a, b in zip(dxs, dxs_l):
            assert np.array_equal(a.view(np.uint16), b.view(np.uint16))
        for g, gl in zip(grads, grads_l):
            for name in g.names:
                assert np.array_equal(getattr(g, name), getattr(gl, name)), name
        _, light = ep(xs, save_for_backward=True, recompute=True)
    with pytest.raises(ValueError, match="recompute=True is an option"):
        ep(xs, recompute=True)
