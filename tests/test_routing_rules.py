"""Routing rules of real models: the oracle against a per-token transcription of each
model family's published rule, and the config's validation of bad combinations."""

import math

import numpy as np
import pytest

from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.numerics import as_f32, round_to
from flashmoe_core.oracle.reference import gate, moe_forward, route, route_tokens

BASE = dict(tokens=40, hidden=64, ffn=64, dtype="float32")


def naive_route(cfg, w, x):
    """One token at a time, in float64, the rule as the model codes state it."""
    xr = as_f32(round_to(x, cfg.dtype)).astype(np.float64)
    router = as_f32(w.router).astype(np.float64)
    experts, weights = [], []
    for row in xr:
        z = row @ router
        if cfg.router_bias:
            z = z + as_f32(w.router_bias).astype(np.float64)
        z = z.astype(np.float32)
        if cfg.router_logits == "storage":
            z = as_f32(round_to(z, cfg.dtype))
        z = z.astype(np.float64)
        if cfg.scoring == "sigmoid":
            s = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
        else:
            s = (np.exp(z - z.max()) / np.exp(z - z.max()).sum()).astype(np.float32)
        key = z.astype(np.float32) if cfg.softmax_after_topk else s.copy()
        if cfg.selection_bias:
            key = (key + w.selection_bias).astype(np.float32)
        if cfg.n_group > 1:
            size = cfg.experts // cfg.n_group
            gscore = [np.float32(sum(sorted(key[g * size:(g + 1) * size])[-2:]))
                      for g in range(cfg.n_group)]
            best = sorted(range(cfg.n_group), key=lambda g: (-gscore[g], g))[:cfg.topk_group]
            for g in range(cfg.n_group):
                if g not in best:
                    key[g * size:(g + 1) * size] = -np.inf
        chosen = sorted(range(cfg.experts), key=lambda e: (-key[e], e))[:cfg.top_k]
        if cfg.softmax_after_topk:
            zc = z.astype(np.float32).astype(np.float64)[chosen]
            wt = np.exp(zc - zc.max()) / np.exp(zc - zc.max()).sum()
        else:
            wt = s[chosen].astype(np.float64)
            if cfg.renormalize:
                wt = wt / wt.sum()
        experts.append(chosen)
        weights.append((wt * cfg.routed_scaling).astype(np.float32))
    return np.array(experts, np.int32), np.array(weights, np.float32)


RULES = {
    "mixtral": dict(experts=8, top_k=2, mlp="gated", activation="silu"),
    "mixtral-bf16-logits": dict(experts=8, top_k=2, mlp="gated", activation="silu",
                                router_logits="storage", dtype="bfloat16"),
    "olmoe": dict(experts=16, top_k=8, mlp="gated", activation="silu", renormalize=False),
    "deepseek-v3": dict(experts=32, top_k=4, mlp="gated", activation="silu",
                        scoring="sigmoid", selection_bias=True, n_group=8, topk_group=3,
                        routed_scaling=2.5),
    "sigmoid-plain": dict(experts=12, top_k=3, scoring="sigmoid", renormalize=False),
    "gpt-oss": dict(experts=8, top_k=4, mlp="gated", activation="silu",
                    softmax_after_topk=True, router_bias=True),
}


@pytest.mark.parametrize("name", list(RULES))
def test_oracle_routing_follows_the_published_rule(name):
    cfg = MoEConfig(**{**BASE, **RULES[name]})
    w = MoEWeights.random(cfg, 3)
    x = random_tokens(cfg, 4)
    r = route_tokens(cfg, w, x)
    experts, weights = naive_route(cfg, w, x)
    assert np.array_equal(r.experts, experts)
    np.testing.assert_allclose(r.weights, weights, rtol=2e-6, atol=1e-7)
    y, r2 = moe_forward(cfg, w, x)
    assert np.array_equal(r2.experts, r.experts) and np.isfinite(y.astype(np.float32)).all()


def test_selection_bias_chooses_but_does_not_weight():
    cfg = MoEConfig(**{**BASE, "experts": 6, "top_k": 2, "scoring": "sigmoid",
                       "selection_bias": True})
    w = MoEWeights.random(cfg, 0)
    w.selection_bias[:] = 0
    w.selection_bias[5] = 10.0  # expert 5 always chosen
    x = random_tokens(cfg, 0)
    logits, scores = gate(cfg, w, x)
    r = route_tokens(cfg, w, x)
    assert (r.experts[:, 0] == 5).all()
    # Its weight is its own (renormalised) sigmoid score, not score + 10.
    expect = scores[:, 5] / (scores[:, 5] + np.take_along_axis(scores, r.experts[:, 1:], 1)[:, 0])
    np.testing.assert_allclose(r.weights[:, 0], expect, rtol=1e-6)


def test_group_limit_keeps_experts_of_the_best_groups_only():
    cfg = MoEConfig(**{**BASE, "experts": 16, "top_k": 3, "scoring": "sigmoid",
                       "n_group": 4, "topk_group": 2})
    w = MoEWeights.random(cfg, 1)
    x = random_tokens(cfg, 2)
    _, scores = gate(cfg, w, x)
    r = route_tokens(cfg, w, x)
    top2 = -np.sort(-scores.reshape(-1, 4, 4), axis=2)[:, :, :2].sum(axis=2)
    for t in range(x.shape[0]):
        best = set(np.argsort(-top2[t], kind="stable")[:2])
        assert {int(e) // 4 for e in r.experts[t]} <= best


def test_routed_scaling_multiplies_every_weight():
    a = MoEConfig(**{**BASE, "experts": 8, "top_k": 2})
    b = a.replace(routed_scaling=2.5)
    w = MoEWeights.random(a, 0)
    x = random_tokens(a, 0)
    ra, rb = route_tokens(a, w, x), route_tokens(b, MoEWeights(b, **w.arrays()), x)
    assert np.array_equal(ra.experts, rb.experts)
    np.testing.assert_allclose(rb.weights, ra.weights * 2.5, rtol=1e-6)


def test_softmax_after_topk_equals_renormalised_softmax_up_to_rounding():
    a = MoEConfig(**{**BASE, "experts": 8, "top_k": 3})
    b = a.replace(softmax_after_topk=True)
    w = MoEWeights.random(a, 5)
    x = random_tokens(a, 5)
    ra, rb = route_tokens(a, w, x), route_tokens(b, MoEWeights(b, **w.arrays()), x)
    assert np.array_equal(ra.experts, rb.experts)
    np.testing.assert_allclose(rb.weights, ra.weights, rtol=1e-5)


def test_route_needs_what_its_rules_name():
    cfg = MoEConfig(**{**BASE, "experts": 8, "softmax_after_topk": True})
    with pytest.raises(ValueError, match="logits="):
        route(cfg, np.full((2, 8), 1 / 8, np.float32))


@pytest.mark.parametrize("kw, fragment", [
    (dict(scoring="tanh"), "scoring"),
    (dict(scoring="sigmoid", softmax_after_topk=True), "only with scoring='softmax'"),
    (dict(n_group=3), "a divisor of experts"),
    (dict(n_group=8), "at most experts / 2"),
    (dict(n_group=4, topk_group=5), "at most n_group"),
    (dict(n_group=4, topk_group=1, top_k=3), "enough groups"),
    (dict(n_group=64, experts=128), "at most 32"),
    (dict(routed_scaling=0.0), "routed_scaling"),
    (dict(routed_scaling=math.inf), "routed_scaling"),
    (dict(router_logits="bf16"), "router_logits"),
    (dict(router_bias="yes"), "router_bias"),
])
def test_bad_rule_combinations_name_the_field(kw, fragment):
    with pytest.raises(ValueError, match=fragment):
        MoEConfig(**{**BASE, "experts": 8, "top_k": 2, **kw})


def test_biases_are_weights_of_their_own():
    cfg = MoEConfig(**{**BASE, "experts": 8, "router_bias": True, "selection_bias": True,
                       "dtype": "bfloat16"})
    w = MoEWeights.random(cfg, 0)
    assert w.router_bias.shape == (8,) and w.selection_bias.dtype == np.float32
    assert w.names[:3] == ("router", "router_bias", "selection_bias")
    arrays = w.arrays()
    del arrays["selection_bias"]
    with pytest.raises(ValueError, match="missing weight"):
        MoEWeights(cfg, **arrays)
    assert MoEWeights.random(cfg.replace(router_bias=False, selection_bias=False), 0).names[0] \
        == "router"


# ---------------------------------------------------------------- routing from the caller
def _given(cfg, t, seed=0):
    rng = np.random.default_rng(seed)
    experts = rng.integers(0, cfg.experts, size=(t, cfg.top_k)).astype(np.int64)
    weights = rng.random((t, cfg.top_k)).astype(np.float32)
    return experts, weights


def test_given_routing_is_validated():
    from flashmoe_core.oracle.reference import given_routing

    cfg = MoEConfig(**{**BASE, "experts": 8, "top_k": 2})
    e, w = _given(cfg, 5)
    ge, gw = given_routing(cfg, (e, w), 5)
    assert ge.dtype == np.int32 and gw.dtype == np.float32
    with pytest.raises(ValueError, match=r"shape \(5, 3\)"):
        given_routing(cfg, (np.zeros((5, 3), int), np.zeros((5, 3), np.float32)), 5)
    with pytest.raises(ValueError, match=r"ids in \[0, 8\)"):
        given_routing(cfg, (e + 8, w), 5)
    bad = w.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match=r"finite floats \(first at \(3, 1\)\)"):
        given_routing(cfg, (e, bad), 5)
    with pytest.raises(ValueError, match="Routing or an"):
        given_routing(cfg, e, 5)


def test_backward_with_given_weights_differentiates_the_weights():
    from flashmoe_core.oracle.reference import moe_backward, with_capacity

    cfg = MoEConfig(tokens=6, hidden=16, ffn=16, experts=4, top_k=2, dtype="float32",
                    capacity_factor=1.0, scoring="sigmoid")  # rules do not matter here
    w = MoEWeights.random(cfg, 0)
    x = random_tokens(cfg, 1)
    e, wt = _given(cfg, 6)
    routing = with_capacity(cfg, e.astype(np.int32), wt)
    assert not routing.kept.all()  # the capacity rule still drops
    dy = np.random.default_rng(2).standard_normal((6, 16))
    dx, grads = moe_backward(cfg, w, x, dy, routing, given_weights=True)
    assert not grads.router.any()
    y0 = lambda ww: moe_forward(cfg, w, x, routing._replace(weights=ww))[0]  # noqa: E731
    eps = 1e-3
    for t, j in [(0, 0), (2, 1), (5, 0)]:
        a, b = wt.copy(), wt.copy()
        a[t, j] += eps
        b[t, j] -= eps
        num = (dy * (y0(a).astype(np.float64) - y0(b).astype(np.float64))).sum() / (2 * eps)
        assert abs(num - grads.routing_weights[t, j]) <= 1e-3 * max(1.0, abs(num))
    assert (grads.routing_weights[~routing.kept] == 0).all()


def test_gated_biases_and_the_clamped_swiglu_follow_gpt_oss():
    from flashmoe_core.oracle.reference import expert_ffn

    cfg = MoEConfig(**{**BASE, "experts": 4, "top_k": 2, "mlp": "gated",
                       "activation": "swiglu_clamped", "mlp_bias": True,
                       "swiglu_limit": 0.5})
    w = MoEWeights.random(cfg, 0)
    x = random_tokens(cfg, 0)[:8]
    xf = x.astype(np.float64)
    g = xf @ w.wg[1] + w.bg[1]
    u = xf @ w.wu[1] + w.bu[1]
    assert (g > 0.5).any() and (np.abs(u) > 0.5).any()  # the clamps act here
    gc, uc = np.minimum(g, 0.5), np.clip(u, -0.5, 0.5)
    h = gc / (1 + np.exp(-1.702 * gc)) * (uc + 1)
    want = h @ w.w2[1] + w.b2[1]
    got = expert_ffn(cfg, w, 1, x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only with mlp='gated'"):
        MoEConfig(**{**BASE, "experts": 4, "activation": "swiglu_clamped"})
    with pytest.raises(ValueError, match="mlp_bias"):
        MoEConfig(**{**BASE, "experts": 4, "mlp_bias": True})
