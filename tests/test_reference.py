"""The oracle against a naive per-token loop, and its pinned rules one by one."""

import math

import numpy as np
import pytest

from flashmoe_core import MoEConfig, MoEWeights, Routing, moe_forward, random_tokens
from flashmoe_core.numerics import round_to
from flashmoe_core.oracle.reference import gate, matmul_f32, route

ULP = {"float32": 2 ** -23, "tfloat32": 2 ** -10, "bfloat16": 2 ** -7, "float16": 2 ** -10}


def naive_forward(cfg, w, x):
    """Token by token, expert by expert, with Python loops and float64 dot products."""
    f32 = lambda v: np.float32(v)  # noqa: E731
    rnd = lambda v: round_to(np.asarray(v, np.float32), cfg.dtype).astype(np.float64)  # noqa
    act = {"relu": lambda v: max(v, 0.0),
           "gelu": lambda v: 0.5 * v * math.erfc(-v / math.sqrt(2)),
           "silu": lambda v: v / (1 + math.exp(-v))}[cfg.activation]
    f64 = lambda a: np.asarray(a).astype(np.float64)  # noqa: E731
    xr = rnd(f64(x))
    router = f64(w.router)
    t_per_rank = x.shape[0] // cfg.world_size
    cap = cfg.capacity(t_per_rank)
    y = np.zeros((x.shape[0], cfg.hidden), np.float64)
    experts = np.zeros((x.shape[0], cfg.top_k), np.int64)
    kept = np.zeros((x.shape[0], cfg.top_k), bool)
    counts = {}
    for t in range(x.shape[0]):
        logits = [f32(np.dot(xr[t], router[:, e])) for e in range(cfg.experts)]
        m = max(float(v) for v in logits)
        ex = [math.exp(float(v) - m) for v in logits]
        probs = [f32(v / sum(ex)) for v in ex]
        order = sorted(range(cfg.experts), key=lambda e: (-float(probs[e]), e))[:cfg.top_k]
        sel = [float(probs[e]) for e in order]
        weights = [f32(v / sum(sel)) if cfg.renormalize else f32(v) for v in sel]
        acc = np.zeros(cfg.hidden)
        for j, e in enumerate(order):
            experts[t, j] = e
            key = (t // t_per_rank, e)
            counts[key] = counts.get(key, 0) + 1
            if cap is not None and counts[key] > cap:
                continue
            kept[t, j] = True
            if cfg.mlp == "vanilla":
                a = [f32(np.dot(xr[t], f64(w.w1[e][:, n])) + float(w.b1[e][n]))
                     for n in range(cfg.ffn)]
                h = rnd([f32(act(float(v))) for v in a])
                out = [f32(np.dot(h, f64(w.w2[e][:, c])) + float(w.b2[e][c]))
                       for c in range(cfg.hidden)]
            else:
                g = [f32(np.dot(xr[t], f64(w.wg[e][:, n]))) for n in range(cfg.ffn)]
                u = [f32(np.dot(xr[t], f64(w.wu[e][:, n]))) for n in range(cfg.ffn)]
                h = rnd([f32(f32(act(float(a))) * b) for a, b in zip(g, u)])
                out = [f32(np.dot(h, f64(w.w2[e][:, c]))) for c in range(cfg.hidden)]
            acc += float(weights[j]) * rnd(out)
        y[t] = acc
    return round_to(y.astype(np.float32), cfg.dtype), experts, kept


CASES = [
    dict(mlp="vanilla", activation="relu", dtype="bfloat16", top_k=2),
    dict(mlp="vanilla", activation="gelu", dtype="float32", top_k=1),
    dict(mlp="vanilla", activation="silu", dtype="float16", top_k=3, renormalize=False),
    dict(mlp="gated", activation="silu", dtype="bfloat16", top_k=2),
    dict(mlp="gated", activation="gelu", dtype="tfloat32", top_k=4),
    dict(mlp="gated", activation="relu", dtype="float16", top_k=2, capacity_factor=0.75),
    dict(mlp="vanilla", activation="relu", dtype="float32", top_k=2, capacity_factor=1.0,
         world_size=2),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_oracle_matches_naive_loop(kw):
    cfg = MoEConfig(tokens=12, hidden=16, ffn=24, experts=6, **kw)
    w = MoEWeights.random(cfg, 11)
    x = np.concatenate([random_tokens(cfg, 5, rank=r) for r in range(cfg.world_size)])
    y, routing = moe_forward(cfg, w, x)
    y_naive, experts, kept = naive_forward(cfg, w, x)
    assert np.array_equal(routing.experts, experts)
    assert np.array_equal(routing.kept, kept)
    # Same math, different float64 summation order: equal up to one rounding step.
    a, b = y.astype(np.float64), y_naive.astype(np.float64)
    assert np.allclose(a, b, rtol=ULP[cfg.dtype] * 1.01, atol=1e-6)
    assert np.mean(a == b) > 0.97


def test_output_dtypes_and_shapes():
    for dtype in ("float32", "tfloat32", "bfloat16", "float16"):
        cfg = MoEConfig(tokens=8, hidden=8, ffn=8, experts=3, dtype=dtype)
        y, r = moe_forward(cfg, MoEWeights.random(cfg, 0), random_tokens(cfg, 0))
        assert y.dtype == np.dtype(cfg.storage_dtype) and y.shape == (8, 8)
        assert r.experts.dtype == np.int32 and r.weights.dtype == np.float32
        assert r.kept.dtype == bool and r.experts.shape == (8, 2)


def test_ties_go_to_the_lower_expert():
    cfg = MoEConfig(tokens=4, hidden=8, ffn=8, experts=5, top_k=2)
    probs = np.array([[0.1, 0.3, 0.3, 0.2, 0.1],
                      [0.25, 0.25, 0.25, 0.25, 0.0],
                      [0.0, 0.0, 0.0, 0.5, 0.5],
                      [0.2, 0.2, 0.2, 0.2, 0.2]], np.float32)
    r = route(cfg, probs)
    assert r.experts.tolist() == [[1, 2], [0, 1], [3, 4], [0, 1]]


def test_renormalisation():
    probs = np.array([[0.5, 0.3, 0.2]], np.float32)
    on = route(MoEConfig(tokens=1, hidden=8, ffn=8, experts=3, top_k=2), probs)
    off = route(MoEConfig(tokens=1, hidden=8, ffn=8, experts=3, top_k=2, renormalize=False), probs)
    assert np.allclose(on.weights, [[0.625, 0.375]]) and np.allclose(off.weights, [[0.5, 0.3]])
    one = route(MoEConfig(tokens=1, hidden=8, ffn=8, experts=3, top_k=1), probs)
    assert one.weights[0, 0] == 1.0


def test_capacity_keeps_token_order_then_slot_order():
    # 2 source ranks x 4 tokens, top-2 over 3 experts, capacity ceil(0.5*4*2/3) = 2.
    cfg = MoEConfig(tokens=4, hidden=8, ffn=8, experts=3, top_k=2, capacity_factor=0.5,
                    world_size=2)
    assert cfg.capacity(4) == 2
    e = np.array([[0, 1], [1, 0], [0, 2], [2, 1],    # rank 0
                  [1, 0], [0, 1], [2, 0], [1, 2]])   # rank 1
    probs = np.full((8, 3), 0.01, np.float32)
    for t, (a, b) in enumerate(e):
        probs[t, a], probs[t, b] = 0.6, 0.3
    r = route(cfg, probs, tokens_per_rank=4)
    assert np.array_equal(r.experts, e)
    # rank 0: expert 0 claims t0s0, t1s1 (full) -> t2s0 dropped; expert 1: t0s1, t1s0 ->
    # t3s1 dropped; expert 2: t2s1, t3s0 kept. rank 1 counts afresh.
    assert r.kept.tolist() == [[True, True], [True, True], [False, True], [True, False],
                               [True, True], [True, True], [True, False], [False, True]]


def test_dropped_assignments_contribute_zero():
    cfg = MoEConfig(tokens=16, hidden=8, ffn=16, experts=4, top_k=2, dtype="float32")
    w, x = MoEWeights.random(cfg, 1), random_tokens(cfg, 1)
    y, r = moe_forward(cfg, w, x)
    kept = r.kept.copy()
    kept[3, 1] = False
    kept[7, :] = False
    y2, _ = moe_forward(cfg, w, x, Routing(r.experts, r.weights, kept))
    assert np.array_equal(y2[7], np.zeros(8, np.float32))
    # Token 3 keeps only slot 0: its output is weight0 * expert_out.
    r1 = Routing(r.experts[3:4], r.weights[3:4], np.array([[True, False]]))
    c1 = cfg.replace(tokens=1)
    y3, _ = moe_forward(c1, w, x[3:4], r1)
    assert np.array_equal(y3[0], y2[3])
    assert not np.array_equal(y2[3], y[3])


def test_given_routing_is_used():
    cfg = MoEConfig(tokens=6, hidden=8, ffn=8, experts=4, top_k=2, dtype="float32")
    w, x = MoEWeights.random(cfg, 2), random_tokens(cfg, 2)
    forced = Routing(np.tile(np.array([[3, 2]], np.int32), (6, 1)),
                     np.full((6, 2), 0.5, np.float32), np.ones((6, 2), bool))
    y, r = moe_forward(cfg, w, x, forced)
    assert r.experts.tolist() == forced.experts.tolist()
    from flashmoe_core.oracle.reference import expert_ffn

    want = 0.5 * expert_ffn(cfg, w, 3, x).astype(np.float64) + \
        0.5 * expert_ffn(cfg, w, 2, x).astype(np.float64)
    assert np.allclose(y, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bad,fragment", [
    (lambda r: Routing(r.experts[:, :1], r.weights, r.kept), "routing.experts has shape"),
    (lambda r: Routing(r.experts + 10, r.weights, r.kept), "ids in \\[0, 4\\)"),
    (lambda r: Routing(r.experts, r.weights, r.kept.astype(int)), "must be bool"),
])
def test_bad_routing(bad, fragment):
    cfg = MoEConfig(tokens=6, hidden=8, ffn=8, experts=4)
    w, x = MoEWeights.random(cfg, 0), random_tokens(cfg, 0)
    _, r = moe_forward(cfg, w, x)
    with pytest.raises(ValueError, match=fragment):
        moe_forward(cfg, w, x, bad(r))


@pytest.mark.parametrize("shape,fragment", [((6, 9), "expected \\[world_size"),
                                            ((7, 8), "equal blocks"), ((0, 8), "blocks"),
                                            ((14, 8), "above the configured bound")])
def test_bad_tokens(shape, fragment):
    cfg = MoEConfig(tokens=6, hidden=8, ffn=8, experts=4, world_size=2 if shape[0] == 7 else 1)
    with pytest.raises(ValueError, match=fragment):
        moe_forward(cfg, MoEWeights.random(cfg, 0), np.zeros(shape, np.float32))


def test_matmul_rows_do_not_depend_on_batch():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 40)).astype(np.float32)
    b = rng.standard_normal((40, 24)).astype(np.float32)
    full = matmul_f32(a, b)
    for rows in ([5], [0, 299], list(range(129, 140)), list(range(0, 300, 7))):
        assert np.array_equal(matmul_f32(a[rows], b), full[rows])
    exact = (a.astype(np.float64) @ b.astype(np.float64)).astype(np.float32)
    assert np.array_equal(full, exact) or np.mean(full == exact) > 0.999


def test_gate_probabilities_sum_to_one():
    cfg = MoEConfig(tokens=32, hidden=16, ffn=8, experts=7)
    logits, probs = gate(cfg, MoEWeights.random(cfg, 0), random_tokens(cfg, 0))
    assert logits.dtype == np.float32 and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1.0, atol=1e-6)
