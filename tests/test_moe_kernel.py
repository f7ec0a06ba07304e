"""The fused kernel, whole and component by component, against the oracle.

Every test runs on the GPU (marker ``gpu``) and on the CPU emulator (``emulator``):
the same device source, the emulator at token counts a CPU gets through, with all its
checks on (weak memory, races, preemption, lazy cp.async; conftest.emulator_checks),
a different schedule seed per layer.
"""

import numpy as np
import pytest

from conftest import emulator_checks, per_backend
from flashmoe_core import FlashMoETimeout, MoEConfig, MoEWeights, random_tokens
from flashmoe_core.cli.gpu_run import TOLERANCE, compare
from flashmoe_core.oracle.reference import dispatch_lists, gate, route

_layers = {}


def make_layer(cfg, w, backend, **kw):
    from flashmoe_core.gpu.layer import MoELayer

    if backend == "emulator":
        kw.setdefault("emulator_options", emulator_checks(seed=1 + len(_layers) % 5))
    return MoELayer(cfg, w, backend=backend, **kw)


def layer_for(cfg, backend, seed=0):
    """Layers are cached per config and backend (each new config compiles a kernel)."""
    key = (cfg, seed, backend)
    if key not in _layers:
        w = MoEWeights.random(cfg, seed)
        _layers[key] = (make_layer(cfg, w, backend), w)
    return _layers[key]


def check_whole(cfg, backend, tokens=None, seed=0, x=None):
    layer, w = layer_for(cfg, backend, seed)
    x = random_tokens(cfg, seed + 1, tokens=tokens) if x is None else x
    y, routing = layer(x, return_routing=True)
    res = compare(cfg, w, x, y, routing)
    assert res["rel_error"] <= TOLERANCE[cfg.dtype], res
    assert res["routing_agreement"] >= 0.999 or res["max_prob_gap_at_mismatch"] < 1e-5, res
    return y, routing, res


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "tfloat32", "float32"])
def test_whole_kernel_each_dtype(dtype, backend):
    tokens = per_backend(backend, 512, 160)
    check_whole(MoEConfig(tokens=tokens, hidden=256, ffn=512, experts=16, top_k=2, dtype=dtype),
                backend)


AWKWARD = {
    "partial": dict(tokens=333, hidden=256, ffn=384, experts=8, top_k=2),
    "idle-experts": dict(tokens=10, hidden=128, ffn=256, experts=64, top_k=1),
    "odd-gated": dict(tokens=256, hidden=1000, ffn=1032, experts=7, top_k=7, mlp="gated",
                      activation="silu"),
    "e256-k8": dict(tokens=300, hidden=256, ffn=256, experts=256, top_k=8, activation="gelu"),
    "capacity": dict(tokens=200, hidden=192, ffn=320, experts=12, top_k=3, capacity_factor=0.5),
    "one-token": dict(tokens=1, hidden=64, ffn=64, experts=4, top_k=2, renormalize=False),
}
# The emulator's token counts where the GPU's would take minutes on a CPU.
EMULATOR_TOKENS = {"odd-gated": 40, "e256-k8": 96}


@pytest.mark.parametrize("name", list(AWKWARD))
def test_whole_kernel_awkward_shapes(name, backend):
    kw = dict(AWKWARD[name])
    kw["tokens"] = per_backend(backend, kw["tokens"], EMULATOR_TOKENS.get(name, kw["tokens"]))
    y, routing, _ = check_whole(MoEConfig(dtype="bfloat16", **kw), backend)
    if "capacity_factor" in kw:
        assert not routing.kept.all()


def test_all_tokens_on_one_expert(backend):
    cfg = MoEConfig(tokens=per_backend(backend, 400, 200), hidden=128, ffn=256, experts=8,
                    top_k=1, dtype="float32")
    w = MoEWeights.random(cfg, 3)
    w.router[:, 5] = 0.0
    x = random_tokens(cfg, 4)
    x[:, 0] = np.abs(x[:, 0]) + 4.0
    w.router[0, 5] = 20.0  # expert 5 wins for every token
    layer = make_layer(cfg, w, backend)
    y, routing = layer(x, return_routing=True)
    assert (routing.experts[:, 0] == 5).all()
    res = compare(cfg, w, x, y, routing)
    assert res["rel_error"] <= TOLERANCE["float32"], res


def test_token_count_changes_without_recompiling(backend):
    cfg = MoEConfig(tokens=512, hidden=128, ffn=128, experts=8, top_k=2)
    layer, w = layer_for(cfg, backend)
    for t in (512, 7, 129, 256):
        x = random_tokens(cfg, t, tokens=t)
        y, routing = layer(x, return_routing=True)
        assert y.shape == (t, 128)
        assert compare(cfg, w, x, y, routing)["rel_error"] <= TOLERANCE["bfloat16"]


def test_deterministic_across_launches(backend):
    cfg = MoEConfig(tokens=per_backend(backend, 512, 256), hidden=256, ffn=256, experts=16,
                    top_k=4)
    layer, _ = layer_for(cfg, backend)
    x = random_tokens(cfg, 9)
    first = layer(x)
    for _ in range(per_backend(backend, 5, 2)):
        assert np.array_equal(layer(x).view(np.uint16), first.view(np.uint16))
    launches = per_backend(backend, 6, 3)
    assert layer.testing.state()["epoch"] >= launches and layer.testing.state()["barrier"] == 0


@pytest.mark.emulator
def test_checked_mode_reports_nothing_on_the_correct_kernel_across_seeds():
    """No false reports: every block runs on its own OS thread, so a check that reads
    the model's state before the load it judges sees writes land in between; this
    configuration (many blocks crediting each tile) showed such reports in about one
    launch in ten before strong reads were judged after their load."""
    from flashmoe_core.emulator import EmulatorError, EmulatorOptions

    cfg = MoEConfig(tokens=256, hidden=256, ffn=256, experts=16, top_k=4)
    layer, w = layer_for(cfg, "emulator")
    x = random_tokens(cfg, 9)
    reports, before = [], layer.options
    try:
        for seed in range(1, 17):
            layer.options = EmulatorOptions.strict(seed)
            try:
                y, routing = layer(x, return_routing=True)
            except EmulatorError as exc:
                reports.append(f"seed {seed}: {exc}")
                continue
            assert compare(cfg, w, x, y, routing)["rel_error"] <= TOLERANCE["bfloat16"]
    finally:
        layer.options = before  # the layer is shared with the other tests of this config
    assert not reports, "\n".join(reports)


# ---------------------------------------------------------------- components
def test_gate_and_topk_component(backend):
    cfg = MoEConfig(tokens=300, hidden=256, ffn=128, experts=40, top_k=3, dtype="float32")
    layer, w = layer_for(cfg, backend)
    x = random_tokens(cfg, 2)
    layer.testing.run_mode(x, "gate_only")
    experts = layer.testing.workspace("topk_expert", (300, 3), np.int32)
    weights = layer.testing.workspace("topk_weight", (300, 3), np.float32)
    _, probs = gate(cfg, w, x)
    ref = route(cfg, probs)
    agree = experts == ref.experts
    assert agree.mean() >= 0.999
    assert np.allclose(weights[agree], ref.weights[agree], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("cf", [None, 0.75])
def test_dispatch_lists_component(cf, backend):
    cfg = MoEConfig(tokens=333, hidden=128, ffn=128, experts=12, top_k=2, capacity_factor=cf)
    layer, _ = layer_for(cfg, backend)
    x = random_tokens(cfg, 5)
    layer.testing.run_mode(x, "dispatch_only")
    t, k = 333, 2
    experts = layer.testing.workspace("topk_expert", (t, k), np.int32)
    rows = layer.testing.workspace("token_rows", (t, k), np.int32)
    kept_gpu = rows >= 0
    from flashmoe_core.oracle.reference import Routing, _capacity_mask

    kept = np.ones((t, k), bool) if cf is None else _capacity_mask(experts, cfg.capacity(t))
    assert np.array_equal(kept_gpu, kept)
    lists = dispatch_lists(cfg, Routing(experts, np.zeros((t, k), np.float32), kept))
    n_rows = int(kept.sum())
    row_token = layer.testing.workspace("row_token", (n_rows,), np.int32)
    expect_rows = np.full((t, k), -1, np.int32)
    offset = 0
    for tok, slot in lists:
        expect_rows[tok, slot] = offset + np.arange(tok.size)
        assert np.array_equal(row_token[offset:offset + tok.size], tok)
        offset += tok.size
    assert np.array_equal(rows, expect_rows)


def test_combine_component(backend):
    from flashmoe_core.oracle.reference import Routing, combine
    from flashmoe_core.numerics import round_to

    cfg = MoEConfig(tokens=200, hidden=264, ffn=64, experts=4, top_k=3)
    layer, _ = layer_for(cfg, backend)
    rng = np.random.default_rng(0)
    t, k, h = 200, 3, 264
    rows = rng.permutation(t * k).astype(np.int32).reshape(t, k)
    rows[rng.random((t, k)) < 0.2] = -1
    weights = rng.random((t, k)).astype(np.float32)
    y_expert = round_to(rng.standard_normal((t * k, h)).astype(np.float32), "bfloat16")
    layer.testing.fill_workspace("token_rows", rows)
    layer.testing.fill_workspace("topk_weight", weights)
    layer.testing.fill_workspace("y_expert", y_expert)
    y = layer.testing.combine_only(t)
    gathered = np.zeros((t, k, h), y_expert.dtype)
    gathered[rows >= 0] = y_expert[rows[rows >= 0]]
    want = combine(cfg, Routing(np.zeros((t, k), np.int32), weights, rows >= 0), gathered)
    err = np.abs(y.astype(np.float64) - want.astype(np.float64)).max()
    assert err <= 2 ** -7 * np.abs(want.astype(np.float64)).max()


def _ring_launch_gpu():
    from flashmoe_core.gpu import ops
    from flashmoe_core.host import launch as L
    from flashmoe_core.host import memory
    from flashmoe_core.host.abi import FAULT_RECORD, decode_fault
    from flashmoe_core.kernel.jit import compile_kernel, target_arch
    from flashmoe_core.kernel.specs import ring_test_spec

    dev, stream = ops.runtime()
    mod = L.Module(compile_kernel(ring_test_spec(), target_arch(dev)).cubin, "ring_test")
    kern = mod.kernel("flashmoe_ring_test")
    grid, _ = L.resident_grid(kern, dev, 128, 0)
    state, ring, seen = (memory.alloc(dev, n, stream) for n in (64, 15000 * 8, 18000 * 4))
    record = memory.PinnedArray(FAULT_RECORD)
    for buf in (state, ring, seen):
        memory.zero(buf, stream)

    def launch(seeds, fanout):
        memory.zero(seen, stream)
        args = (np.uint64(int(state.handle)), np.uint64(int(ring.handle)),
                np.int32(seeds * fanout), np.uint64(int(seen.handle)), np.int32(seeds),
                np.int32(fanout), np.uint64(record.ptr), np.uint64(10 ** 10))
        L.launch_kernel(stream, kern, (grid, 1, 1), (128, 1, 1), args)
        counts = memory.download(seen, (seeds * (1 + fanout),), np.uint32, stream)
        return (decode_fault(record.array.tobytes()), counts,
                memory.download(state, (16,), np.uint32, stream))
    return launch


def _ring_launch_emulator(options):
    from flashmoe_core import emulator

    state, ring, seen = np.zeros(16, np.uint32), np.zeros(15000, np.uint64), \
        np.zeros(18000, np.uint32)

    def launch(seeds, fanout):
        seen[:] = 0
        fault = emulator.ring_test(state, ring, seen, seeds, fanout, grid=8, options=options)
        return fault, seen[:seeds * (1 + fanout)].copy(), state.copy()
    return launch


def _check_ring(launch):
    seeds, fanout = 3000, 5
    for i in range(3):  # epochs advance; the ring is never cleared
        fault, counts, words = launch(seeds, fanout)
        assert fault["code"] == 0
        assert (counts == 1).all(), (i, np.unique(counts, return_counts=True))
        assert words[0] == i + 1 and words[1] == 0 and words[2] == 0


def test_task_ring_protocol_under_contention(backend):
    launch = _ring_launch_gpu() if backend == "gpu" else _ring_launch_emulator(emulator_checks(3))
    _check_ring(launch)


@pytest.mark.emulator
def test_task_ring_protocol_under_random_warp_schedules():
    from flashmoe_core.emulator import EmulatorOptions

    # Unchecked, round-robin-free: the protocol on its own, at the emulator's full speed.
    _check_ring(_ring_launch_emulator(EmulatorOptions(seed=7)))


# ---------------------------------------------------------------- API
def test_bad_inputs_are_rejected_before_launch(backend):
    cfg = MoEConfig(tokens=64, hidden=128, ffn=128, experts=4)
    layer, _ = layer_for(cfg, backend)
    x = random_tokens(cfg, 0)
    with pytest.raises(ValueError, match="1..64"):
        layer(np.concatenate([x, x]))
    with pytest.raises(ValueError, match="expected \\[tokens, hidden=128\\]"):
        layer(x[:, :64].copy())
    with pytest.raises(ValueError, match="dtype float32"):
        layer(x.astype(np.float32))
    with pytest.raises(TypeError, match="NumPy array"):
        layer([[1.0] * 128])
    assert layer.testing.state()["barrier"] == 0


def test_timeout_becomes_an_exception_with_the_record(backend):
    # Block 0 is held back before its first grid barrier ten times longer than the
    # timeout: every other block arrives, then waits without progress. Which wait times
    # out, and what it saw, does not depend on timing. (On the emulator, one token tile:
    # block 0's is the only gate work, the others only zero counters before arriving.)
    cfg = MoEConfig(tokens=per_backend(backend, 4096, 128), hidden=256, ffn=256, experts=8)
    w = MoEWeights.random(cfg, 0)
    layer = make_layer(cfg, w, backend, timeout_s=0.25)
    layer.testing.inject_delay(2.5)
    with pytest.raises(FlashMoETimeout) as exc:
        layer(random_tokens(cfg, 0))
    rec = exc.value.record
    # E = 8 fits one gate tile: top-k runs in the gate, the first barrier follows it.
    assert rec["code_name"] == "timeout" and rec["phase"] == 2, rec
    assert rec["block"] != 0 and rec["expected"] == rec["counter"] + 1, rec
    assert rec["elapsed_ns"] >= 0.25e9, rec
    layer.testing.inject_delay(0.0)
    # Recovered: counters cleared, the epoch moved past the failed launch's.
    assert layer.testing.state()["epoch"] == 1 and layer.testing.state()["barrier"] == 0


# ---------------------------------------------------------------- GPU-only API
@pytest.mark.gpu
def test_cupy_zero_copy_and_graph_capture():
    cfg = MoEConfig(tokens=256, hidden=128, ffn=256, experts=8, top_k=2, dtype="float16")
    layer, w = layer_for(cfg, "gpu")  # first, so kernel listings see it without CuPy
    cupy = pytest.importorskip("cupy")
    from cuda.core import Device

    x_np = random_tokens(cfg, 1)
    x = cupy.asarray(x_np)
    y = layer(x)
    assert isinstance(y, cupy.ndarray) and y.dtype == np.float16
    assert np.array_equal(cupy.asnumpy(y), layer(x_np))
    out = cupy.empty_like(x)
    stream = Device(layer.device.device_id).create_stream()
    gb = stream.create_graph_builder()
    gb.begin_building()
    layer(x, out=out, stream=gb)
    graph = gb.end_building().complete()
    for _ in range(3):
        out.fill(0)
        graph.launch(stream)
        stream.sync()
        assert np.array_equal(cupy.asnumpy(out), layer(x_np))


@pytest.mark.gpu
def test_torch_tensor_in_torch_tensor_out():
    cfg = MoEConfig(tokens=128, hidden=128, ffn=128, experts=4, dtype="bfloat16")
    layer, _ = layer_for(cfg, "gpu")
    torch = pytest.importorskip("torch")
    x_np = random_tokens(cfg, 2)
    x = torch.from_numpy(x_np.view(np.int16)).view(torch.bfloat16).cuda()
    y = layer(x)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16 and y.is_cuda
    want = layer(x_np)
    got = y.view(torch.int16).cpu().numpy().view(np.uint16)
    assert np.array_equal(got, want.view(np.uint16))


@pytest.mark.gpu
def test_jax_array_in():
    cfg = MoEConfig(tokens=128, hidden=128, ffn=128, experts=4, dtype="float32")
    layer, _ = layer_for(cfg, "gpu")
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    x_np = random_tokens(cfg, 3)
    x = jax.device_put(jnp.asarray(x_np), jax.devices("gpu")[0])
    y = layer(x)
    assert np.array_equal(np.asarray(y), layer(x_np))


@pytest.mark.gpu
def test_calls_on_two_streams_run_one_after_the_other():
    cfg = MoEConfig(tokens=256, hidden=128, ffn=256, experts=8, top_k=2, dtype="float16")
    layer, _ = layer_for(cfg, "gpu")
    cupy = pytest.importorskip("cupy")
    from cuda.core import Device

    xs = [random_tokens(cfg, s) for s in (11, 12)]
    want = [layer(x) for x in xs]
    dev = Device(layer.device.device_id)
    streams = [dev.create_stream(), dev.create_stream()]
    outs = [cupy.empty_like(cupy.asarray(xs[0])) for _ in xs]
    for _ in range(3):  # the second launch shares the first one's workspace
        for x, out, s in zip(xs, outs, streams):
            layer(cupy.asarray(x), out=out, stream=s)
        for s in streams:
            s.sync()
        for out, w in zip(outs, want):
            assert np.array_equal(cupy.asnumpy(out), w)


@pytest.mark.gpu
def test_result_without_a_stream_is_complete_and_out_may_not_alias_x():
    cfg = MoEConfig(tokens=256, hidden=128, ffn=256, experts=8, top_k=2, dtype="float16")
    layer, _ = layer_for(cfg, "gpu")
    cupy = pytest.importorskip("cupy")
    x_np = random_tokens(cfg, 13)
    x = cupy.asarray(x_np)
    with cupy.cuda.Stream(non_blocking=True):
        y = layer(x)  # read at once on an unrelated stream
        got = cupy.asnumpy(y)
    assert np.array_equal(got, layer(x_np))
    with pytest.raises(ValueError, match="overlaps x"):
        layer(x, out=x)


# ---------------------------------------------------------------- routing rules
RULE_LAYERS = {
    # DeepSeek-V3's router at its real expert count (top-k in its own phase: E > 128).
    "deepseek-v3-e256": dict(experts=256, top_k=8, scoring="sigmoid", selection_bias=True,
                             n_group=8, topk_group=4, routed_scaling=2.5, mlp="gated",
                             activation="silu"),
    "gpt-oss": dict(experts=8, top_k=4, softmax_after_topk=True, router_bias=True,
                    mlp="gated", activation="silu"),
    "bf16-logits": dict(experts=8, top_k=2, router_logits="storage"),
    "sigmoid-groups": dict(experts=32, top_k=4, scoring="sigmoid", n_group=4, topk_group=2,
                           renormalize=False),
    # GPT-OSS's whole block: its router, biased projections and the clamped SwiGLU (a
    # low limit, so that the clamps act on these random weights).
    "gpt-oss-experts": dict(experts=8, top_k=4, softmax_after_topk=True, router_bias=True,
                            router_logits="storage", mlp="gated", activation="swiglu_clamped",
                            mlp_bias=True, swiglu_limit=0.75),
}


@pytest.mark.parametrize("name", list(RULE_LAYERS))
def test_routing_rules_match_the_oracle(name, backend):
    from flashmoe_core.oracle.reference import route_tokens

    cfg = MoEConfig(tokens=per_backend(backend, 512, 48), hidden=128, ffn=128,
                    dtype="bfloat16", **RULE_LAYERS[name])
    y, routing, res = check_whole(cfg, backend)
    layer, w = layer_for(cfg, backend)
    ref = route_tokens(cfg, w, random_tokens(cfg, 1))
    same = routing.experts == ref.experts
    assert same.mean() >= 0.999
    np.testing.assert_allclose(routing.weights[same], ref.weights[same], rtol=1e-5, atol=1e-7)


# The rules above on every other storage type: the router's math is float32 whatever
# the storage type, but its inputs (x, logits rounded to storage) are not.
RULES_PER_DTYPE = {
    "sigmoid": dict(experts=16, top_k=4, scoring="sigmoid", selection_bias=True, n_group=4,
                    topk_group=2, routed_scaling=2.0, router_bias=True),
    "topk-then-softmax": dict(experts=8, top_k=3, softmax_after_topk=True, router_bias=True,
                              router_logits="storage", mlp="gated", activation="gelu"),
}


@pytest.mark.parametrize("dtype,rule", [("float32", "sigmoid"), ("float16", "sigmoid"),
                                        ("tfloat32", "topk-then-softmax")])
def test_routing_rules_on_every_dtype(dtype, rule, backend):
    from flashmoe_core.oracle.reference import route_tokens

    cfg = MoEConfig(tokens=per_backend(backend, 256, 40), hidden=64, ffn=128, dtype=dtype,
                    **RULES_PER_DTYPE[rule])
    y, routing, res = check_whole(cfg, backend)
    layer, w = layer_for(cfg, backend)
    ref = route_tokens(cfg, w, random_tokens(cfg, 1))
    same = routing.experts == ref.experts
    assert same.mean() >= 0.97, same.mean()  # a near-tie may flip one token
    np.testing.assert_allclose(routing.weights[same], ref.weights[same], rtol=1e-5, atol=1e-7)


def test_routing_from_the_caller_replaces_the_router(backend):
    from flashmoe_core.oracle.reference import moe_forward, with_capacity

    cfg = MoEConfig(tokens=per_backend(backend, 300, 70), hidden=128, ffn=128, experts=6,
                    top_k=3, capacity_factor=0.75)
    layer, w = layer_for(cfg, backend)
    x = random_tokens(cfg, 3)
    rng = np.random.default_rng(4)
    experts = rng.integers(0, 6, size=(cfg.tokens, 3))  # repeats within a token allowed
    weights = rng.random((cfg.tokens, 3)).astype(np.float32)
    y, routing = layer(x, return_routing=True, routing=(experts, weights))
    want = with_capacity(cfg, experts.astype(np.int32), weights)
    assert np.array_equal(routing.experts, want.experts)
    assert np.array_equal(routing.weights, want.weights)
    assert np.array_equal(routing.kept, want.kept) and not want.kept.all()
    y_ref, _ = moe_forward(cfg, w, x, want)
    rel = np.linalg.norm(y.astype(np.float64) - y_ref.astype(np.float64)) / \
        np.linalg.norm(y_ref.astype(np.float64))
    assert rel <= TOLERANCE[cfg.dtype]
    # The next call without routing= uses the router again.
    check_whole(cfg, backend, x=x)
    with pytest.raises(ValueError, match="ids in"):
        layer(x, routing=(experts + 6, weights))
