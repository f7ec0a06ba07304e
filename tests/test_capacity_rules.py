"""Capacity rules of real models: drops in token order or slot-major (every first
choice before any second one), and renormalising the kept weights after the drop
(NLLB-MoE); the oracle against a transcription, the fused kernel on the emulator
against the oracle (one PE and two)."""

import numpy as np
import pytest

from conftest import emulator_checks
from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.cli.gpu_run import TOLERANCE, compare
from flashmoe_core.numerics import as_f32
from flashmoe_core.oracle.reference import expert_ffn, moe_forward, route_tokens

BASE = dict(tokens=60, hidden=64, ffn=32, experts=4, top_k=2, dtype="float32",
            capacity_factor=0.5)


def naive_kept(experts, cap, slot_major):
    """Walk the assignments in claim order, keeping each expert's first `cap`."""
    t, k = experts.shape
    order = [(tok, j) for j in range(k) for tok in range(t)] if slot_major else \
        [(tok, j) for tok in range(t) for j in range(k)]
    used = {}
    kept = np.zeros((t, k), bool)
    for tok, j in order:
        e = int(experts[tok, j])
        if used.get(e, 0) < cap:
            used[e] = used.get(e, 0) + 1
            kept[tok, j] = True
    return kept


@pytest.mark.parametrize("order", ["token", "slot"])
def test_oracle_drops_in_the_configured_order(order):
    cfg = MoEConfig(**BASE, capacity_order=order)
    w = MoEWeights.random(cfg, 1)
    r = route_tokens(cfg, w, random_tokens(cfg, 2))
    want = naive_kept(r.experts, cfg.capacity(), order == "slot")
    assert np.array_equal(r.kept, want) and not want.all()
    if order == "slot":  # first choices win over second ones
        other = route_tokens(cfg.replace(capacity_order="token"), w, random_tokens(cfg, 2))
        assert r.kept[:, 0].sum() >= other.kept[:, 0].sum()
        assert not np.array_equal(r.kept, other.kept)


def test_nllb_rule_slot_major_then_renormalised():
    """NLLB-MoE's top-2 router: softmax, the two best, capacity slot-major, then the kept
    probabilities divided by their sum; per token against a transcription."""
    cfg = MoEConfig(**{**BASE, "capacity_factor": 0.75}, renormalize=False,
                    capacity_order="slot", renormalize_after_drop=True)
    w = MoEWeights.random(cfg, 3)
    x = random_tokens(cfg, 4)
    y, r = moe_forward(cfg, w, x)
    some = r.kept.any(axis=1)
    assert (~r.kept[some]).any()  # tokens that lost a slot but kept another
    for tok in range(cfg.tokens):
        p = np.where(r.kept[tok], r.weights[tok].astype(np.float64), 0.0)
        p = p / p.sum() if p.sum() > 0 else p
        acc = np.zeros(cfg.hidden)
        for j in range(cfg.top_k):
            if r.kept[tok, j]:
                acc += p[j] * as_f32(expert_ffn(cfg, w, int(r.experts[tok, j]),
                                                x[tok:tok + 1])[0])
        np.testing.assert_allclose(as_f32(y[tok]), acc, rtol=1e-5, atol=1e-6)
    # Without the renormalisation a token that lost a slot keeps its smaller weight.
    y0, _ = moe_forward(cfg.replace(renormalize_after_drop=False), w, x)
    lost = (~r.kept).any(axis=1)
    assert not np.allclose(as_f32(y0)[lost], as_f32(y)[lost])


def test_the_rules_are_validated():
    with pytest.raises(ValueError, match="capacity_order"):
        MoEConfig(**BASE, capacity_order="expert")
    with pytest.raises(ValueError, match="renormalize_after_drop"):
        MoEConfig(**BASE, renormalize_after_drop="yes")
    assert not MoEConfig(**BASE, capacity_order="slot").default_routing


# ---------------------------------------------------------------- the fused kernel
KERNEL_LAYERS = {
    # Two token tiles (the bases of slot 1 come after slot 0's of both tiles).
    "bf16-gated-nllb": dict(tokens=200, hidden=128, ffn=64, experts=6, top_k=2,
                            mlp="gated", activation="silu", dtype="bfloat16",
                            capacity_factor=0.5, renormalize=False, capacity_order="slot",
                            renormalize_after_drop=True),
    "f16-vanilla-slot-major-top3": dict(tokens=80, hidden=64, ffn=64, experts=5, top_k=3,
                                        activation="gelu", dtype="float16",
                                        capacity_factor=0.6, capacity_order="slot"),
    # Logits through global memory (more experts than one gate tile), top-3, scaling.
    "f32-slot-major-130-experts": dict(tokens=96, hidden=64, ffn=32, experts=130, top_k=3,
                                       dtype="float32", capacity_factor=2.0,
                                       capacity_order="slot", routed_scaling=2.0,
                                       renormalize_after_drop=True),
}


@pytest.mark.emulator
@pytest.mark.parametrize("name", list(KERNEL_LAYERS))
def test_fused_kernel_drops_and_renormalises_like_the_oracle(name):
    from flashmoe_core.gpu.layer import MoELayer

    cfg = MoEConfig(**KERNEL_LAYERS[name])
    w = MoEWeights.random(cfg, 0)
    layer = MoELayer(cfg, w, backend="emulator", emulator_options=emulator_checks(2))
    x = random_tokens(cfg, 1)
    y, routing = layer(x, return_routing=True)
    ref = route_tokens(cfg, w, x)
    same = (routing.experts == ref.experts).all(axis=1)
    assert same.mean() >= 0.97
    assert np.array_equal(routing.kept[same], ref.kept[same]) and not routing.kept.all()
    res = compare(cfg, w, x, y, routing)
    assert res["rel_error"] <= TOLERANCE[cfg.dtype], res


@pytest.mark.emulator
def test_slot_major_capacity_per_source_rank_under_expert_parallelism():
    from flashmoe_core.emulator import EmulatedExpertParallel
    from flashmoe_core.oracle.reference import Routing

    cfg = MoEConfig(tokens=96, hidden=128, ffn=64, experts=5, top_k=2, world_size=2,
                    capacity_factor=0.75, capacity_order="slot", renormalize_after_drop=True)
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30, options=emulator_checks(4))
    xs = [random_tokens(cfg, 2, rank=r) for r in range(2)]
    ys, routings = ep(xs, return_routing=True)
    routing = Routing(*(np.concatenate([getattr(r, f) for r in routings])
                        for f in Routing._fields))
    ref = route_tokens(cfg, w, np.concatenate(xs), cfg.tokens)
    assert np.array_equal(routing.kept, ref.kept) and not ref.kept.all()
    res = compare(cfg, w, np.concatenate(xs), np.concatenate(ys), routing)
    assert res["rel_error"] <= TOLERANCE[cfg.dtype], res
