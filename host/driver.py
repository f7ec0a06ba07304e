"""Checked calls into the CUDA driver bindings (cuda.bindings.driver)."""

from __future__ import annotations

from .errors import FlashMoEError

__all__ = ["check"]


def check(result, what: str):
    """Unpack a driver result tuple ``(CUresult, *values)``, raising on an error.

    Returns None, the single value, or the tuple of values.
    """
    from cuda.bindings import driver

    err, rest = result[0], tuple(result[1:])
    if err != driver.CUresult.CUDA_SUCCESS:
        raise FlashMoEError(f"{what} failed: {err.name}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest
