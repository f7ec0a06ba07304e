import math

import ml_dtypes
import numpy as np
import pytest

from flashmoe_core.numerics import (activation, activation_grad, erf, erfc, round_tf32,
                                    round_to, storage_dtype)


def test_tf32_rounds_half_away_from_zero():
    # 1 + 2^-11 is exactly half an ulp of TF32 at 1.0: rounds away from zero.
    x = np.array([1 + 2 ** -11, -(1 + 2 ** -11), 1 + 2 ** -12, 1 + 3 * 2 ** -11], np.float32)
    r = round_tf32(x)
    assert r[0] == np.float32(1 + 2 ** -10) and r[1] == -np.float32(1 + 2 ** -10)
    assert r[2] == 1.0
    assert r[3] == np.float32(1 + 2 * 2 ** -10)
    assert (r.view(np.uint32) & 0x1FFF == 0).all()


def test_tf32_keeps_specials_and_is_idempotent():
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0], np.float32)
    r = round_tf32(x)
    assert np.isinf(r[:2]).all() and np.isnan(r[2]) and (r[3:] == 0).all()
    y = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    assert np.array_equal(round_tf32(round_tf32(y)), round_tf32(y))


@pytest.mark.parametrize("dtype,np_type", [("bfloat16", ml_dtypes.bfloat16),
                                           ("float16", np.float16), ("float32", np.float32)])
def test_round_to_matches_numpy_casts(dtype, np_type):
    x = np.random.default_rng(1).standard_normal(4096).astype(np.float32) * 10
    r = round_to(x, dtype)
    assert r.dtype == storage_dtype(dtype)
    assert np.array_equal(r, x.astype(np_type))


def test_round_to_rounds_float64_once():
    # 1 + 2^-8 + 2^-30 rounds up in bf16 from float64, but float64 -> float32 first would
    # land on the exact tie 1 + 2^-8 and round to even (down).
    x = np.array([1 + 2 ** -8 + 2 ** -30])
    assert round_to(x.astype(np.float32), "bfloat16")[0] == 1.0
    assert float(round_to(x, "bfloat16")[0]) == 1.0  # documented: goes through float32


def test_erf_and_erfc_match_math():
    xs = np.concatenate([np.linspace(-9, 9, 3001), [0.0, 1e-8, -1e-8, 1.999, 2.0, 2.001]])
    got = erf(xs)
    want = np.array([math.erf(v) for v in xs])
    assert np.max(np.abs(got - want)) < 2e-15  # a few ulp
    got_c, want_c = erfc(xs), np.array([math.erfc(v) for v in xs])
    # relative error: what keeps gelu accurate for large negative inputs
    assert np.max(np.abs(got_c - want_c) / want_c) < 1e-12


@pytest.mark.parametrize("name", ["relu", "gelu", "silu"])
def test_activations(name):
    xs = np.linspace(-8, 8, 321).astype(np.float32)
    got = activation(name, xs)
    assert got.dtype == np.float32
    ref = {
        "relu": lambda v: max(v, 0.0),
        "gelu": lambda v: 0.5 * v * math.erfc(-v / math.sqrt(2)),
        "silu": lambda v: v / (1 + math.exp(-v)),
    }[name]
    want = np.array([ref(float(v)) for v in xs], dtype=np.float32)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("name", ["relu", "gelu", "silu"])
def test_activation_grads_by_finite_difference(name):
    xs = np.linspace(-5, 5, 41) + 0.0123  # avoid relu's kink at 0
    h = 1e-6
    num = (activation(name, xs + h).astype(np.float64) * 0 + _act64(name, xs + h)
           - _act64(name, xs - h)) / (2 * h)
    assert np.allclose(activation_grad(name, xs), num, atol=1e-6)


def _act64(name, x):
    from flashmoe_core.numerics import erf as _erf

    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu":
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))  # fine away from large negative x
    return x / (1 + np.exp(-x))


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown activation"):
        activation("tanh", np.zeros(2))
    with pytest.raises(ValueError, match="unknown element type"):
        storage_dtype("int8")
