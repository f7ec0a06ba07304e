"""The fused backward kernel against the float64 oracle (reference.moe_backward), and
the training API around it.

Every kernel test runs on the GPU (marker ``gpu``) and on the CPU emulator
(``emulator``). The oracle is handed the kernel's own routing, so both differentiate
the same choice. Error = max |kernel - oracle| / max |oracle| per tensor.

Tolerances come from measured errors on the emulator (the worst over the shapes below,
two seeds each, every tensor): bfloat16 5.9e-3, float16 6.8e-4, tfloat32 4.0e-4,
float32 6.8e-7; the bounds are 3.4x to 5x those. The kernel rounds what feeds tensor cores to the storage
type (w dy, z, pre-activations, dA, dZ: the forward's rounding rules) and accumulates
in float32; the oracle rounds nothing.
"""

import numpy as np
import pytest

from conftest import per_backend
from flashmoe_core import FlashMoETimeout, MoEConfig, MoEWeights, random_tokens
from flashmoe_core.kernel.training import MoEGradients, SavedForBackward, saved_bytes_per_token
from flashmoe_core.numerics import round_to
from flashmoe_core.oracle.reference import moe_backward

BACKWARD_TOLERANCE = {"bfloat16": 2e-2, "float16": 2.5e-3, "tfloat32": 2e-3, "float32": 3e-6}

_layers = {}


def make_layer(cfg, w, backend, **kw):
    from flashmoe_core.gpu.layer import MoELayer

    return MoELayer(cfg, w, backend=backend, **kw)


def layer_for(cfg, backend, seed=0):
    key = (cfg, seed, backend)
    if key not in _layers:
        w = MoEWeights.random(cfg, seed)
        _layers[key] = (make_layer(cfg, w, backend), w)
    return _layers[key]


def upstream(cfg, tokens, seed):
    rng = np.random.default_rng([seed, 77])
    return round_to(rng.standard_normal((tokens, cfg.hidden), dtype=np.float32), cfg.dtype)


def rel_err(got, want):
    got = np.asarray(got).astype(np.float64)
    scale = np.abs(want).max()
    return float(np.abs(got - want).max() / scale) if scale > 0 else float(np.abs(got).max())


def check_against_oracle(cfg, layer, w, x, dy, saved=None, routing=None):
    if saved is None:
        _, saved, routing = layer(x, save_for_backward=True, return_routing=True)
    dx, grads = layer.backward(dy, saved)
    ref_dx, ref = moe_backward(cfg, w, x, dy, routing)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    assert isinstance(grads, MoEGradients) and grads.names == w.names
    errs = {"dx": rel_err(dx, ref_dx)}
    for name in ref.names:
        g = getattr(grads, name)
        assert g.dtype == np.float32 and g.shape == getattr(w, name).shape, name
        errs[name] = rel_err(g, getattr(ref, name))
    assert max(errs.values()) <= BACKWARD_TOLERANCE[cfg.dtype], errs
    return dx, grads, routing, errs


# Each shape covers several axes at once (every compile costs the CPU tier ~20 s):
# every dtype, both MLPs, every activation in each MLP, top_k 1/2/4/7/8, renormalise
# on and off, capacity drops, partial row and column tiles, more than one gate tile.
SHAPES = {
    "bf16-capacity": dict(tokens=200, hidden=192, ffn=320, experts=12, top_k=3,
                          capacity_factor=0.5),
    "fp16-gated-gelu-k4": dict(tokens=256, hidden=128, ffn=192, experts=8, top_k=4, mlp="gated",
                               activation="gelu", dtype="float16", renormalize=False),
    "tf32-silu-k1": dict(tokens=256, hidden=128, ffn=128, experts=6, top_k=1, activation="silu",
                         dtype="tfloat32"),
    "fp32-gated-relu": dict(tokens=256, hidden=64, ffn=96, experts=4, top_k=2, mlp="gated",
                            dtype="float32"),
    "odd-gated": dict(tokens=256, hidden=1000, ffn=1032, experts=7, top_k=7, mlp="gated",
                      activation="silu"),
    "e256-k8": dict(tokens=300, hidden=256, ffn=256, experts=256, top_k=8, activation="gelu"),
}
# Tokens per emulator run (the GPU runs the configured bound).
EMULATOR_TOKENS = {"bf16-capacity": 133, "fp16-gated-gelu-k4": 40, "tf32-silu-k1": 50,
                   "fp32-gated-relu": 40, "odd-gated": 12, "e256-k8": 16}


@pytest.mark.parametrize("name", list(SHAPES))
def test_backward_matches_the_oracle(name, backend):
    cfg = MoEConfig(**SHAPES[name])
    layer, w = layer_for(cfg, backend)
    t = per_backend(backend, cfg.tokens, EMULATOR_TOKENS[name])
    x = random_tokens(cfg, 1, tokens=t)
    _, _, routing, errs = check_against_oracle(cfg, layer, w, x, upstream(cfg, t, 1))
    if cfg.capacity_factor is not None:
        assert not routing.kept.all()  # the drops are real


def test_one_token_and_partial_token_tiles(backend):
    cfg = MoEConfig(**SHAPES["bf16-capacity"])
    layer, w = layer_for(cfg, backend)
    for t in (1, per_backend(backend, 129, 7)):
        x = random_tokens(cfg, 5 + t, tokens=t)
        check_against_oracle(cfg, layer, w, x, upstream(cfg, t, t))


def test_top1_renormalised_router_gradient_is_exactly_zero(backend):
    # w = p / p = 1 exactly: the logits do not matter, and the kernel's float32 math
    # gives exactly 0 (g - g * 1), not a rounding residue.
    cfg = MoEConfig(**SHAPES["tf32-silu-k1"])
    layer, w = layer_for(cfg, backend)
    t = per_backend(backend, 256, 24)
    x = random_tokens(cfg, 2, tokens=t)
    _, grads, _, _ = check_against_oracle(cfg, layer, w, x, upstream(cfg, t, 2))
    assert not grads.router.any() and np.abs(grads.w1).max() > 0


def test_experts_without_rows_get_exactly_zero(backend):
    cfg = MoEConfig(**SHAPES["bf16-capacity"])
    w = MoEWeights.random(cfg, 3)
    router = w.router.copy()
    router[:, [2, 7]] = round_to(np.full((cfg.hidden, 2), -0.5, np.float32), cfg.dtype)
    x = np.abs(random_tokens(cfg, 3, tokens=per_backend(backend, 200, 40)))  # never chosen
    w = MoEWeights(cfg, **{**w.arrays(), "router": router})
    layer = make_layer(cfg, w, backend)
    _, saved, routing = layer(x, save_for_backward=True, return_routing=True)
    assert not np.isin(routing.experts, [2, 7]).any()
    dy = upstream(cfg, x.shape[0], 3)
    acc = MoEGradients.zeros(cfg)
    for g in acc.arrays().values():
        g[...] = 5.0
    dx, grads = layer.backward(dy, saved, retain=True)
    for name in grads.names[1:]:
        assert not getattr(grads, name)[[2, 7]].any(), name  # exactly zero
        assert np.abs(getattr(grads, name)[[0, 1]]).max() > 0, name
    # Accumulating leaves them untouched.
    layer.backward(dy, saved, grads_out=acc, accumulate=True)
    for name in grads.names[1:]:
        assert (getattr(acc, name)[[2, 7]] == 5.0).all(), name


def test_repeated_steps_reuse_slots_and_are_bitwise_repeatable(backend):
    cfg = MoEConfig(**SHAPES["bf16-capacity"])
    layer, w = layer_for(cfg, backend)
    t = per_backend(backend, 200, 40)
    x = random_tokens(cfg, 8, tokens=t)
    dy = upstream(cfg, t, 8)
    runs = []
    for _ in range(per_backend(backend, 4, 2)):
        _, saved = layer(x, save_for_backward=True)
        runs.append(layer.backward(dy, saved))
    assert layer._saved_pool.slots == 1  # one slot, reused
    first_dx, first = runs[0]
    for dx, grads in runs[1:]:
        assert np.array_equal(dx.view(np.uint16), first_dx.view(np.uint16))
        for name in first.names:
            assert np.array_equal(getattr(grads, name).view(np.uint32),
                                  getattr(first, name).view(np.uint32)), name
    # A different batch in between changes nothing about the next one.
    x2 = random_tokens(cfg, 9, tokens=t)
    _, s2 = layer(x2, save_for_backward=True)
    layer.backward(upstream(cfg, t, 9), s2)
    _, saved = layer(x, save_for_backward=True)
    dx, grads = layer.backward(dy, saved)
    assert np.array_equal(dx.view(np.uint16), first_dx.view(np.uint16))


def test_accumulate_retain_and_recompute(backend):
    cfg = MoEConfig(**SHAPES["bf16-capacity"])
    layer, w = layer_for(cfg, backend)
    t = per_backend(backend, 200, 32)
    xs = [random_tokens(cfg, s, tokens=t) for s in (20, 21)]
    dys = [upstream(cfg, t, s) for s in (20, 21)]
    singles = []
    for x, dy in zip(xs, dys):
        _, saved = layer(x, save_for_backward=True)
        singles.append(layer.backward(dy, saved))
    # Two saved forwards alive at once (two slots), gradients added into one buffer.
    saved = [layer(x, save_for_backward=True)[1] for x in xs]
    acc = MoEGradients.zeros(cfg)
    out = layer.backward(dys[0], saved[0], grads_out=acc)[1]
    assert out is acc
    layer.backward(dys[1], saved[1], grads_out=acc, accumulate=True)
    for name in acc.names:  # the kernel's read-modify-write is one float32 add
        want = getattr(singles[0][1], name) + getattr(singles[1][1], name)
        assert np.array_equal(getattr(acc, name), want), name
    # retain: a second backward on one record gives the same bits.
    _, saved = layer(xs[0], save_for_backward=True)
    a = layer.backward(dys[0], saved, retain=True)
    b = layer.backward(dys[0], saved)
    assert np.array_equal(a[0].view(np.uint16), b[0].view(np.uint16))
    assert saved.released
    # recompute: only x and the routing kept; the backward reruns the forward first.
    y_full = layer(xs[0])
    y, light = layer(xs[0], save_for_backward=True, recompute=True)
    assert light.recompute and light.nbytes < layer.saved_bytes()
    assert np.array_equal(y.view(np.uint16), y_full.view(np.uint16))
    dx, grads = layer.backward(dys[0], light)
    assert np.array_equal(dx.view(np.uint16), singles[0][0].view(np.uint16))
    for name in grads.names:
        assert np.array_equal(getattr(grads, name), getattr(singles[0][1], name)), name


def test_misuse_is_a_clear_error(backend):
    cfg = MoEConfig(**SHAPES["bf16-capacity"])
    layer, w = layer_for(cfg, backend)
    t = 24
    x = random_tokens(cfg, 30, tokens=t)
    dy = upstream(cfg, t, 30)
    _, saved = layer(x, save_for_backward=True)
    with pytest.raises(ValueError, match=r"dy has shape \(23, 192\); expected \(24, 192\)"):
        layer.backward(dy[:23], saved)
    with pytest.raises(ValueError, match="dy has dtype float32; expected bfloat16"):
        layer.backward(dy.astype(np.float32), saved)
    with pytest.raises(TypeError, match="SavedForBackward"):
        layer.backward(dy, None)
    with pytest.raises(ValueError, match="accumulate=True adds into grads_out"):
        layer.backward(dy, saved, accumulate=True)
    bad = MoEGradients.zeros(cfg)
    bad.w1 = bad.w1[:, :8]
    with pytest.raises(ValueError, match=r"grads_out.w1 has shape"):
        layer.backward(dy, saved, grads_out=bad)
    other, _ = layer_for(cfg, backend, seed=1)
    with pytest.raises(ValueError, match="another layer"):
        other.backward(dy, saved)
    with pytest.raises(ValueError, match="recompute=True is an option"):
        layer(x, recompute=True)
    layer.backward(dy, saved)
    with pytest.raises(ValueError, match="already consumed.*retain=True"):
        layer.backward(dy, saved)
    # New weights: the old activations no longer match them.
    _, saved = layer(x, save_for_backward=True)
    layer.set_weights(w)
    with pytest.raises(ValueError, match="weights changed"):
        layer.backward(dy, saved)
    assert isinstance(saved, SavedForBackward) and "live" in repr(saved)


def test_timeout_in_the_backward_names_its_phase(backend):
    cfg = MoEConfig(**SHAPES["bf16-capacity"])
    w = MoEWeights.random(cfg, 0)
    layer = make_layer(cfg, w, backend, timeout_s=per_backend(backend, 0.2, 1.0))
    x = random_tokens(cfg, 4, tokens=32)
    dy = upstream(cfg, 32, 4)
    _, saved = layer(x, save_for_backward=True)
    layer.testing.inject_backward_delay(per_backend(backend, 1.0, 3.0))
    with pytest.raises(FlashMoETimeout, match="backward's grid barrier") as exc:
        layer.backward(dy, saved)
    rec = exc.value.record
    assert rec["phase"] == 12 and rec["code_name"] == "timeout", rec  # after the tokens pass
    # Recovered; the record was not consumed by the failed call.
    layer.testing.inject_backward_delay(0)
    ref_dx, _ = moe_backward(cfg, w, x, dy, layer(x, save_for_backward=True,
                                                   return_routing=True)[2])
    dx, _ = layer.backward(dy, saved)
    assert rel_err(dx, ref_dx) <= BACKWARD_TOLERANCE[cfg.dtype]
    assert layer.testing.state()["barrier"] == 0


def test_saved_bytes_per_token_table():
    cfg = MoEConfig(tokens=16384, hidden=2048, ffn=2048, experts=64, top_k=2, dtype="bfloat16")
    # x (4 KiB) + routing (16 B per slot) + per slot z, y_expert and a (2 KiB each).
    assert saved_bytes_per_token(cfg) == 2 * 2048 + 2 * 16 + 2 * 3 * 2 * 2048
    assert saved_bytes_per_token(cfg, recompute=True) == 2 * 2048 + 2 * 16
    gated = cfg.replace(mlp="gated")
    assert saved_bytes_per_token(gated) == 2 * 2048 + 2 * 16 + 2 * 4 * 2 * 2048


# ---------------------------------------------------------------- GPU-only API
@pytest.mark.gpu
def test_cupy_backward_is_stream_ordered_and_equals_numpy():
    cfg = MoEConfig(tokens=256, hidden=128, ffn=256, experts=8, top_k=2, dtype="float16")
    layer, w = layer_for(cfg, "gpu")
    cupy = pytest.importorskip("cupy")
    from cuda.core import Device

    x_np = random_tokens(cfg, 1)
    dy_np = upstream(cfg, cfg.tokens, 1)
    _, saved = layer(x_np, save_for_backward=True)
    want_dx, want = layer.backward(dy_np, saved)
    stream = Device(layer.device.device_id).create_stream()
    x, dy = cupy.asarray(x_np), cupy.asarray(dy_np)
    y, saved = layer(x, save_for_backward=True, stream=stream)
    x.fill(0)  # the slot kept its own copy of x
    dx, grads = layer.backward(dy, saved, stream=stream)
    stream.sync()
    assert isinstance(dx, cupy.ndarray) and isinstance(grads.w1, cupy.ndarray)
    assert np.array_equal(cupy.asnumpy(dx), want_dx)
    for name in want.names:
        assert np.array_equal(cupy.asnumpy(getattr(grads, name)), getattr(want, name)), name
    # Accumulating into CuPy buffers, stream-ordered.
    acc = MoEGradients(cfg.mlp, range(cfg.experts),
                       **{n: cupy.zeros(a.shape, cupy.float32) for n, a in want.arrays().items()})
    for _ in range(2):
        _, saved = layer(cupy.asarray(x_np), save_for_backward=True, stream=stream)
        layer.backward(dy, saved, grads_out=acc, accumulate=True, stream=stream)
    stream.sync()
    for name in want.names:
        assert np.array_equal(cupy.asnumpy(getattr(acc, name)), 2 * getattr(want, name)), name


@pytest.mark.emulator
def test_random_schedules_lazy_copies_and_stalls_change_no_bit():
    # Missing barriers, early reads of cp.async data or ordering that depends on which
    # block runs first would change results (or hang) under these perturbations.
    from flashmoe_core.emulator import EmulatorOptions

    cfg = MoEConfig(**SHAPES["fp16-gated-gelu-k4"])
    layer, w = layer_for(cfg, "emulator")
    x = random_tokens(cfg, 40, tokens=40)
    dy = upstream(cfg, 40, 40)
    _, saved = layer(x, save_for_backward=True)
    want_dx, want = layer.backward(dy, saved, retain=True)
    try:
        layer.options = EmulatorOptions(seed=13, lazy_cp_async=True, chaos=80, chaos_us=200)
        dx, grads = layer.backward(dy, saved)
    finally:
        layer.options = EmulatorOptions()
    assert np.array_equal(dx.view(np.uint16), want_dx.view(np.uint16))
    for name in want.names:
        assert np.array_equal(getattr(grads, name), getattr(want, name)), name
