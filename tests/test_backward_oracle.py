"""The backward oracle: finite differences of an exact float64 forward, and its rules.

``moe_backward`` differentiates the layer with the routing held fixed, in float64 and
without rounding. The float64 forward it differentiates (``_forward_fixed_routing64``)
is first checked against the pinned forward oracle, then central differences of
``loss = sum(dy * y)`` are checked against ``dx`` and every weight gradient.
"""

import itertools

import numpy as np
import pytest

from flashmoe_core import MoEConfig, MoEWeights, Routing, moe_forward, random_tokens
from flashmoe_core.numerics import round_to
from flashmoe_core.oracle.reference import MoEGrads, _forward_fixed_routing64, moe_backward

ULP = {"float32": 2 ** -23, "tfloat32": 2 ** -10, "bfloat16": 2 ** -7, "float16": 2 ** -10}
# Central-difference step. The quotient's error is truncation (~EPS**2) plus the float64
# rounding of the loss over 2 * EPS (~1e-15 / EPS): at 1e-6 the rounding part alone
# reaches 5e-7 relative on these shapes, at 1e-5 both stay below 5e-8.
EPS = 1e-5
RTOL = 1e-6         # relative error allowed between finite differences and the backward
FLOOR = 1e-3        # below this |gradient|, RTOL * FLOOR is the absolute tolerance
COORDS = 20         # random coordinates checked per tensor
# Distance every relu pre-activation keeps from 0. A step of EPS in one coordinate moves
# a pre-activation by at most EPS * max(|x|, |w|, 1) (about 4 * EPS here), far below
# this, so no difference quotient straddles the kink (where it would average the slopes
# 0 and 1 and disagree with act'(a) by up to 1/2).
RELU_MARGIN = 1e-3


def weights64(cfg, w):
    """The float64 values the oracle multiplies with (weights are stored rounded)."""
    return {n: a.astype(np.float64) for n, a in w.arrays().items()}


def tokens(cfg, seed, t):
    return np.concatenate([random_tokens(cfg, seed, tokens=t, rank=r)
                           for r in range(cfg.world_size)])


def preactivations(cfg, w64, x64, routing):
    """Every pre-activation the kept assignments feed to the activation."""
    name = "w1" if cfg.mlp == "vanilla" else "wg"
    tok, slot = np.nonzero(routing.kept)
    e = routing.experts[tok, slot]
    a = np.einsum("th,thf->tf", x64[tok], w64[name][e])
    return a + w64["b1"][e] if cfg.mlp == "vanilla" else a


def setup(cfg, seed, t):
    """Weights, tokens and forward routing; for relu, the first seed from ``seed`` on
    whose pre-activations all keep RELU_MARGIN from the kink (deterministic)."""
    for s in range(seed, seed + 50):
        w = MoEWeights.random(cfg, s)
        x = tokens(cfg, s, t)
        y, routing = moe_forward(cfg, w, x)
        w64, x64 = weights64(cfg, w), x.astype(np.float64)
        if cfg.activation != "relu" or \
                np.abs(preactivations(cfg, w64, x64, routing)).min() > RELU_MARGIN:
            return w, x, y, routing, w64, x64
    raise AssertionError("no seed keeps the relu pre-activations away from 0")


def pick_coordinates(rng, name, arr, routing):
    """COORDS distinct flat indices into ``arr``. For a per-expert tensor three quarters
    come from experts with kept assignments (elsewhere the gradient is 0, which the
    remaining quarter checks)."""
    n = min(COORDS, arr.size)
    if name in ("x", "router"):
        return rng.choice(arr.size, size=n, replace=False)
    per = arr[0].size
    live = np.concatenate([np.arange(e * per, (e + 1) * per)
                           for e in np.unique(routing.experts[routing.kept])])
    first = rng.choice(live, size=min(3 * n // 4, live.size), replace=False)
    rest = np.setdiff1d(np.arange(arr.size), first)
    return np.concatenate([first, rng.choice(rest, size=n - first.size, replace=False)])


def check_gradients(cfg, w, x, routing, w64, x64, seed):
    """Central differences of sum(dy * y) against moe_backward on random coordinates."""
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal((x.shape[0], cfg.hidden))
    dx, grads = moe_backward(cfg, w, x, dy, routing)
    assert isinstance(grads, MoEGrads) and grads.names == w.names
    analytic = {"x": dx, **grads.arrays()}
    tensors = {"x": x64, **w64}
    for name, arr in tensors.items():
        assert analytic[name].shape == arr.shape and analytic[name].dtype == np.float64
        picks = pick_coordinates(rng, name, arr, routing)
        fd = np.empty(picks.size)
        for n, flat in enumerate(picks):
            idx = np.unravel_index(flat, arr.shape)
            orig = arr[idx]
            arr[idx] = orig + EPS
            y_plus = _forward_fixed_routing64(cfg, w64, x64, routing)
            arr[idx] = orig - EPS
            y_minus = _forward_fixed_routing64(cfg, w64, x64, routing)
            arr[idx] = orig
            fd[n] = np.sum(dy * (y_plus - y_minus)) / (2 * EPS)
        got = analytic[name].reshape(-1)[picks]
        err = np.abs(fd - got) / np.maximum(np.abs(fd), FLOOR)
        assert err.max() < RTOL, (name, err.max(), fd, got)
        if name != "router" or not (cfg.top_k == 1 and cfg.renormalize):
            # Something was actually checked (top-1 renormalised: see its own test).
            assert np.abs(got).max() > FLOOR, (name, got)
    return dx, grads


GRID = list(itertools.product(("vanilla", "gated"), ("relu", "gelu", "silu"), (None, 0.5),
                              (1, 2, 3, 4), (True, False), (1, 2)))


@pytest.mark.parametrize("mlp,act,cf,k,renorm,ws", GRID,
                         ids=["-".join(map(str, case)) for case in GRID])
def test_gradients_match_central_differences(mlp, act, cf, k, renorm, ws):
    cfg = MoEConfig(tokens=6, hidden=8, ffn=16, experts=5, top_k=k, mlp=mlp, activation=act,
                    dtype="float32", capacity_factor=cf, renormalize=renorm, world_size=ws)
    seed = GRID.index((mlp, act, cf, k, renorm, ws))
    w, x, y, routing, w64, x64 = setup(cfg, seed, cfg.tokens)
    if cf is not None:
        assert not routing.kept.all()  # the capacity case must really drop something
    # (a) the float64 forward is the oracle's forward without its float32 roundings.
    y64 = _forward_fixed_routing64(cfg, w64, x64, routing)
    y32 = y.astype(np.float64)
    assert np.allclose(y64, y32, rtol=1e-5, atol=1e-5 * np.abs(y32).max())
    # (b) its gradients.
    check_gradients(cfg, w, x, routing, w64, x64, seed)


def test_gradients_with_repeated_experts_and_random_drops():
    # An explicit routing may name one expert twice for a token (top-k never does): the
    # scatter into the probabilities and into dx must add, not overwrite.
    cfg = MoEConfig(tokens=7, hidden=16, ffn=8, experts=3, top_k=3, mlp="gated",
                    activation="silu", dtype="float32")
    w, x, _, _, w64, x64 = setup(cfg, 7, 7)
    rng = np.random.default_rng(3)
    experts = rng.integers(0, 3, size=(7, 3)).astype(np.int32)
    experts[0] = [1, 1, 2]
    kept = rng.random((7, 3)) < 0.7
    kept[0] = True
    routing = Routing(experts, np.full((7, 3), 0.25, np.float32), kept)
    check_gradients(cfg, w, x, routing, w64, x64, 4)


@pytest.mark.parametrize("dtype", ["float32", "tfloat32", "bfloat16", "float16"])
@pytest.mark.parametrize("mlp", ["vanilla", "gated"])
def test_float64_forward_is_the_oracle_up_to_rounding(dtype, mlp):
    cfg = MoEConfig(tokens=8, hidden=16, ffn=16, experts=6, top_k=2, mlp=mlp,
                    activation="gelu", dtype=dtype, capacity_factor=0.75)
    w = MoEWeights.random(cfg, 1)
    x = random_tokens(cfg, 1)
    y, routing = moe_forward(cfg, w, x)
    y64 = _forward_fixed_routing64(cfg, weights64(cfg, w), x.astype(np.float64), routing)
    # Same inputs; the oracle rounds the hidden layer, each expert output and the
    # result to dtype: a few units of its rounding.
    ref = y.astype(np.float64)
    tol = 4 * ULP[dtype]
    assert np.allclose(y64, ref, rtol=tol, atol=tol * np.abs(ref).max())
    # Dropped rows are zero in both.
    none_kept = ~routing.kept.any(axis=1)
    assert np.array_equal(y64[none_kept], ref[none_kept])


def small(**kw):
    base = dict(tokens=8, hidden=8, ffn=16, experts=4, top_k=2, dtype="float32")
    base.update(kw)
    return MoEConfig(**base)


@pytest.mark.parametrize("mlp", ["vanilla", "gated"])
def test_dropped_expert_gets_no_gradient(mlp):
    cfg = small(mlp=mlp)
    w, x = MoEWeights.random(cfg, 2), random_tokens(cfg, 2)
    _, r = moe_forward(cfg, w, x)
    assert (r.experts == 2).any() and r.kept.all()
    routing = Routing(r.experts, r.weights, r.kept & (r.experts != 2))
    dy = np.random.default_rng(0).standard_normal((8, 8))
    dx, grads = moe_backward(cfg, w, x, dy, routing)
    for name in grads.names[1:]:
        g = getattr(grads, name)
        assert not g[2].any(), name  # exactly zero
        assert np.abs(g[[0, 1, 3]]).max() > 1e-3, name
    # Expert 2's weights do not matter any more: changing them changes nothing.
    arrays = w.arrays()
    for name in grads.names[1:]:
        arrays[name] = arrays[name].copy()
        arrays[name][2] *= np.float32(3.0)
    w2 = MoEWeights(cfg, **arrays)
    dx2, grads2 = moe_backward(cfg, w2, x, dy, routing)
    assert np.array_equal(dx, dx2)
    for name in grads.names:
        assert np.array_equal(getattr(grads, name), getattr(grads2, name)), name
    # Whereas with expert 2 kept, it does get gradients.
    _, full = moe_backward(cfg, w, x, dy, r)
    assert np.abs(getattr(full, grads.names[1])[2]).max() > 1e-3


@pytest.mark.parametrize("mlp,renorm", [("vanilla", True), ("gated", False),
                                        ("vanilla", False), ("gated", True)])
def test_all_assignments_dropped_gives_zero_gradients(mlp, renorm):
    # y = 0 whatever x and the weights are, so every gradient is exactly 0 (with
    # renormalisation the dropped slots still enter S_t, but every g_tj is 0).
    cfg = small(mlp=mlp, renormalize=renorm, top_k=3)
    w, x = MoEWeights.random(cfg, 3), random_tokens(cfg, 3)
    y, r = moe_forward(cfg, w, x)
    routing = Routing(r.experts, r.weights, np.zeros_like(r.kept))
    y0, _ = moe_forward(cfg, w, x, routing)
    assert not y0.astype(np.float64).any()
    dy = np.random.default_rng(1).standard_normal((8, 8))
    dx, grads = moe_backward(cfg, w, x, dy, routing)
    assert dx.shape == x.shape and not dx.any()
    for name, g in grads.arrays().items():
        assert g.shape == getattr(w, name).shape and not g.any(), name
    # The same dy with the routing kept gives non-zero gradients everywhere.
    dx1, grads1 = moe_backward(cfg, w, x, dy, r)
    assert dx1.any() and all(g.any() for g in grads1.arrays().values())


@pytest.mark.parametrize("mlp", ["vanilla", "gated"])
def test_top1_renormalised_weight_is_one_so_the_router_gets_nothing(mlp):
    cfg = small(mlp=mlp, top_k=1, renormalize=True)
    w, x = MoEWeights.random(cfg, 4), random_tokens(cfg, 4)
    dy = np.random.default_rng(2).standard_normal((8, 8))
    dx, grads = moe_backward(cfg, w, x, dy)
    assert not grads.router.any()  # w = p / p = 1 exactly: the logits do not matter
    # dx is then the experts' path alone: scaling the router (the same top-1 choice,
    # other probabilities) leaves every gradient unchanged.
    _, r = moe_forward(cfg, w, x)
    w_scaled = MoEWeights(cfg, **{**w.arrays(), "router": w.router * np.float32(2.0)})
    _, r2 = moe_forward(cfg, w_scaled, x)
    assert np.array_equal(r.experts, r2.experts)
    dx2, grads2 = moe_backward(cfg, w_scaled, x, dy)
    assert np.array_equal(dx, dx2)
    for name in grads.names:
        assert np.array_equal(getattr(grads, name), getattr(grads2, name)), name
    # Without renormalisation the weight is the probability and the router learns.
    _, grads_off = moe_backward(cfg.replace(renormalize=False), w, x, dy)
    assert np.abs(grads_off.router).max() > 1e-3


def test_given_routing_equals_the_computed_one_and_its_weights_are_ignored():
    cfg = small(mlp="gated", activation="silu", top_k=3, capacity_factor=0.75, world_size=2,
                tokens=6)
    w = MoEWeights.random(cfg, 5)
    x = tokens(cfg, 5, 6)
    _, r = moe_forward(cfg, w, x)
    assert not r.kept.all()
    dy = np.random.default_rng(5).standard_normal((12, 8))
    dx, grads = moe_backward(cfg, w, x, dy)
    junk = Routing(r.experts, np.full_like(r.weights, 7.0), r.kept)
    for routing in (r, junk):
        dx2, grads2 = moe_backward(cfg, w, x, dy, routing)
        assert np.array_equal(dx, dx2)
        for name in grads.names:
            assert np.array_equal(getattr(grads, name), getattr(grads2, name)), name


def test_grads_object_matches_the_weights():
    for mlp in ("vanilla", "gated"):
        cfg = small(mlp=mlp)
        w, x = MoEWeights.random(cfg, 6), random_tokens(cfg, 6)
        dx, grads = moe_backward(cfg, w, x, np.ones((8, 8), np.float32))
        assert dx.dtype == np.float64 and dx.shape == (8, 8)
        assert grads.names == w.names and list(grads.arrays()) == list(w.names)
        assert grads.expert_ids == w.expert_ids
        for name, g in grads.arrays().items():
            assert g.dtype == np.float64 and g.shape == getattr(w, name).shape
    with pytest.raises(ValueError, match="needs exactly"):
        MoEGrads("gated", range(4), router=np.zeros((8, 4)))


def test_weights_holding_some_experts():
    # A rank's weights hold only its experts: the gradients are the matching rows.
    cfg = small(tokens=6)
    w, x = MoEWeights.random(cfg, 7), random_tokens(cfg, 7)
    routing = Routing(np.tile(np.array([[3, 1]], np.int32), (6, 1)),
                      np.full((6, 2), 0.5, np.float32), np.ones((6, 2), bool))
    dy = np.random.default_rng(7).standard_normal((6, 8))
    dx, grads = moe_backward(cfg, w, x, dy, routing)
    part = w.subset([1, 3])
    dx_p, grads_p = moe_backward(cfg, part, x, dy, routing)
    assert grads_p.expert_ids == (1, 3)
    assert np.allclose(dx_p, dx, rtol=1e-14, atol=1e-14)
    assert np.allclose(grads_p.router, grads.router, rtol=1e-14, atol=1e-14)
    for name in grads.names[1:]:
        assert np.allclose(getattr(grads_p, name), getattr(grads, name)[[1, 3]],
                           rtol=1e-14, atol=1e-14)
    # A kept assignment to an expert not held is an error, as in the forward.
    with pytest.raises(KeyError, match="not held"):
        moe_backward(cfg, w.subset([3]), x, dy, routing)


@pytest.mark.parametrize("shape", [(7, 8), (8, 16), (8,), (2, 8, 8)])
def test_bad_dy_shape(shape):
    cfg = small(world_size=2, tokens=4)
    w, x = MoEWeights.random(cfg, 0), tokens(cfg, 0, 4)
    with pytest.raises(ValueError, match=r"dy has shape .*; expected \(8, 8\), the shape of y"):
        moe_backward(cfg, w, x, np.zeros(shape))


def test_bad_dy_dtype_and_bad_inputs():
    cfg = small()
    w, x = MoEWeights.random(cfg, 0), random_tokens(cfg, 0)
    with pytest.raises(ValueError, match="dy has dtype int64; expected a floating type"):
        moe_backward(cfg, w, x, np.zeros((8, 8), np.int64))
    with pytest.raises(ValueError, match="expected \\[world_size"):
        moe_backward(cfg, w, x[:, :4], np.zeros((8, 4)))
    _, r = moe_forward(cfg, w, x)
    with pytest.raises(ValueError, match="routing.kept must be bool"):
        moe_backward(cfg, w, x, np.zeros((8, 8)), Routing(r.experts, r.weights,
                                                          r.kept.astype(int)))
    # A 16-bit dy is fine (it is widened exactly).
    dy = round_to(np.ones((8, 8), np.float32), "bfloat16")
    dx, _ = moe_backward(cfg, w, x, dy)
    dx64, _ = moe_backward(cfg, w, x, np.ones((8, 8)))
    assert np.array_equal(dx, dx64)


# ------------------------------------------------------------ through the routing itself
# How far apart (in probability) a token's top k + 1 choices must be for its routing to
# stay put under a step: a step of EPS moves a logit by about EPS * |R| (~1e-5 here), so
# a gap of 1e-3 leaves the top-k choice, its slot order and the capacity rule unchanged
# at every perturbed point (which the test checks, not assumes).
TIE_MARGIN = 1e-3


def forward_from_scratch64(cfg, w64, x64):
    """The layer in float64 with everything recomputed from x64: logits, softmax, top-k
    of the exact probabilities, the capacity rule, combine weights, experts."""
    from flashmoe_core.oracle.reference import _softmax64, route

    probs = _softmax64(x64 @ w64["router"])
    routing = route(cfg, probs, x64.shape[0] // cfg.world_size)
    return _forward_fixed_routing64(cfg, w64, x64, routing), routing


def away_from_ties(cfg, seed, t):
    """Weights and tokens whose top k + 1 probabilities differ by TIE_MARGIN at least
    for every token (the first seed from ``seed`` on; deterministic)."""
    from flashmoe_core.oracle.reference import _softmax64

    for s in range(seed, seed + 200):
        w = MoEWeights.random(cfg, s)
        x = tokens(cfg, s, t)
        w64, x64 = weights64(cfg, w), x.astype(np.float64)
        p = np.sort(_softmax64(x64 @ w64["router"]), axis=1)[:, ::-1]
        n = min(cfg.top_k + 1, cfg.experts)
        if np.diff(-p[:, :n], axis=1).min() > TIE_MARGIN:
            return w, x, w64, x64
    raise AssertionError("no seed keeps the top-k choices apart")


SCRATCH = [("gated", "silu", None, 2, True, 1), ("vanilla", "gelu", 0.5, 3, True, 1),
           ("vanilla", "silu", None, 1, False, 1), ("gated", "gelu", 0.75, 2, False, 2),
           ("vanilla", "gelu", None, 4, True, 2)]


@pytest.mark.parametrize("mlp,act,cf,k,renorm,ws", SCRATCH,
                         ids=["-".join(map(str, case)) for case in SCRATCH])
def test_dx_and_router_gradient_through_the_routing_itself(mlp, act, cf, k, renorm, ws):
    # Finite differences of the whole layer, the routing recomputed at each perturbed
    # point (not held fixed): where no choice is near a tie, they equal the gradient
    # moe_backward computes with its own routing.
    cfg = MoEConfig(tokens=6, hidden=8, ffn=16, experts=5, top_k=k, mlp=mlp, activation=act,
                    dtype="float32", capacity_factor=cf, renormalize=renorm, world_size=ws)
    seed = 100 + SCRATCH.index((mlp, act, cf, k, renorm, ws))
    w, x, w64, x64 = away_from_ties(cfg, seed, cfg.tokens)
    y0, base = forward_from_scratch64(cfg, w64, x64)
    _, routing32 = moe_forward(cfg, w, x)
    assert np.array_equal(base.experts, routing32.experts)  # the float32 choice is the same
    assert np.array_equal(base.kept, routing32.kept)
    if cf is not None:
        assert not base.kept.all()
    rng = np.random.default_rng(seed)
    dy = rng.standard_normal(y0.shape)
    dx, grads = moe_backward(cfg, w, x, dy)  # its own routing, from x
    for name, arr, got_all in (("x", x64, dx), ("router", w64["router"], grads.router)):
        picks = rng.choice(arr.size, size=min(COORDS, arr.size), replace=False)
        fd = np.empty(picks.size)
        for n, flat in enumerate(picks):
            idx = np.unravel_index(flat, arr.shape)
            orig = arr[idx]
            ys = []
            for step in (EPS, -EPS):
                arr[idx] = orig + step
                y, r = forward_from_scratch64(cfg, w64, x64)
                assert np.array_equal(r.experts, base.experts) and \
                    np.array_equal(r.kept, base.kept), (name, idx)  # away from ties indeed
                ys.append(y)
            arr[idx] = orig
            fd[n] = np.sum(dy * (ys[0] - ys[1])) / (2 * EPS)
        got = got_all.reshape(-1)[picks]
        err = np.abs(fd - got) / np.maximum(np.abs(fd), FLOOR)
        assert err.max() < RTOL, (name, err.max(), fd, got)
        if name == "x" or not (k == 1 and renorm):
            assert np.abs(got).max() > FLOOR, (name, got)
