"""The fused backward kernel on the routing rules, capacity rules, MLP variants and
shared experts that real models use, against the float64 oracle (reference.moe_backward)
handed the kernel's own routing.

One layer per model family, each on both backends (the emulator runs a few dozen
tokens); together they cover every storage type, sigmoid and softmax scoring, softmax
after top-k, router and selection biases, group-limited top-k, routed scaling, rounded
logits, capacity drops in token and slot order, renormalisation after the drop, gated
biases, the clamped SwiGLU and shared experts (vanilla and gated, with and without a
gate, with biases). One of them also runs expert-parallel on 2 PEs. Errors:
max |kernel - oracle| / max |oracle| per tensor, the bounds of test_backward_kernel.
"""

import numpy as np
import pytest

from conftest import per_backend
from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.kernel.training import MoEGradients, gradient_shapes
from flashmoe_core.numerics import round_to
from flashmoe_core.cli.gpu_run import compare as gpu_compare
from flashmoe_core.oracle.reference import Routing, moe_backward

BACKWARD_TOLERANCE = {"bfloat16": 2e-2, "float16": 2.5e-3, "tfloat32": 2e-3, "float32": 3e-6}

MODELS = {
    # DeepSeek-V3: sigmoid scores, a selection-only bias, 4 groups of which 2 stay
    # eligible, renormalised and scaled by 2.5; one shared expert.
    "deepseek-v3": dict(tokens=256, hidden=128, ffn=64, experts=16, top_k=4, mlp="gated",
                        activation="silu", scoring="sigmoid", selection_bias=True, n_group=4,
                        topk_group=2, routed_scaling=2.5, n_shared=1),
    # GPT-OSS: router bias, softmax over the chosen logits, gated biases, clamped SwiGLU
    # (a limit low enough that both clamps act); here also capacity drops renormalised
    # and a gated shared expert (Qwen2-MoE's gate) of another width.
    "gpt-oss-drops-shared": dict(tokens=256, hidden=64, ffn=64, experts=8, top_k=2,
                                 mlp="gated", mlp_bias=True, activation="swiglu_clamped",
                                 swiglu_limit=0.5, router_bias=True, softmax_after_topk=True,
                                 routed_scaling=1.25, capacity_factor=0.75,
                                 renormalize_after_drop=True, n_shared=1, shared_ffn=96,
                                 shared_gate=True, dtype="float32"),
    # NLLB-MoE: slot-major capacity, the kept weights renormalised after the drop; here
    # also two vanilla shared experts (their biases).
    "nllb-shared": dict(tokens=256, hidden=128, ffn=128, experts=8, top_k=2,
                        capacity_factor=0.5, capacity_order="slot", renormalize_after_drop=True,
                        renormalize=False, activation="gelu", dtype="tfloat32", n_shared=2,
                        shared_ffn=64),
    # Sigmoid without renormalisation, logits rounded to the storage type, scaled, drops
    # in token order; top-10 (as Qwen3-Next), past the 8 most models use.
    "sigmoid-rounded-k10": dict(tokens=256, hidden=64, ffn=96, experts=16, top_k=10,
                            scoring="sigmoid", renormalize=False, router_logits="storage",
                            routed_scaling=1.5, capacity_factor=0.75, dtype="float16"),
}
EMULATOR_TOKENS = {"deepseek-v3": 40, "gpt-oss-drops-shared": 48, "nllb-shared": 48,
                   "sigmoid-rounded-k10": 48}

_layers = {}


def layer_for(cfg, backend, seed=0):
    from flashmoe_core.gpu.layer import MoELayer

    key = (cfg, seed, backend)
    if key not in _layers:
        w = MoEWeights.random(cfg, seed)
        _layers[key] = (MoELayer(cfg, w, backend=backend), w)
    return _layers[key]


def upstream(cfg, tokens, seed):
    rng = np.random.default_rng([seed, 77])
    return round_to(rng.standard_normal((tokens, cfg.hidden), dtype=np.float32), cfg.dtype)


def rel_err(got, want):
    got = np.asarray(got).astype(np.float64)
    scale = np.abs(want).max()
    return float(np.abs(got - want).max() / scale) if scale > 0 else float(np.abs(got).max())


def compare(cfg, dx, grads, ref_dx, ref):
    assert set(grads.names) == set(ref.names) == set(gradient_shapes(cfg))
    errs = {"dx": rel_err(dx, ref_dx)}
    for name in ref.names:
        g = getattr(grads, name)
        assert g.dtype == np.float32 and g.shape == getattr(ref, name).shape, name
        errs[name] = rel_err(g, getattr(ref, name))
    assert max(errs.values()) <= BACKWARD_TOLERANCE[cfg.dtype], errs
    return errs


@pytest.mark.parametrize("name", list(MODELS))
def test_backward_of_each_model_family_matches_the_oracle(name, backend):
    cfg = MoEConfig(**MODELS[name])
    layer, w = layer_for(cfg, backend)
    t = per_backend(backend, cfg.tokens, EMULATOR_TOKENS[name])
    x = random_tokens(cfg, 1, tokens=t)
    dy = upstream(cfg, t, 1)
    y, saved, routing = layer(x, save_for_backward=True, return_routing=True)
    res = gpu_compare(cfg, w, x, y, routing)  # the forward too, on its own routing
    assert res["passed"], res
    dx, grads = layer.backward(dy, saved)
    assert isinstance(grads, MoEGradients) and "selection_bias" not in grads.names
    ref_dx, ref = moe_backward(cfg, w, x, dy, routing)
    compare(cfg, dx, grads, ref_dx, ref)
    if cfg.capacity_factor is not None:
        assert not routing.kept.all()  # the drops are real
    if cfg.router_bias:
        assert np.abs(grads.router_bias).max() > 0
    if cfg.activation == "swiglu_clamped":  # both clamps act on some kept rows
        xf = x.astype(np.float64)
        e = int(routing.experts[routing.kept][0])
        g, u = xf @ w.wg[e] + w.bg[e], xf @ w.wu[e] + w.bu[e]
        lim = cfg.swiglu_limit
        assert (g > lim).any() and (g < lim).any() and (np.abs(u) > lim).any()


@pytest.mark.parametrize("name", ["gpt-oss-drops-shared", "sigmoid-rounded-k10"])
def test_backward_of_a_given_routing(name, backend):
    """layer(x, routing=...) then backward: the gradient of the caller's weights
    (routing_weights; through the renormalisation after the drop where there is one)
    instead of the router's, which is exactly zero; the rest as the oracle's."""
    cfg = MoEConfig(**MODELS[name])
    layer, w = layer_for(cfg, backend)
    t = per_backend(backend, cfg.tokens, 32)
    x, dy = random_tokens(cfg, 6, tokens=t), upstream(cfg, t, 6)
    rng = np.random.default_rng(6)
    experts = np.stack([rng.choice(cfg.experts, cfg.top_k, replace=False)
                        for _ in range(t)]).astype(np.int32)
    weights = rng.uniform(0.1, 1.0, (t, cfg.top_k)).astype(np.float32)
    _, saved, routing = layer(x, routing=(experts, weights), save_for_backward=True,
                              return_routing=True)
    assert np.array_equal(routing.experts, experts) and saved.given
    assert not routing.kept.all()  # the capacity rule applies to given routing too
    dx, grads = layer.backward(dy, saved)
    ref_dx, ref = moe_backward(cfg, w, x, dy, routing, given_weights=True)
    assert not np.any(grads.router)
    assert not cfg.router_bias or not np.any(grads.router_bias)
    compare(cfg, dx, grads, ref_dx, ref)
    assert grads.routing_weights.shape == (t, cfg.top_k)
    assert rel_err(grads.routing_weights, ref.routing_weights) <= BACKWARD_TOLERANCE[cfg.dtype]
    assert np.all(grads.routing_weights[~routing.kept] == 0)
    with pytest.raises(ValueError, match="recompute=True with routing="):
        layer(x, routing=(experts, weights), save_for_backward=True, recompute=True)
    # The next forward of the router's own routing has no routing_weights.
    _, saved = layer(x, save_for_backward=True)
    assert layer.backward(dy, saved)[1].routing_weights is None


def test_accumulating_adds_the_bias_gradients_too(backend):
    cfg = MoEConfig(**MODELS["gpt-oss-drops-shared"])
    layer, w = layer_for(cfg, backend)
    t = per_backend(backend, cfg.tokens, 24)
    x, dy = random_tokens(cfg, 2, tokens=t), upstream(cfg, t, 2)
    _, saved = layer(x, save_for_backward=True)
    _, once = layer.backward(dy, saved, retain=True)
    acc = MoEGradients.zeros(cfg)
    for name in acc.names:
        getattr(acc, name)[...] = 1.0
    layer.backward(dy, saved, grads_out=acc, accumulate=True)
    for name in ("router_bias", "bg", "bu", "b2", "router", "shared_bu", "shared_b2",
                 "shared_gate", "shared_wg"):
        np.testing.assert_array_equal(getattr(acc, name), getattr(once, name) + np.float32(1.0),
                                      err_msg=name)


def test_a_marked_token_reaches_no_shared_gradient(backend):
    """A token with a NaN in x: its dx row and the router's gradients are NaN; the
    shared experts' gradients are those of the other tokens alone."""
    cfg = MoEConfig(**MODELS["gpt-oss-drops-shared"])
    layer, w = layer_for(cfg, backend)
    t = per_backend(backend, cfg.tokens, 24)
    x, dy = random_tokens(cfg, 4, tokens=t), upstream(cfg, t, 4)
    x[5, 3] = np.nan
    _, saved, routing = layer(x, save_for_backward=True, return_routing=True)
    dx, grads = layer.backward(dy, saved)
    assert np.isnan(dx[5].astype(np.float32)).all()
    assert np.isfinite(np.delete(dx, 5, axis=0).astype(np.float32)).all()
    assert np.isnan(grads.router).all() and np.isnan(grads.router_bias).all()
    keep = np.arange(t) != 5
    sub = Routing(*(a[keep] for a in routing))
    _, ref = moe_backward(cfg, w, x[keep], dy[keep], sub)
    for name in [n for n in ref.names if n.startswith("shared_")]:
        assert rel_err(getattr(grads, name), getattr(ref, name)) <= 3e-6, name


@pytest.mark.emulator
def test_expert_parallel_backward_of_the_routing_rules():
    """DeepSeek-V3's rules on 2 PEs: each PE's tokens, its own experts' gradients, the
    router's and the (replicated) shared expert's partials summing to the oracle's."""
    from flashmoe_core.emulator import EmulatedExpertParallel

    cfg = MoEConfig(**{**MODELS["deepseek-v3"], "tokens": 24, "world_size": 2})
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30)
    xs = [random_tokens(cfg, 3, rank=r) for r in range(2)]
    dys = [upstream(cfg, cfg.tokens, 5 + r) for r in range(2)]
    _, saved, routings = ep(xs, save_for_backward=True, return_routing=True)
    dxs, grads = ep.backward(dys, saved)
    routing = Routing(*(np.concatenate([getattr(r, f) for r in routings])
                        for f in Routing._fields))
    ref_dx, ref = moe_backward(cfg, w, np.concatenate(xs), np.concatenate(dys), routing)
    tol = BACKWARD_TOLERANCE[cfg.dtype]
    assert rel_err(np.concatenate(dxs), ref_dx) <= tol
    for name in ("router", "shared_wg", "shared_wu", "shared_w2"):
        assert rel_err(sum(getattr(g, name) for g in grads), getattr(ref, name)) <= tol, name
    ids = np.concatenate([g.expert_ids for g in grads])
    for name in ("wg", "wu", "w2"):
        got = np.concatenate([getattr(g, name) for g in grads])
        assert rel_err(got, getattr(ref, name)[ids]) <= tol, name


@pytest.mark.emulator
def test_backward_under_every_emulator_check():
    """The backward with the memory model on (weak global memory, races, preemption,
    lazy cp.async), on test_shared_experts' 128-expert layer (the same checked forward
    build): the shared gate is logit column 128, past the experts' lanes, and the logits
    go through global memory (two gate tiles)."""
    from conftest import emulator_checks
    from flashmoe_core.gpu.layer import MoELayer

    cfg = MoEConfig(tokens=40, hidden=64, ffn=32, experts=128, top_k=2, dtype="bfloat16",
                    n_shared=1, shared_gate=True)
    w = MoEWeights.random(cfg, 0)
    layer = MoELayer(cfg, w, backend="emulator", emulator_options=emulator_checks(1))
    x, dy = random_tokens(cfg, 1), upstream(cfg, cfg.tokens, 1)
    _, saved, routing = layer(x, save_for_backward=True, return_routing=True)
    dx, grads = layer.backward(dy, saved)
    ref_dx, ref = moe_backward(cfg, w, x, dy, routing)
    compare(cfg, dx, grads, ref_dx, ref)
    assert np.abs(grads.shared_gate).max() > 0
