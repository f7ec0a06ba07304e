"""The non-finite policy (reference.py, rules 10-12): the oracle states it, the fused
kernel follows it on the GPU and on the CPU emulator, and check_finite=True refuses
non-finite input before a launch."""

import ml_dtypes
import numpy as np
import pytest

from conftest import per_backend
from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.cli.gpu_run import TOLERANCE, compare
from flashmoe_core.oracle.reference import (Routing, _capacity_mask, check_routing, gate,
                                            marked_tokens, moe_backward, moe_forward)

NAN, INF = float("nan"), float("inf")


def small(**kw):
    return MoEConfig(**{**dict(tokens=48, hidden=32, ffn=40, experts=6, top_k=2), **kw})


def f32(a):
    return np.asarray(a).astype(np.float32)


def rows_with(y, test):
    return np.nonzero(test(f32(y)).any(axis=1))[0]


def served_by(routing, expert):
    """Tokens with a kept assignment to ``expert``."""
    return np.nonzero(((routing.experts == expert) & routing.kept).any(axis=1))[0]


# ---------------------------------------------------------------- the oracle
@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_a_bad_x_element_marks_its_token_and_leaves_the_others_alone(value, dtype):
    cfg = small(dtype=dtype)
    w = MoEWeights.random(cfg, 0)
    x = random_tokens(cfg, 1)
    y0, r0 = moe_forward(cfg, w, x)
    x[7, 3] = value
    y, r = moe_forward(cfg, w, x)
    assert np.isnan(f32(y[7])).all()
    assert (r.experts[7] == -1).all() and np.isnan(r.weights[7]).all() and not r.kept[7].any()
    others = np.arange(cfg.tokens) != 7
    assert np.array_equal(y[others].view(np.uint8), y0[others].view(np.uint8))
    assert np.array_equal(r.experts[others], r0.experts[others])
    assert marked_tokens(r).tolist() == [t == 7 for t in range(cfg.tokens)]


def test_marked_tokens_claim_no_capacity():
    cfg = small(capacity_factor=0.5)
    w = MoEWeights.random(cfg, 0)
    x = random_tokens(cfg, 1)
    x[[0, 5, 9], 0] = NAN
    _, r = moe_forward(cfg, w, x)
    live = ~marked_tokens(r)
    # The others keep exactly what the capacity rule gives them alone, in token order.
    assert np.array_equal(r.kept[live], _capacity_mask(r.experts[live], cfg.capacity()))
    assert not r.kept[~live].any()


def test_a_bad_router_weight_marks_every_token():
    cfg = small()
    w = MoEWeights.random(cfg, 0)
    w.router[4, 2] = INF
    y, r = moe_forward(cfg, w, random_tokens(cfg, 1))
    assert np.isnan(f32(y)).all() and marked_tokens(r).all()


@pytest.mark.parametrize("mlp,name,index,whole_row", [
    ("vanilla", "w1", (2, 5, 7), True), ("vanilla", "b1", (2, 7), True),
    ("vanilla", "w2", (2, 7, 11), False), ("vanilla", "b2", (2, 11), False),
    ("gated", "wg", (2, 5, 7), True), ("gated", "wu", (2, 5, 7), True),
    ("gated", "w2", (2, 7, 11), False)])
@pytest.mark.parametrize("value", [NAN, INF, -INF])
def test_a_bad_expert_weight_reaches_exactly_the_rows_that_use_it(mlp, name, index,
                                                                  whole_row, value):
    cfg = small(mlp=mlp, activation="relu", capacity_factor=1.0)
    w = MoEWeights.random(cfg, 0)
    x = random_tokens(cfg, 1)
    y0, _ = moe_forward(cfg, w, x)
    getattr(w, name)[index] = value
    y, r = moe_forward(cfg, w, x)
    assert (r.kept == moe_forward(cfg, MoEWeights.random(cfg, 0), x)[1].kept).all()
    users = served_by(r, 2)
    assert users.size
    # Rule 11: an infinity counts as NaN, so it cannot vanish through relu(-inf) = 0.
    assert np.array_equal(rows_with(y, np.isnan), users)
    assert np.isfinite(f32(y)).sum() == y.size - (users.size * (cfg.hidden if whole_row else 1))
    if not whole_row:
        assert np.isnan(f32(y[users, 11])).all()
    others = np.setdiff1d(np.arange(cfg.tokens), users)
    assert np.array_equal(y[others].view(np.uint8), y0[others].view(np.uint8))
    stored = float(getattr(w, name)[index])  # the array is left as given
    assert stored == value or (np.isnan(stored) and np.isnan(value))


def test_routing_marks_are_whole_tokens():
    cfg = small(tokens=2, experts=4)
    good = Routing(np.array([[-1, -1], [0, 1]]), np.full((2, 2), NAN, np.float32),
                   np.array([[False, False], [True, True]]))
    assert marked_tokens(check_routing(cfg, good, 2)).tolist() == [True, False]
    for experts, kept in (([[-1, 0], [0, 1]], [[False, True], [True, True]]),
                          ([[-1, -1], [0, 1]], [[True, False], [True, True]])):
        with pytest.raises(ValueError, match="expert -1 marks a whole token"):
            check_routing(cfg, Routing(np.array(experts), good.weights, np.array(kept)), 2)


def test_backward_of_a_marked_token():
    cfg = small(tokens=16)
    w = MoEWeights.random(cfg, 0)
    x = random_tokens(cfg, 1)
    x[3, 0] = NAN
    dx, grads = moe_backward(cfg, w, x, np.ones((16, cfg.hidden)))
    assert np.isnan(dx[3]).all() and np.isfinite(np.delete(dx, 3, axis=0)).all()
    assert np.isnan(grads.router).all()  # the token used every router weight
    for name in ("w1", "b1", "w2", "b2"):  # and reached no expert
        assert np.isfinite(getattr(grads, name)).all(), name


def test_protocol_simulation_follows_the_policy():
    from flashmoe_core.kernel.ep import simulate

    cfg = small(world_size=2)
    w = MoEWeights.random(cfg, 0)
    xs = [random_tokens(cfg, 1, rank=r) for r in range(2)]
    xs[1][4, 4] = NAN
    w.w2[0, 3, 9] = NAN
    ys, routings, _ = simulate(cfg, w, xs)
    y_ref, _ = moe_forward(cfg, w, np.concatenate(xs))
    assert np.isnan(f32(y_ref)).any()
    assert np.array_equal(f32(np.concatenate(ys)), f32(y_ref), equal_nan=True)


def test_check_finite_names_the_tensor_and_the_first_bad_element():
    from flashmoe_core.numerics import check_finite, first_nonfinite

    a = np.zeros((3, 4), ml_dtypes.bfloat16)
    assert first_nonfinite(a) is None
    a[1, 2], a[2, 0] = INF, NAN
    assert first_nonfinite(a) == ((1, 2), INF)
    with pytest.raises(ValueError, match=r"x\[1, 2\] is inf \(2 non-finite value\(s\) in x\)"):
        check_finite("x", a)


# ---------------------------------------------------------------- the kernel
# One layer shape per element type (each compiles once on the emulator): vanilla relu,
# where a NaN used to vanish (fmaxf(NaN, 0) is 0), and a capacity limit.
KERNEL = dict(hidden=64, ffn=64, experts=8, top_k=2, capacity_factor=1.0)


def _scenarios(cfg):
    """(name, weights, x) with non-finite values in x, the router and expert weights."""
    base = MoEWeights.random(cfg, 3)
    x0 = random_tokens(cfg, 4)
    out = []
    x = x0.copy()
    x[1, 0], x[5, 63], x[6, 10] = NAN, INF, -INF
    out.append(("x", base, x))
    w = MoEWeights.random(cfg, 3)
    w.router[7, 1] = NAN
    out.append(("router", w, x0))
    w = MoEWeights.random(cfg, 3)
    w.w1[0, 0, 0] = NAN   # the case: the oracle had NaN rows, the kernel none
    w.b1[3, 17] = -INF
    out.append(("w1,b1", w, x0))
    w = MoEWeights.random(cfg, 3)
    w.w2[1, 5, 40] = INF
    w.b2[4, 8] = NAN
    out.append(("w2,b2", w, x0))
    return out


def _check_against_oracle(cfg, w, x, y, routing, what):
    res = compare(cfg, w, x, y, routing)
    assert res["nonfinite_mismatches"] == 0, (what, res)
    assert res["rel_error"] <= TOLERANCE[cfg.dtype], (what, res)
    y_ref, r_ref = moe_forward(cfg, w, x)
    assert np.array_equal(marked_tokens(routing), marked_tokens(r_ref)), what
    assert np.isnan(routing.weights[marked_tokens(routing)]).all(), what
    assert np.array_equal(routing.kept, r_ref.kept), what
    assert np.array_equal(np.isnan(f32(y)), np.isnan(f32(y_ref))), what
    return y_ref


# Every dtype on a GPU; on the emulator the two whose tensor-core paths the others
# share (fp16 runs bf16's MMA path, tf32 float32's without the 3xTF32 split), since
# each dtype costs the emulator a compile.
KERNEL_CASES = [pytest.param("gpu", d, marks=pytest.mark.gpu, id=f"gpu-{d}")
                for d in ("bfloat16", "float32", "float16", "tfloat32")] + \
               [pytest.param("emulator", d, marks=pytest.mark.emulator, id=f"emu-{d}")
                for d in ("bfloat16", "float32")]


@pytest.mark.parametrize("backend,dtype", KERNEL_CASES)
def test_kernel_follows_the_policy_for_each_dtype(dtype, backend):
    from flashmoe_core.gpu.layer import MoELayer

    cfg = MoEConfig(tokens=per_backend(backend, 512, 40), dtype=dtype, **KERNEL)
    nan_rows = {}
    for what, w, x in _scenarios(cfg):
        layer = MoELayer(cfg, w, backend=backend)
        try:
            y, routing = layer(x, return_routing=True)
        finally:
            layer.close()
        y_ref = _check_against_oracle(cfg, w, x, y, routing, what)
        nan_rows[what] = rows_with(y_ref, np.isnan).size
    # Every scenario reached some rows and no scenario reached all of them by accident
    # (except the router, which every token uses).
    assert nan_rows["router"] == cfg.tokens
    assert all(0 < nan_rows[k] < cfg.tokens for k in ("x", "w1,b1", "w2,b2")), nan_rows


def test_kernel_marks_tokens_in_the_separate_topk_phase(backend):
    # More experts than one gate tile: top-k runs after the gate's grid barrier, from the
    # logits buffer. The shape of test_moe_kernel.py's e256-k8 (its kernel is built once;
    # the token count is a runtime value, and a few tokens keep the emulator quick).
    from flashmoe_core.gpu.layer import MoELayer
    from test_moe_kernel import AWKWARD

    cfg = MoEConfig(dtype="bfloat16", **dict(AWKWARD["e256-k8"],
                                             tokens=per_backend(backend, 300, 6)))
    w = MoEWeights.random(cfg, 0)
    x = random_tokens(cfg, 1)
    x[2, 1], x[cfg.tokens - 1, 0] = NAN, -INF
    layer = MoELayer(cfg, w, backend=backend)
    try:
        y, routing = layer(x, return_routing=True)
    finally:
        layer.close()
    _check_against_oracle(cfg, w, x, y, routing, "e256-k8")
    assert marked_tokens(routing).sum() == 2


@pytest.mark.emulator
def test_expert_parallel_kernel_follows_the_policy():
    from flashmoe_core.emulator import EmulatedExpertParallel

    # The shape of test_emulator_ep.py (one kernel build for both).
    cfg = MoEConfig(tokens=96, hidden=128, ffn=192, experts=9, top_k=2, world_size=2)
    w = MoEWeights.random(cfg, 1)
    w.w1[6, 2, 3] = NAN  # expert 6 lives on PE 1: PE 0's tokens bring NaN rows back
    xs = [random_tokens(cfg, 2, rank=r) for r in range(2)]
    xs[0][3, 3], xs[1][90, 0] = INF, NAN
    ys, routings = EmulatedExpertParallel(cfg, w, timeout_s=30)(xs, return_routing=True)
    y = np.concatenate(ys)
    routing = Routing(*(np.concatenate([getattr(r, f) for r in routings])
                        for f in Routing._fields))
    y_ref = _check_against_oracle(cfg, w, np.concatenate(xs), y, routing, "ep")
    assert marked_tokens(routing).sum() == 2
    remote = served_by(routing, 6)
    assert (remote < cfg.tokens).any() and np.isnan(f32(y_ref[remote])).all()


@pytest.mark.emulator
def test_check_finite_refuses_before_the_launch():
    from flashmoe_core.emulator import EmulatedExpertParallel
    from flashmoe_core.gpu.layer import MoELayer

    cfg = MoEConfig(tokens=40, dtype="bfloat16", **KERNEL)
    w = MoEWeights.random(cfg, 3)
    x = random_tokens(cfg, 4)
    layer = MoELayer(cfg, w, backend="emulator", check_finite=True)
    epoch = layer.testing.state()["epoch"]
    x[9, 33] = NAN
    with pytest.raises(ValueError, match=r"x\[9, 33\] is nan"):
        layer(x)
    # The saving forwards check alike (and keep no slot of a refused call).
    for recompute in (False, True):
        with pytest.raises(ValueError, match=r"x\[9, 33\] is nan"):
            layer(x, save_for_backward=True, recompute=recompute)
    pool = layer._saved_pool
    assert sum(len(free) for free in pool._free.values()) == pool.slots  # none held
    assert layer.testing.state()["epoch"] == epoch  # nothing was launched
    w.b2[1, 2] = INF
    with pytest.raises(ValueError, match=r"weights.b2\[1, 2\] is inf"):
        MoELayer(cfg, w, backend="emulator", check_finite=True)
    ep_cfg = MoEConfig(tokens=96, hidden=128, ffn=192, experts=9, top_k=2, world_size=2)
    ep = EmulatedExpertParallel(ep_cfg, MoEWeights.random(ep_cfg, 1), check_finite=True)
    xs = [random_tokens(ep_cfg, 2, rank=r) for r in range(2)]
    xs[1][0, 0] = -INF
    with pytest.raises(ValueError, match=r"xs\[1\]\[0, 0\] is -inf"):
        ep(xs)
    with pytest.raises(ValueError, match=r"xs\[1\]\[0, 0\] is -inf"):
        ep(xs, save_for_backward=True)


def test_gpu_layer_checks_weights_before_touching_a_gpu():
    from flashmoe_core.gpu.layer import MoELayer

    cfg = small()
    w = MoEWeights.random(cfg, 0)
    w.router[0, 0] = NAN
    with pytest.raises(ValueError, match=r"weights.router\[0, 0\] is nan"):
        MoELayer(cfg, w, check_finite=True)
