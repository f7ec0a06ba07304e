"""Shared experts (DeepSeek-V3, Qwen2-MoE): the config and weights, the oracle's rule 13
against a per-token transcription, and the fused kernel on the emulator against the
oracle (one PE and two, routed by the router or by the caller)."""

import numpy as np
import pytest

from conftest import emulator_checks
from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.cli.gpu_run import TOLERANCE, compare
from flashmoe_core.numerics import as_f32, round_to
from flashmoe_core.oracle.reference import combine, moe_forward, shared_experts

BASE = dict(tokens=40, hidden=64, ffn=32, experts=4, top_k=2, mlp="gated", activation="silu",
            dtype="float32")


def test_config_validates_the_shared_fields():
    cfg = MoEConfig(**BASE, n_shared=2)
    assert cfg.shared_ffn == 32 and cfg.shared_width == 64  # shared_ffn defaults to ffn
    assert MoEConfig.from_json(cfg.to_json()) == cfg
    assert MoEConfig(**BASE, n_shared=1, shared_ffn=96).shared_width == 96
    for kw, fragment in [(dict(shared_ffn=64), "without shared experts"),
                         (dict(shared_gate=True), "without shared experts"),
                         (dict(n_shared=1, shared_ffn=12), "multiple of 8"),
                         (dict(n_shared=65), "n_shared"),
                         (dict(n_shared=2, shared_ffn=1 << 16), "at most 65536")]:
        with pytest.raises(ValueError, match=fragment):
            MoEConfig(**BASE, **kw)
    # FLOPs count the shared MLP over every token and the gate.
    plain = MoEConfig(**BASE)
    gated = MoEConfig(**BASE, n_shared=2, shared_gate=True)
    assert gated.flops() - plain.flops() == 3 * 2 * 40 * 64 * 64 + 2 * 40 * 64


def test_weights_hold_the_shared_mlp_whole():
    cfg = MoEConfig(**BASE, n_shared=2, shared_ffn=24, shared_gate=True)
    w = MoEWeights.random(cfg, 0)
    shapes = {n: getattr(w, n).shape for n in w.names if n.startswith("shared")}
    assert shapes == {"shared_wg": (64, 48), "shared_wu": (64, 48), "shared_w2": (48, 64),
                      "shared_gate": (64,)}
    part = w.subset([1, 3])  # a rank's experts: the shared MLP is replicated
    assert np.array_equal(part.shared_w2, w.shared_w2) and part.expert_ids == (1, 3)
    again = MoEWeights.random(cfg, 0, expert_ids=[2])
    assert np.array_equal(again.shared_wg, w.shared_wg)
    with pytest.raises(ValueError, match="missing weight"):
        MoEWeights(cfg, **{k: v for k, v in w.arrays().items() if k != "shared_gate"})
    # Weights built without shared experts do not serve a config with them.
    from flashmoe_core.weights import check_weights
    with pytest.raises(ValueError, match="n_shared"):
        check_weights(cfg, MoEWeights.random(MoEConfig(**BASE), 0))


def _mlp64(cfg, w, x, prefix):
    """One token at a time in float64 with the oracle's roundings: act(x Wg) * (x Wu) W2."""
    f32 = lambda a: as_f32(a).astype(np.float64)  # noqa: E731
    xr = f32(round_to(x, cfg.dtype))
    g = (xr @ f32(getattr(w, prefix + "wg"))).astype(np.float32).astype(np.float64)
    u = (xr @ f32(getattr(w, prefix + "wu"))).astype(np.float32).astype(np.float64)
    h = f32(round_to((g / (1 + np.exp(-g)) * u).astype(np.float32), cfg.dtype))
    return f32(round_to((h @ f32(getattr(w, prefix + "w2"))).astype(np.float32), cfg.dtype))


@pytest.mark.parametrize("gate", [False, True])
def test_oracle_adds_the_shared_mlp_after_the_slots(gate):
    cfg = MoEConfig(**BASE, n_shared=2, shared_gate=gate)
    w = MoEWeights.random(cfg, 1)
    x = random_tokens(cfg, 2)
    y, routing = moe_forward(cfg, w, x)
    g, ys = shared_experts(cfg, w, x)
    ys_naive = _mlp64(cfg, w, x, "shared_")
    np.testing.assert_allclose(as_f32(ys), ys_naive, rtol=1e-5, atol=1e-6)
    if gate:
        xr = as_f32(round_to(x, cfg.dtype)).astype(np.float64)
        logit = (xr @ as_f32(w.shared_gate).astype(np.float64)).astype(np.float32)
        np.testing.assert_allclose(g, 1 / (1 + np.exp(-logit.astype(np.float64))), rtol=1e-6)
    else:
        assert g is None
    # y = routed combine + g * ys, one float32 sum rounded once.
    routed = as_f32(moe_forward(cfg.replace(n_shared=0, shared_gate=False, shared_ffn=None),
                                MoEWeights(cfg.replace(n_shared=0, shared_gate=False,
                                                       shared_ffn=None),
                                           **{k: v for k, v in w.arrays().items()
                                              if not k.startswith("shared")}),
                                x, routing)[0]).astype(np.float64)
    scale = np.ones(cfg.tokens) if g is None else g.astype(np.float64)
    np.testing.assert_allclose(as_f32(y), routed + scale[:, None] * as_f32(ys), rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(as_f32(y), routed, atol=1e-3)  # the shared part matters


def test_several_shared_experts_are_one_wide_mlp():
    """n experts of width f side by side equal the sum of the n experts' outputs (the
    models' implementation; here up to the one rounding of the sum)."""
    cfg = MoEConfig(**BASE, n_shared=3, shared_ffn=16)
    w = MoEWeights.random(cfg, 4)
    x = random_tokens(cfg, 5)
    _, ys = shared_experts(cfg, w, x)
    total = np.zeros((cfg.tokens, cfg.hidden))
    one = cfg.replace(n_shared=1)
    for j in range(3):
        part = {k: v for k, v in w.arrays().items() if not k.startswith("shared")}
        cols = slice(16 * j, 16 * (j + 1))
        part.update(shared_wg=w.shared_wg[:, cols], shared_wu=w.shared_wu[:, cols],
                    shared_w2=w.shared_w2[cols])
        total += as_f32(shared_experts(one, MoEWeights(one, **part), x)[1])
    np.testing.assert_allclose(as_f32(ys), total, rtol=1e-4, atol=1e-5)


def test_marked_tokens_stay_nan_and_nan_shared_weights_propagate():
    cfg = MoEConfig(**BASE, n_shared=1)
    w = MoEWeights.random(cfg, 0)
    x = random_tokens(cfg, 1)
    x[3, 5] = np.nan
    y, routing = moe_forward(cfg, w, x)
    assert np.isnan(y[3]).all() and np.isfinite(np.delete(y, 3, axis=0)).all()
    w.shared_w2[:, 7] = np.nan  # column 7 of every token's shared output
    y2 = combine(cfg, routing, np.zeros((cfg.tokens, 2, cfg.hidden), np.float32),
                 shared_experts(cfg, w, x))
    assert np.isnan(y2[:, 7]).all() and np.isfinite(np.delete(y2[:5], [3], 0)[:, :7]).all()


# ---------------------------------------------------------------- the fused kernel
# The shared MLP's tiles are up/down tasks over every token tile; its width differs
# from the routed experts' (three up slices of 64 columns, gated).
KERNEL_LAYERS = {
    "bf16-gated-gate-partial-tiles": dict(
        tokens=150, hidden=128, ffn=64, experts=8, top_k=2, mlp="gated", activation="silu",
        dtype="bfloat16", n_shared=2, shared_ffn=96, shared_gate=True),
    "f32-vanilla-capacity": dict(
        tokens=72, hidden=64, ffn=64, experts=6, top_k=3, activation="gelu", dtype="float32",
        capacity_factor=0.5, n_shared=1, shared_ffn=40),
    # 127 experts and the gate: 128 gate columns, top-k still in the gate's epilogue.
    "f16-gate-column-127": dict(
        tokens=40, hidden=64, ffn=32, experts=127, top_k=2, mlp="gated", activation="gelu",
        dtype="float16", n_shared=1, shared_gate=True),
    # tfloat32, with slot-major drops renormalised after them.
    "tf32-vanilla-slot-major": dict(
        tokens=64, hidden=64, ffn=32, experts=4, top_k=2, activation="silu", dtype="tfloat32",
        capacity_factor=0.75, capacity_order="slot", renormalize_after_drop=True, n_shared=1),
    # 128 experts and the gate: two gate tiles, logits through global memory.
    "bf16-gate-column-129": dict(
        tokens=40, hidden=64, ffn=32, experts=128, top_k=2, dtype="bfloat16", n_shared=1,
        shared_gate=True),
}


def emulated(cfg, seed=0):
    from flashmoe_core.gpu.layer import MoELayer

    w = MoEWeights.random(cfg, seed)
    return MoELayer(cfg, w, backend="emulator", emulator_options=emulator_checks(seed + 1)), w


@pytest.mark.emulator
@pytest.mark.parametrize("name", list(KERNEL_LAYERS))
def test_fused_kernel_runs_the_shared_experts_like_the_oracle(name):
    cfg = MoEConfig(**KERNEL_LAYERS[name])
    layer, w = emulated(cfg)
    x = random_tokens(cfg, 1)
    y, routing = layer(x, return_routing=True)
    res = compare(cfg, w, x, y, routing)
    assert res["rel_error"] <= TOLERANCE[cfg.dtype] and res["routing_agreement"] >= 0.999, res
    # Fewer tokens than the bound: a partial last token tile, no recompiling.
    x2 = x[:cfg.tokens - 17]
    y2, r2 = layer(x2, return_routing=True)
    res2 = compare(cfg, w, x2, y2, r2)
    assert res2["rel_error"] <= TOLERANCE[cfg.dtype], res2


@pytest.mark.emulator
def test_shared_experts_with_routing_from_the_caller():
    cfg = MoEConfig(**KERNEL_LAYERS["bf16-gated-gate-partial-tiles"])
    layer, w = emulated(cfg, 2)
    x = random_tokens(cfg, 3)
    rng = np.random.default_rng(4)
    experts = rng.integers(0, cfg.experts, size=(cfg.tokens, cfg.top_k))
    weights = rng.random((cfg.tokens, cfg.top_k)).astype(np.float32)
    y, routing = layer(x, return_routing=True, routing=(experts, weights))
    y_ref, _ = moe_forward(cfg, w, x, routing)
    rel = np.linalg.norm(as_f32(y).astype(np.float64) - as_f32(y_ref)) / \
        np.linalg.norm(as_f32(y_ref))
    assert rel <= TOLERANCE[cfg.dtype], rel


@pytest.mark.emulator
def test_expert_parallel_replicates_the_shared_experts():
    """Each PE runs the shared MLP on its own tokens: the two-PE output equals one PE's."""
    from flashmoe_core.emulator import EmulatedExpertParallel
    from flashmoe_core.gpu.layer import MoELayer

    cfg = MoEConfig(tokens=64, hidden=128, ffn=64, experts=5, top_k=2, mlp="gated",
                    activation="silu", world_size=2, n_shared=1, shared_ffn=72,
                    shared_gate=True)
    w = MoEWeights.random(cfg, 1)
    ep = EmulatedExpertParallel(cfg, w, timeout_s=30, options=emulator_checks(3))
    xs = [random_tokens(cfg, 2, rank=r) for r in range(2)]
    ys, routings = ep(xs, return_routing=True)
    one = cfg.replace(world_size=1, tokens=128)
    y1 = MoELayer(one, MoEWeights.random(one, 1), backend="emulator")(np.concatenate(xs))
    assert np.array_equal(np.concatenate(ys).view(np.uint16), y1.view(np.uint16))
    from flashmoe_core.oracle.reference import Routing
    routing = Routing(*(np.concatenate([getattr(r, f) for r in routings])
                        for f in Routing._fields))
    res = compare(one, MoEWeights.random(one, 1), np.concatenate(xs), y1, routing)
    assert res["rel_error"] <= TOLERANCE[cfg.dtype], res
