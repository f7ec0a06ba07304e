"""The backward oracle on every routing, MLP and shared-expert rule.

As in ``test_backward_oracle``: the float64 forward ``moe_backward`` differentiates
(``_forward_fixed_routing64``, the routing held fixed) is first checked against the
pinned forward oracle, then central differences of ``loss = sum(dy * y)`` are checked
against ``dx`` and every gradient, for each rule on its own and for model-like
combinations of them; then the exact consequences of the rules.
"""

import numpy as np
import pytest

from flashmoe_core import MoEConfig, MoEWeights, Routing, moe_forward
from flashmoe_core.oracle.reference import (MoEGrads, _forward_fixed_routing64, moe_backward,
                                            moe_forward_exact, with_capacity)
from flashmoe_core.weights import expert_tensor_names, gradient_tensor_names
from test_backward_oracle import EPS, FLOOR, RTOL, ULP, tokens, weights64

COORDS = 20         # random coordinates checked per tensor
# Distance every clamped SwiGLU input keeps from its limits +-L: a step of EPS moves a
# pre-activation by about 4 * EPS here, so no difference quotient straddles a kink.
CLAMP_MARGIN = 1e-3


def config(**kw):
    base = dict(tokens=8, hidden=8, ffn=8, experts=6, top_k=2, dtype="float32",
                activation="silu")
    base.update(kw)
    return MoEConfig(**base)


def with_selection_bias(cfg, w, seed, scale=0.3):
    """The weights with a selection bias large enough to change some choices."""
    rng = np.random.default_rng(seed)
    bias = (rng.standard_normal(cfg.experts) * scale).astype(np.float32)
    return MoEWeights(cfg, **{**w.arrays(), "selection_bias": bias})


def gated_inputs(cfg, w, x, routing):
    """Every (g, u) pair the clamped SwiGLU sees: kept assignments and shared rows."""
    w64, x64 = weights64(cfg, w), x.astype(np.float64)
    tok, slot = np.nonzero(routing.kept)
    e = routing.experts[tok, slot]
    gs, us = [], []
    for name, out in (("wg", gs), ("wu", us)):
        a = np.einsum("th,thf->tf", x64[tok], w64[name][e])
        if cfg.mlp_bias:
            a = a + w64["b" + name[1]][e]
        out.append(a.ravel())
        if cfg.n_shared:
            s = x64 @ w64["shared_" + name]
            if cfg.mlp_bias:
                s = s + w64["shared_b" + name[1]]
            out.append(s.ravel())
    return np.concatenate(gs), np.concatenate(us)


def clamp_limit(cfg, w, x, routing):
    """A swiglu_limit that clamps some g and some u (and leaves others) while every one
    keeps CLAMP_MARGIN from the limits."""
    g, u = gated_inputs(cfg, w, x, routing)
    for lim in np.linspace(0.2, 2.0, 361):
        near = min(np.abs(g - lim).min(), np.abs(u - lim).min(), np.abs(u + lim).min())
        if near > CLAMP_MARGIN and (g > lim).any() and (g < lim).any() and \
                (np.abs(u) > lim).any() and (np.abs(u) < lim).any():
            return float(lim)
    raise AssertionError("no limit keeps the SwiGLU inputs away from its kinks")


def setup(kw, seed):
    """Config, weights, tokens and the forward's routing for one case; the clamped
    SwiGLU gets its limit from ``clamp_limit``, a selection bias a large value."""
    cfg = config(**kw)
    w = MoEWeights.random(cfg, seed)
    if cfg.selection_bias:
        w = with_selection_bias(cfg, w, seed)
    x = tokens(cfg, seed, cfg.tokens)
    _, routing = moe_forward(cfg, w, x)
    if cfg.activation == "swiglu_clamped":
        cfg = cfg.replace(swiglu_limit=clamp_limit(cfg, w, x, routing))
        w = MoEWeights(cfg, **w.arrays())
    return cfg, w, x, routing


def check_forward(cfg, w, x, routing, given=False):
    """The float64 forward is the pinned oracle without its rounding."""
    y, r = moe_forward(cfg, w, x, routing if given else None)
    assert np.array_equal(r.experts, routing.experts) and np.array_equal(r.kept, routing.kept)
    w64, x64 = weights64(cfg, w), x.astype(np.float64)
    y64 = _forward_fixed_routing64(cfg, w64, x64, routing,
                                   given_weights=routing.weights.astype(np.float64)
                                   if given else None)
    ref = y.astype(np.float64)
    tol = max(4 * ULP[cfg.dtype], 1e-6)
    assert np.allclose(y64, ref, rtol=tol, atol=tol * np.abs(ref).max()), \
        np.abs(y64 - ref).max() / np.abs(ref).max()
    if not given:  # the public exact forward is this one
        assert np.array_equal(moe_forward_exact(cfg, w, x, routing), y64)


def pick_coordinates(rng, cfg, name, arr, routing):
    """COORDS distinct flat indices; for a per-expert tensor three quarters come from
    experts with kept assignments (elsewhere the gradient is 0)."""
    n = min(COORDS, arr.size)
    if name not in expert_tensor_names(cfg.mlp, cfg.mlp_bias):
        return rng.choice(arr.size, size=n, replace=False)
    per = arr[0].size
    live = np.concatenate([np.arange(e * per, (e + 1) * per)
                           for e in np.unique(routing.experts[routing.kept])])
    first = rng.choice(live, size=min(3 * n // 4, live.size), replace=False)
    rest = np.setdiff1d(np.arange(arr.size), first)
    return np.concatenate([first, rng.choice(rest, size=n - first.size, replace=False)])


def check_gradients(cfg, w, x, routing, seed, given=False, zero=()):
    """Central differences of sum(dy * y) against moe_backward for dx, every gradient
    tensor and (given weights) the routing weights; the tensors in ``zero`` must get
    exactly 0, every other one something."""
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal((x.shape[0], cfg.hidden))
    dx, grads = moe_backward(cfg, w, x, dy, routing, given_weights=given)
    assert isinstance(grads, MoEGrads) and grads.names == gradient_tensor_names(cfg)
    assert "selection_bias" not in grads.names
    w64, x64 = weights64(cfg, w), x.astype(np.float64)
    given64 = routing.weights.astype(np.float64) if given else None
    analytic = {"x": dx, **grads.arrays()}
    tensors = {"x": x64, **{n: w64[n] for n in grads.names}}
    if given:
        analytic["routing_weights"] = grads.routing_weights
        tensors["routing_weights"] = given64  # perturbed in place below
    for name, arr in tensors.items():
        got_all = analytic[name]
        assert got_all.shape == arr.shape and got_all.dtype == np.float64, name
        picks = pick_coordinates(rng, cfg, name, arr, routing)
        fd = np.empty(picks.size)
        for n, flat in enumerate(picks):
            idx = np.unravel_index(flat, arr.shape)
            orig = arr[idx]
            ys = []
            for step in (EPS, -EPS):
                arr[idx] = orig + step
                ys.append(_forward_fixed_routing64(cfg, w64, x64, routing,
                                                   given_weights=given64))
            arr[idx] = orig
            fd[n] = np.sum(dy * (ys[0] - ys[1])) / (2 * EPS)
        got = got_all.reshape(-1)[picks]
        err = np.abs(fd - got) / np.maximum(np.abs(fd), FLOOR)
        assert err.max() < RTOL, (name, err.max(), fd, got)
        if name in zero:
            assert not got_all.any(), name
        else:
            assert np.abs(got).max() > FLOOR, (name, got)
    return dx, grads


RULES = {
    "sigmoid": dict(scoring="sigmoid"),
    "sigmoid-no-renormalize": dict(scoring="sigmoid", renormalize=False),
    "softmax-after-topk": dict(softmax_after_topk=True),
    "router-bias": dict(router_bias=True),
    "selection-bias": dict(selection_bias=True),
    "groups": dict(experts=8, n_group=4, topk_group=2),
    "routed-scaling": dict(routed_scaling=2.5),
    "storage-logits": dict(router_logits="storage", dtype="bfloat16"),
    "slot-order-drops": dict(capacity_factor=0.5, capacity_order="slot"),
    "renormalize-after-drop": dict(capacity_factor=0.5, renormalize_after_drop=True),
    "renormalize-after-drop-only": dict(capacity_factor=0.5, renormalize_after_drop=True,
                                        renormalize=False),
    "gated-bias": dict(mlp="gated", mlp_bias=True),
    "swiglu-clamped": dict(mlp="gated", activation="swiglu_clamped"),
    "shared-vanilla": dict(n_shared=2, shared_ffn=8, activation="gelu"),
    "shared-vanilla-gate": dict(n_shared=1, shared_gate=True),
    "shared-gated-bias": dict(mlp="gated", mlp_bias=True, n_shared=1, shared_ffn=16),
    "shared-gated-gate": dict(mlp="gated", activation="gelu", n_shared=1, shared_gate=True),
    # Model-like combinations.
    "deepseek-v3": dict(experts=8, top_k=3, scoring="sigmoid", selection_bias=True,
                        n_group=4, topk_group=2, routed_scaling=2.5, mlp="gated",
                        n_shared=1, shared_ffn=16, dtype="bfloat16"),
    "gpt-oss": dict(router_bias=True, softmax_after_topk=True, mlp="gated", mlp_bias=True,
                    activation="swiglu_clamped", dtype="bfloat16"),
    "qwen2-moe": dict(top_k=3, renormalize=False, mlp="gated", n_shared=1, shared_ffn=16,
                      shared_gate=True, dtype="bfloat16"),
    "nllb": dict(capacity_factor=0.5, capacity_order="slot", renormalize_after_drop=True,
                 renormalize=False, activation="gelu", dtype="float16"),
}


@pytest.mark.parametrize("name", list(RULES))
def test_gradients_match_central_differences(name):
    seed = list(RULES).index(name)
    cfg, w, x, routing = setup(RULES[name], seed)
    if cfg.capacity_factor is not None:
        assert not routing.kept.all()  # the capacity rule must really drop something
    check_forward(cfg, w, x, routing)
    check_gradients(cfg, w, x, routing, seed)


def given_routing_of(cfg, seed):
    """Distinct experts and positive weights per token, through the capacity rule."""
    rng = np.random.default_rng(seed)
    experts = np.stack([rng.permutation(cfg.experts)[:cfg.top_k]
                        for _ in range(cfg.tokens)]).astype(np.int32)
    weights = rng.uniform(0.2, 1.0, size=experts.shape).astype(np.float32)
    return with_capacity(cfg, experts, weights)


GIVEN = {
    "plain": dict(router_bias=True, mlp="gated", mlp_bias=True),
    "renormalize-after-drop": dict(capacity_factor=0.5, renormalize_after_drop=True,
                                   routed_scaling=2.0, n_shared=1, shared_gate=True),
}


@pytest.mark.parametrize("name", list(GIVEN))
def test_given_weights_match_central_differences(name):
    seed = 40 + list(GIVEN).index(name)
    cfg = config(**GIVEN[name])
    w = MoEWeights.random(cfg, seed)
    x = tokens(cfg, seed, cfg.tokens)
    routing = given_routing_of(cfg, seed)
    if cfg.capacity_factor is not None:
        assert not routing.kept.all()
    check_forward(cfg, w, x, routing, given=True)
    _, grads = check_gradients(cfg, w, x, routing, seed, given=True,
                               zero=("router", "router_bias"))
    assert (grads.routing_weights[~routing.kept] == 0).all()


# ------------------------------------------------------------------ exact consequences

def upstream(x, seed):
    return np.random.default_rng(seed).standard_normal(x.shape)


def test_selection_bias_chooses_but_the_gradients_ignore_it():
    cfg = config(scoring="sigmoid", selection_bias=True, experts=8, top_k=3)
    w = with_selection_bias(cfg, MoEWeights.random(cfg, 1), 1)
    plain = cfg.replace(selection_bias=False)
    wp = MoEWeights(plain, **{n: a for n, a in w.arrays().items() if n != "selection_bias"})
    x = tokens(cfg, 1, cfg.tokens)
    dy = upstream(x, 1)
    _, r = moe_forward(cfg, w, x)
    _, rp = moe_forward(plain, wp, x)
    assert not np.array_equal(r.experts, rp.experts)  # the bias changes the choice
    for routing in (r, rp):  # on the same fixed routing, the same gradients exactly
        dx, grads = moe_backward(cfg, w, x, dy, routing)
        dxp, gradsp = moe_backward(plain, wp, x, dy, routing)
        assert grads.names == gradsp.names == gradient_tensor_names(plain)
        assert np.array_equal(dx, dxp)
        for n in grads.names:
            assert np.array_equal(getattr(grads, n), getattr(gradsp, n)), n
    # The float64 forward does not depend on it at all.
    w64, x64 = weights64(cfg, w), x.astype(np.float64)
    y0 = _forward_fixed_routing64(cfg, w64, x64, r)
    w64["selection_bias"] += 1.0
    assert np.array_equal(_forward_fixed_routing64(cfg, w64, x64, r), y0)


@pytest.mark.parametrize("kw", [dict(), dict(renormalize=False), dict(scoring="sigmoid"),
                                dict(softmax_after_topk=True, router_bias=True)],
                         ids=["renormalize", "after-drop-only", "sigmoid", "after-topk"])
def test_fully_dropped_token_gives_nothing_under_renormalize_after_drop(kw):
    cfg = config(renormalize_after_drop=True, routed_scaling=2.0, **kw)
    w = MoEWeights.random(cfg, 2)
    x = tokens(cfg, 2, cfg.tokens)
    _, r = moe_forward(cfg, w, x)
    kept = r.kept.copy()
    kept[2] = False         # nothing kept: c = 0, not 0 / 0
    kept[5, 1] = False      # one slot lost: the other takes the whole weight
    routing = Routing(r.experts, r.weights, kept)
    w64, x64 = weights64(cfg, w), x.astype(np.float64)
    y64 = _forward_fixed_routing64(cfg, w64, x64, routing)
    assert not y64[2].any()
    dy = upstream(x, 2)
    dx, grads = moe_backward(cfg, w, x, dy, routing)
    assert np.isfinite(dx).all() and all(np.isfinite(g).all() for g in grads.arrays().values())
    assert not dx[2].any()  # neither the router nor an expert sends anything back
    # The token's dy and x change no gradient (it adds exactly 0 to the router's).
    dy2, x2 = dy.copy(), x.copy()
    dy2[2] *= -3.0
    x2[2] *= np.float32(2.0)
    for a, b in ((dy2, x), (dy, x2)):
        dx2, grads2 = moe_backward(cfg, w, b, a, routing)
        assert np.array_equal(np.delete(dx2, 2, 0), np.delete(dx, 2, 0))
        for n in grads.names:
            assert np.array_equal(getattr(grads2, n), getattr(grads, n)), n
    # Token 5 keeps one slot, whose weight is then routed_scaling (2: exact) whatever
    # the logits: its dy reaches the expert but not the router.
    dy3 = dy.copy()
    dy3[5] *= -3.0
    _, grads3 = moe_backward(cfg, w, x, dy3, routing)
    for n in ("router", "router_bias")[:1 + cfg.router_bias]:
        assert np.array_equal(getattr(grads3, n), getattr(grads, n)), n
    assert not np.array_equal(grads3.w2, grads.w2)


def test_shared_gate_weights_the_shared_gradients():
    cfg = config(mlp="gated", n_shared=1, shared_ffn=16, shared_gate=True)
    w = MoEWeights.random(cfg, 3)
    plain = cfg.replace(shared_gate=False)
    wp = MoEWeights(plain, **{n: a for n, a in w.arrays().items() if n != "shared_gate"})
    x = tokens(cfg, 3, cfg.tokens)
    _, routing = moe_forward(cfg, w, x)
    dy = upstream(x, 3)
    w64, x64 = weights64(cfg, w), x.astype(np.float64)
    gs = 1.0 / (1.0 + np.exp(-(x64 @ w64["shared_gate"])))
    _, grads = moe_backward(cfg, w, x, dy, routing)
    _, gradsp = moe_backward(plain, wp, x, gs[:, None] * dy, routing)
    for n in ("shared_wg", "shared_wu", "shared_w2"):
        a, b = getattr(grads, n), getattr(gradsp, n)
        assert np.abs(b).max() > FLOOR
        assert np.allclose(a, b, rtol=1e-12, atol=1e-14 * np.abs(b).max()), n
    # The gate's own gradient: x^T (<dy_t, ys_t> gs_t (1 - gs_t)), ys the shared MLP.
    g, u = x64 @ w64["shared_wg"], x64 @ w64["shared_wu"]
    ys = (g / (1.0 + np.exp(-g)) * u) @ w64["shared_w2"]
    want = x64.T @ (np.einsum("th,th->t", dy, ys) * gs * (1.0 - gs))
    assert np.allclose(grads.shared_gate, want, rtol=1e-12, atol=1e-14 * np.abs(want).max())


def test_marked_token_gets_nan_dx_and_adds_nothing_to_the_shared_experts():
    cfg = config(router_bias=True, mlp="gated", mlp_bias=True, n_shared=1, shared_gate=True)
    w = MoEWeights.random(cfg, 4)
    x = tokens(cfg, 4, cfg.tokens)
    x[3, 2] = np.nan
    dy = upstream(x, 4)
    _, routing = moe_forward(cfg, w, x)
    assert (routing.experts[3] == -1).all()
    dx, grads = moe_backward(cfg, w, x, dy)
    assert np.isnan(dx[3]).all() and np.isfinite(np.delete(dx, 3, axis=0)).all()
    assert np.isnan(grads.router).all() and np.isnan(grads.router_bias).all()
    others = [n for n in grads.names if not n.startswith("router")]
    for n in others:
        assert np.isfinite(getattr(grads, n)).all(), n
    # The experts' and shared gradients are those of the other tokens alone.
    rest = np.delete(np.arange(cfg.tokens), 3)
    sub = Routing(*(a[rest] for a in routing))
    _, grads_rest = moe_backward(cfg, w, x[rest], dy[rest], sub)
    for n in others:
        a, b = getattr(grads, n), getattr(grads_rest, n)
        assert np.allclose(a, b, rtol=1e-12, atol=1e-14 * np.abs(b).max()), n
    # With given weights the marked token's dx row is NaN as well, its weights get 0.
    given = Routing(routing.experts, np.where(routing.kept, 0.5, np.nan).astype(np.float32),
                    routing.kept)
    dxg, gradsg = moe_backward(cfg, w, x, dy, given, given_weights=True)
    assert np.isnan(dxg[3]).all() and np.isfinite(np.delete(dxg, 3, axis=0)).all()
    assert not gradsg.routing_weights[3].any() and not gradsg.router.any()


def test_grads_carry_the_config_tensors():
    for kw in (dict(router_bias=True, selection_bias=True, mlp="gated", mlp_bias=True,
                    n_shared=2, shared_ffn=8, shared_gate=True),
               dict(n_shared=1), dict(mlp="gated", n_shared=1, shared_gate=True)):
        cfg = config(**kw)
        w = MoEWeights.random(cfg, 5)
        g = MoEGrads.zeros_like(w)
        assert g.names == gradient_tensor_names(cfg) == \
            tuple(n for n in w.names if n != "selection_bias")
        for n, a in g.arrays().items():
            assert a.shape == getattr(w, n).shape and a.dtype == np.float64 and not a.any()
        again = MoEGrads(cfg.mlp, w.expert_ids, **g.arrays())
        assert again.names == g.names
        # Part of a config's optional set is refused.
        arrays = g.arrays()
        arrays.pop("shared_w2")
        with pytest.raises(ValueError, match="needs exactly"):
            MoEGrads(cfg.mlp, w.expert_ids, **arrays)
    # A rank holding some experts gets their rows; the shared tensors stay whole.
    cfg = config(n_shared=1, shared_gate=True, tokens=6)
    w = MoEWeights.random(cfg, 6)
    routing = Routing(np.tile(np.array([[3, 1]], np.int32), (6, 1)),
                      np.full((6, 2), 0.5, np.float32), np.ones((6, 2), bool))
    x = tokens(cfg, 6, 6)
    dy = upstream(x, 6)
    dx, grads = moe_backward(cfg, w, x, dy, routing)
    dxp, gradsp = moe_backward(cfg, w.subset([1, 3]), x, dy, routing)
    assert np.allclose(dxp, dx, rtol=1e-14, atol=1e-14)
    for n in grads.names:
        want = getattr(grads, n)[[1, 3]] if n in expert_tensor_names(cfg.mlp) \
            else getattr(grads, n)
        assert np.allclose(getattr(gradsp, n), want, rtol=1e-14, atol=1e-14), n
