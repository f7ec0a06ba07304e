import ml_dtypes
import numpy as np
import pytest

from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.reference import moe_forward


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
