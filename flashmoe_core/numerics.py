"""Element types and the rounding rules shared by the oracle and the GPU layer.

The storage types are float32, tfloat32 (float32 containers holding TF32 values),
bfloat16 (``ml_dtypes.bfloat16``, the type JAX uses) and float16.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np

__all__ = ["storage_dtype", "round_to", "round_tf32", "as_f32", "itemsize", "erf", "erfc",
           "activation", "activation_grad", "nonfinite_to_nan", "first_nonfinite",
           "check_finite"]

_STORAGE = {
    "float32": np.dtype(np.float32),
    "tfloat32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def storage_dtype(dtype: str) -> np.dtype:
    """NumPy dtype that stores values of the named element type."""
    try:
        return _STORAGE[dtype]
    except KeyError:
        raise ValueError(f"unknown element type {dtype!r}; known: {sorted(_STORAGE)}") from None


def itemsize(dtype: str) -> int:
    """Bytes per element of the named element type."""
    return storage_dtype(dtype).itemsize


def round_tf32(x: np.ndarray) -> np.ndarray:
    """Round float32 values to TF32 (10-bit mantissa), half away from zero.

    This is the rounding of the GPU's ``cvt.rna.tf32.f32``, which the kernel uses to
    feed tensor cores. Infinities and NaNs pass through.
    """
    a = np.ascontiguousarray(x, dtype=np.float32)
    bits = a.view(np.uint32)
    finite = (bits & 0x7F800000) != 0x7F800000
    # Adding half an ulp to the magnitude bits and truncating rounds half away from
    # zero; a carry into the exponent is the correct result.
    rounded = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).astype(np.uint32)
    return np.where(finite, rounded, bits).view(np.float32).reshape(a.shape)


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round to the named element type; returns an array of its storage dtype."""
    if dtype == "tfloat32":
        return round_tf32(np.asarray(x, dtype=np.float32))
    target = storage_dtype(dtype)
    a = np.asarray(x)
    if a.dtype == np.float64 and target != np.float32:
        # Round once: float64 -> float32 -> 16-bit could round twice.
        a = a.astype(np.float32)
    return a.astype(target)


def as_f32(x: np.ndarray) -> np.ndarray:
    """Exact widening of any storage type to float32."""
    return np.asarray(x).astype(np.float32)


# ---------------------------------------------------------------------------- non-finite
def nonfinite_to_nan(a: np.ndarray) -> np.ndarray:
    """``a`` with every infinity replaced by NaN (``a`` itself when all are finite).

    Weights go through this wherever they are multiplied (the oracle, and the layers'
    upload): an infinite weight times a zero is NaN in one summation and an infinity
    in another (the 3xTF32 split of float32 turns infinities into NaN), so NaN is the
    value every backend can agree on (reference.py, rule 11).
    """
    a = np.asarray(a)
    bad = ~np.isfinite(a)
    if not bad.any():
        return a
    out = a.copy()
    out[bad] = np.nan
    return out


def first_nonfinite(a: np.ndarray):
    """(index, value) of the first NaN or infinity of ``a`` in C order, or None."""
    a = np.asarray(a)
    finite = np.isfinite(a)
    if finite.all():
        return None
    flat = int(np.argmin(finite.reshape(-1)))
    index = tuple(int(i) for i in np.unravel_index(flat, a.shape))
    return index, float(np.asarray(a[index]).astype(np.float32))


def check_finite(name: str, a: np.ndarray) -> None:
    """Raise ValueError naming ``name`` and its first non-finite element, if it has one."""
    bad = first_nonfinite(a)
    if bad is not None:
        index, value = bad
        count = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        raise ValueError(f"{name}[{', '.join(map(str, index))}] is {value} ({count} non-finite "
                         f"value(s) in {name}); check_finite=True refuses them before the "
                         "launch. Without it, the layer follows the oracle's non-finite policy "
                         "(flashmoe_core.oracle.reference, rules 10-12)")


# ---------------------------------------------------------------------------- activations
_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _erf_series(ax: np.ndarray) -> np.ndarray:
    """erf for 0 <= ax < 2: 2/sqrt(pi) exp(-x^2) sum_n 2^n x^(2n+1) / (2n+1)!! (no
    cancellation: every term is positive)."""
    x2 = ax * ax
    term = ax.copy()
    total = ax.copy()
    for n in range(1, 40):  # x^2 < 4: the 40th term is below 1e-20 of the sum
        term *= 2.0 * x2 / (2 * n + 1)
        total += term
    return _TWO_OVER_SQRT_PI * np.exp(-x2) * total


def _erfc_fraction(ax: np.ndarray) -> np.ndarray:
    """erfc for ax >= 2 by its continued fraction (accurate to a few ulp, relative)."""
    t = ax.copy()
    for n in range(120, 0, -1):
        t = ax + (0.5 * n) / t
    return np.exp(-ax * ax) / (math.sqrt(math.pi) * t)


def erfc(x: np.ndarray) -> np.ndarray:
    """Complementary error function in float64, accurate in relative terms for x > 0."""
    x = np.asarray(x, dtype=np.float64)
    ax = np.abs(x)
    small = ax < 2.0
    out = np.empty_like(ax)
    out[small] = 1.0 - _erf_series(ax[small])
    out[~small] = _erfc_fraction(ax[~small])
    return np.where(x < 0, 2.0 - out, out)


def erf(x: np.ndarray) -> np.ndarray:
    """Error function in float64, accurate to a few ulp (NumPy has none built in)."""
    x = np.asarray(x, dtype=np.float64)
    ax = np.abs(x)
    small = ax < 2.0
    out = np.empty_like(ax)
    out[small] = _erf_series(ax[small])
    out[~small] = 1.0 - _erfc_fraction(ax[~small])
    return np.copysign(out, x)


def activation(name: str, x: np.ndarray) -> np.ndarray:
    """Apply an activation to float32 input; computed in float64, returned as float32."""
    a = np.asarray(x, dtype=np.float64)
    if name == "relu":
        out = np.maximum(a, 0.0)
    elif name == "gelu":
        # 0.5 x (1 + erf(x / sqrt 2)), written with erfc so that it stays accurate
        # where 1 + erf cancels (large negative x).
        out = 0.5 * a * erfc(-a / math.sqrt(2.0))
    elif name == "silu":
        out = a / (1.0 + np.exp(-a))
    else:
        raise ValueError(f"unknown activation {name!r}; known: relu, gelu, silu")
    return out.astype(np.float32)


def gated(cfg, g: np.ndarray, u: np.ndarray) -> np.ndarray:
    """The gated MLP's ``act(g) * u`` (or the clamped SwiGLU) on float32 input, computed
    in float64 and returned as float32."""
    if cfg.activation != "swiglu_clamped":
        return activation(cfg.activation, g) * np.asarray(u, np.float32)
    lim = cfg.swiglu_limit
    g64 = np.minimum(np.asarray(g, np.float64), lim)
    u64 = np.clip(np.asarray(u, np.float64), -lim, lim)
    with np.errstate(over="ignore"):
        out = g64 / (1.0 + np.exp(-cfg.swiglu_alpha * g64)) * (u64 + 1.0)
    return out.astype(np.float32)


def activation_grad(name: str, x: np.ndarray) -> np.ndarray:
    """Derivative of an activation at float64 input ``x``, in float64."""
    a = np.asarray(x, dtype=np.float64)
    if name == "relu":
        return (a > 0).astype(np.float64)
    if name == "gelu":
        cdf = 0.5 * erfc(-a / math.sqrt(2.0))
        pdf = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
        return cdf + a * pdf
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-a))
        return s * (1.0 + a * (1.0 - s))
    raise ValueError(f"unknown activation {name!r}; known: relu, gelu, silu")
