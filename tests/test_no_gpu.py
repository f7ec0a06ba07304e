"""Without a GPU every GPU path raises one clear error (never a loader traceback)."""

import pytest

import flashmoe_core
from conftest import HAS_GPU

pytestmark = pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")


def test_cuda_available_is_false():
    assert flashmoe_core.cuda_available() is False


def test_get_device_raises_one_clear_error():
    from flashmoe_core.host.device import get_device

    with pytest.raises(flashmoe_core.CudaUnavailableError) as exc:
        get_device()
    msg = str(exc.value)
    assert "needs an NVIDIA GPU" in msg and "reference backend" in msg
    assert exc.value.__cause__ is None or "DynamicLib" not in type(exc.value.__cause__).__name__


def test_ops_raise_the_same_error():
    import numpy as np

    from flashmoe_core.gpu import ops

    ops.runtime.cache_clear()
    with pytest.raises(flashmoe_core.CudaUnavailableError):
        ops.tile_gemm(np.zeros((8, 8), np.float32), np.zeros((8, 8), np.float32), "float32")
