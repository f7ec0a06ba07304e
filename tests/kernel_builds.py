"""Warm the kernel caches of a test session in the background.

Most of the suite's time on a CPU machine is compiling: each emulated kernel is a g++
build (10-20 s), each compile test an NVRTC build (10-70 s), one after the other while
the second core idles. ``kernel_builds.json`` lists the builds a whole run makes, in the
order the tests first ask for them, each with the test that asked. At the start of a
session conftest.py hands the entries of the selected tests to background processes
(this file run as a script, one per core), which build them into the same caches; a
test that gets there first builds the kernel itself (the caches' per-entry locks keep
one build of each). Nothing depends on the list being current: a stale entry builds
something no test asks for, a missing one is built by its test as before.

Regenerate the list after changing which kernels the tests build::

    python -m pytest --record-builds tests/kernel_builds.json

Only builds into the session's own caches are listed (the default kernel cache and the
``shared_cache`` fixture's). A fused-kernel entry keeps the layer configuration it came
from, so that the list survives changes to the compile-time constants a configuration
turns into. A build of seeded device sources (a mutant test's copy of device/) keeps its
edits as text replacements, which the warming applies to its own copy: the same sources
make the same cache key wherever they lie; an edit whose old text is gone is passed over.
"""

from __future__ import annotations

import difflib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

LIST = Path(__file__).with_name("kernel_builds.json")

_MOE = ("moe_spec", "moe_backward_spec")
from flashmoe_core.host.toolchain import _DEVICE_SUFFIXES as _SOURCES  # what the digest covers


def _replacements(old: str, new: str) -> Optional[List[List[str]]]:
    """[old, new] text pairs that turn ``old`` into ``new`` applied in order, each old
    text found once (whole changed lines, widened by context lines until unique)."""
    a, b = old.splitlines(keepends=True), new.splitlines(keepends=True)
    out = []
    ops = difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes()
    for tag, i1, i2, j1, j2 in ops:
        if tag == "equal":
            continue
        for k in range(len(a) + 1):  # bounded: the whole file is unique
            lo, hi = max(0, i1 - k), min(len(a), i2 + k)
            o = "".join(a[lo:hi])
            if o and old.count(o) == 1:
                out.append([o, "".join(a[lo:i1] + b[j1:j2] + a[i2:hi])])
                break
        else:
            return None
    return out


def _mutation(base: Path, root: Path) -> Optional[Dict[str, List[List[str]]]]:
    """The edits that make device tree ``root`` from ``base`` (None: not text edits of
    files both have)."""
    files = lambda r: {p.relative_to(r).as_posix() for p in r.rglob("*")  # noqa: E731
                       if p.is_file() and p.suffix in _SOURCES}
    if files(base) != files(root):
        return None
    edits = {}
    for rel in sorted(files(root)):
        x, y = (base / rel).read_text(), (root / rel).read_text()
        if x != y:
            r = _replacements(x, y)
            if r is None:
                return None
            edits[rel] = r
    return edits


def seeded_tree(base: Path, dest: Path, edits: Dict[str, List[List[str]]]) -> bool:
    """Copy device tree ``base`` to ``dest`` with ``edits``; False if one no longer applies."""
    shutil.copytree(base, dest)
    for rel, pairs in edits.items():
        path = dest / rel
        text = path.read_text()
        for o, n in pairs:
            if text.count(o) != 1:
                return False
            text = text.replace(o, n)
        path.write_text(text)
    return True


def _derive(spec) -> dict:
    """How to make ``spec`` again: from its layer configuration where one of the spec
    functions gives exactly it, else the spec itself."""
    from flashmoe_core import MoEConfig
    from flashmoe_core.kernel import specs
    from flashmoe_core.kernel.jit import with_mainloop

    raw = {"spec": spec.to_dict()}
    cfg_json = dict(spec.context).get("config")
    if cfg_json is None:
        return raw
    mainloop = dict(spec.defines).get("FMOE_MAINLOOP")
    for fn in _MOE:
        made = getattr(specs, fn)(MoEConfig.from_json(cfg_json))
        if mainloop is not None:
            made = with_mainloop(made, "sm90" if mainloop == "90" else "sm80")
        if made == spec:
            return {"fn": fn, "config": cfg_json, "mainloop": mainloop}
    return raw


def _spec(entry: dict):
    """The spec of a listed build, made with the code as it is now."""
    from flashmoe_core import MoEConfig
    from flashmoe_core.host.compiler import KernelSpec
    from flashmoe_core.kernel import specs
    from flashmoe_core.kernel.jit import with_mainloop

    if "fn" not in entry:
        return KernelSpec.from_dict(entry["spec"])
    made = getattr(specs, entry["fn"])(MoEConfig.from_json(entry["config"]))
    m = entry.get("mainloop")
    return made if m is None else with_mainloop(made, "sm90" if m == "90" else "sm80")


class Recorder:
    """Lists the builds of a session (``--record-builds``): wraps the two build
    functions, keeps each new build into ``caches`` (name -> folder) with the test
    running at the time."""

    def __init__(self, caches: Dict[str, Path], device_root: Path) -> None:
        self.caches = {k: Path(v).resolve() for k, v in caches.items()}
        self.device_root = Path(device_root).resolve()
        self.test = "<session>"
        self.entries: List[dict] = []
        self._seen = set()

    def _cache_name(self, cache) -> Optional[str]:
        if cache is None:
            return None
        root = Path(cache.root).resolve()
        return next((k for k, v in self.caches.items() if v == root), None)

    def _add(self, entry: dict, toolchain, cache) -> None:
        name = self._cache_name(cache)
        if name is None:
            return  # a private cache: nothing to share
        root = Path(toolchain.device_root).resolve()
        if root != self.device_root:
            edits = _mutation(self.device_root, root)
            if not edits:
                return
            entry = dict(entry, mutant=edits)
        key = json.dumps(entry, sort_keys=True)
        if (name, key) in self._seen:
            return
        self._seen.add((name, key))
        self.entries.append({"test": self.test, "cache": name, **entry})

    def install(self, monkeypatch) -> None:
        from flashmoe_core.host import compiler, emulator
        from flashmoe_core.kernel import jit

        build, build_library = compiler.build, emulator.build_library

        def recorded_build(spec, arch, toolchain, *, cache, lineinfo=False, **kw):
            self._add({"kind": "cubin", "arch": arch, "lineinfo": bool(lineinfo),
                       **_derive(spec)}, toolchain, cache)
            return build(spec, arch, toolchain, cache=cache, lineinfo=lineinfo, **kw)

        def recorded_library(spec, toolchain, compiler_, *, cache, checked=False, **kw):
            self._add({"kind": "emulator", "checked": bool(checked), **_derive(spec)},
                      toolchain, cache)
            return build_library(spec, toolchain, compiler_, cache=cache, checked=checked, **kw)

        for mod in (compiler, jit):
            monkeypatch.setattr(mod, "build", recorded_build)
        monkeypatch.setattr(emulator, "build_library", recorded_library)

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.entries, indent=1) + "\n")


def jobs(selected: List[str], entries: List[dict]) -> List[dict]:
    """The listed builds the selected tests (node ids, in run order) ask for, in that
    order; each build once."""
    rank = {nodeid: i for i, nodeid in enumerate(selected)}
    mine = [e for e in entries if e.get("test") in rank]
    return sorted(mine, key=lambda e: rank[e["test"]])  # stable: first-asked order kept


def _busy(cache, key: str) -> bool:
    """Whether another process holds the entry's lock (a test building it now)."""
    import fcntl
    import os

    p = cache.path(key).with_suffix(".lock")
    if not p.exists():
        return False
    fd = os.open(p, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # (closing drops a lock this process got)
    return False


def warm(job_list: List[dict], caches: Dict[str, str]) -> None:
    """Build every job into its cache, quietly: those already built or being built by a
    test or another worker are passed over (never two builds of one kernel); a build that fails
    is left to its test to report."""
    from flashmoe_core import env
    from flashmoe_core.host import compiler, emulator
    from flashmoe_core.host.cache import KernelCache
    from flashmoe_core.host.toolchain import find_toolchain

    base = find_toolchain(env.device_dir(), env.cutlass_include())
    cxx = None
    for job in job_list:
        tmp = None
        try:
            spec = _spec(job)
            cache = KernelCache(caches[job["cache"]])
            tc = base
            if job.get("mutant"):
                tmp = Path(tempfile.mkdtemp(prefix="flashmoe-warm-"))
                if not seeded_tree(base.device_root, tmp / "device", job["mutant"]):
                    continue
                tc = find_toolchain(str(tmp / "device"), env.cutlass_include())
            if job["kind"] == "emulator":
                cxx = cxx or emulator.find_compiler(env.cxx())
                checked = job["checked"]
                key = emulator.library_key(spec, tc, cxx, checked)
                if cache.file_path(key, ".so").exists() or _busy(cache, key):
                    continue
                emulator.build_library(spec, tc, cxx, cache=cache, checked=checked)
            else:
                key = compiler.cache_key(spec, job["arch"], tc, job["lineinfo"])
                if cache.path(key).exists() or _busy(cache, key):
                    continue
                compiler.build(spec, job["arch"], tc, cache=cache, lineinfo=job["lineinfo"])
        except Exception as exc:  # the test that needs it reports it properly
            print(f"kernel_builds: {job.get('test')}: {type(exc).__name__}: {exc}"[:400],
                  file=sys.stderr, flush=True)
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    import signal

    # python tests/kernel_builds.py JOBS.json [I]: {"caches": {...}, "jobs": [...]}; worker
    # I starts at job I (the workers do not all start with the same build). The session
    # ends it with SIGTERM: leave at once (no next job), temporary folders removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    task = json.loads(Path(sys.argv[1]).read_text())
    first = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    warm(task["jobs"][first:] + task["jobs"][:first], task["caches"])
