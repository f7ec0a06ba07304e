import ml_dtypes
import numpy as np
import pytest

from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.oracle.reference import moe_forward


def cfg(**kw):
    return MoEConfig(**{**dict(tokens=32, hidden=16, ffn=24, experts=5), **kw})


@pytest.mark.parametrize("mlp,names", [("vanilla", ("router", "w1", "b1", "w2", "b2")),
                                       ("gated", ("router", "wg", "wu", "w2"))])
def test_shapes_and_names(mlp, names):
    c = cfg(mlp=mlp)
    w = MoEWeights.random(c, 3)
    assert w.names == names
    for n, shape in MoEWeights.expected_shapes(c).items():
        assert getattr(w, n).shape == shape
        assert getattr(w, n).dtype == ml_dtypes.bfloat16


def test_random_is_deterministic_and_seeded():
    c = cfg()
    a, b, d = MoEWeights.random(c, 7), MoEWeights.random(c, 7), MoEWeights.random(c, 8)
    for n in a.names:
        assert np.array_equal(getattr(a, n), getattr(b, n))
    assert not np.array_equal(a.w1, d.w1)


def test_subset_equals_full():
    c = cfg(world_size=2)
    full = MoEWeights.random(c, 1)
    part = MoEWeights.random(c, 1, expert_ids=c.local_experts(1))
    assert part.expert_ids == (3, 4)
    assert np.array_equal(part.w2, full.w2[3:5]) and np.array_equal(part.router, full.router)
    assert np.array_equal(full.subset([4, 3]).b1, full.b1[3:5])
    with pytest.raises(KeyError, match="expert 0 is not held"):
        part.local_index(0)


@pytest.mark.parametrize("dtype", ["float32", "tfloat32", "bfloat16", "float16"])
def test_outputs_are_order_one(dtype):
    c = cfg(tokens=256, hidden=64, ffn=128, experts=8, dtype=dtype)
    y, _ = moe_forward(c, MoEWeights.random(c, 0), random_tokens(c, 0))
    rms = float(np.sqrt(np.mean(y.astype(np.float32) ** 2)))
    assert 0.2 < rms < 5.0


def test_tfloat32_arrays_hold_tf32_values():
    w = MoEWeights.random(cfg(dtype="tfloat32"), 0)
    assert w.w1.dtype == np.float32
    assert (w.w1.view(np.uint32) & 0x1FFF == 0).all()


def test_construction_checks():
    c = cfg()
    arrays = MoEWeights.random(c, 0).arrays()
    bad = dict(arrays, w1=arrays["w1"][:, :, :-1])
    with pytest.raises(ValueError, match=r"weight 'w1' has shape \(5, 16, 23\), expected \(5, 16, 24\)"):
        MoEWeights(c, **bad)
    f32 = {k: v.astype(np.float32) for k, v in arrays.items()}
    with pytest.raises(ValueError, match="dtype float32, expected bfloat16.*cast=True"):
        MoEWeights(c, **f32)
    w = MoEWeights(c, cast=True, **f32)
    assert np.array_equal(w.w2, arrays["w2"])
    with pytest.raises(ValueError, match=r"missing weight\(s\) \['b2'\]"):
        MoEWeights(c, **{k: v for k, v in arrays.items() if k != "b2"})
    with pytest.raises(ValueError, match=r"unexpected weight\(s\) \['wg'\]"):
        MoEWeights(c, wg=arrays["w1"], **arrays)
    with pytest.raises(TypeError):
        MoEWeights("config", **arrays)
    with pytest.raises(ValueError, match="expert_ids"):
        MoEWeights(c, expert_ids=[1, 0], **arrays)


def test_random_tokens_per_rank():
    c = cfg(world_size=2)
    a, b = random_tokens(c, 0, rank=0), random_tokens(c, 0, rank=1)
    assert a.shape == (32, 16) and not np.array_equal(a, b)
    assert np.array_equal(a, random_tokens(c, 0, rank=0))
    assert random_tokens(c, 0, tokens=5).shape == (5, 16)


def test_seeds_and_counts_take_numpy_integers_and_reject_negatives():
    c = cfg()
    a = MoEWeights.random(c, np.int64(7))
    assert np.array_equal(a.w1, MoEWeights.random(c, 7).w1)
    assert np.array_equal(random_tokens(c, np.uint8(3), tokens=np.int64(4), rank=np.int32(0)),
                          random_tokens(c, 3, tokens=4))
    with pytest.raises(ValueError, match="seed=-1 must be an integer >= 0"):
        MoEWeights.random(c, -1)
    with pytest.raises(ValueError, match="seed=1.5"):
        random_tokens(c, 1.5)
    with pytest.raises(ValueError, match="tokens=0 must be an integer >= 1"):
        random_tokens(c, 0, tokens=0)


def _entry_points():
    """Every public function and layer that takes (cfg, weights), as callables."""
    from flashmoe_core.oracle.distributed import moe_forward_distributed
    from flashmoe_core.emulator import EmulatedExpertParallel
    from flashmoe_core.kernel.ep import simulate
    from flashmoe_core.gpu.layer import MoELayer
    from flashmoe_core.oracle.reference import expert_ffn, gate, moe_backward

    def x_of(c):
        return random_tokens(c, 0, tokens=4)

    return {
        "moe_forward": lambda c, w: moe_forward(c, w, x_of(c)),
        "gate": lambda c, w: gate(c, w, x_of(c)),
        "expert_ffn": lambda c, w: expert_ffn(c, w, 0, x_of(c)),
        "moe_backward": lambda c, w: moe_backward(c, w, x_of(c), np.ones((4, c.hidden))),
        "moe_forward_distributed": lambda c, w: moe_forward_distributed(c, w, x_of(c)),
        "simulate": lambda c, w: simulate(c.replace(world_size=2), w, [x_of(c)] * 2),
        "MoELayer": lambda c, w: MoELayer(c, w),
        "MoELayer-emulator": lambda c, w: MoELayer(c, w, backend="emulator"),
        "EmulatedExpertParallel": lambda c, w: EmulatedExpertParallel(
            c.replace(world_size=2), w),
    }


@pytest.mark.parametrize("entry", list(_entry_points()))
@pytest.mark.parametrize("change,field", [
    (dict(experts=8), "experts"), (dict(dtype="float16"), "dtype"),
    (dict(dtype="tfloat32"), "dtype"), (dict(hidden=24), "hidden"), (dict(ffn=16), "ffn"),
    (dict(mlp="gated"), "mlp")])
def test_every_entry_point_rejects_weights_of_another_config(entry, change, field):
    # Weights of 16 experts with an 8-expert config used to route to expert ids up to 15.
    base = cfg(experts=16 if field == "experts" else 5)
    w = MoEWeights.random(base, 0)
    with pytest.raises(ValueError, match=f"built for MoEConfig.{field}="):
        _entry_points()[entry](base.replace(**change), w)


def test_weights_serve_configs_that_differ_in_other_fields():
    c = cfg()
    w = MoEWeights.random(c, 0)
    other = c.replace(tokens=8, top_k=3, activation="gelu", capacity_factor=1.0)
    y, _ = moe_forward(other, w, random_tokens(other, 0))
    assert y.shape == (8, c.hidden)


def test_replaced_arrays_are_caught_by_name():
    c = cfg()
    w = MoEWeights.random(c, 0)
    w.w2 = w.w2.astype(np.float32)
    with pytest.raises(ValueError, match=r"weights.w2 is \(5, 24, 16\) float32, but this config "
                                         r"needs \(5, 24, 16\) bfloat16"):
        moe_forward(c, w, random_tokens(c, 0))
    w = MoEWeights.random(c, 0)
    w.router = w.router[:, :3]
    with pytest.raises(ValueError, match="weights.router is"):
        moe_forward(c, w, random_tokens(c, 0))
    with pytest.raises(TypeError, match="weights must be MoEWeights"):
        moe_forward(c, w.arrays(), random_tokens(c, 0))
