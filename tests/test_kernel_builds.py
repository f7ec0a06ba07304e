"""The background cache warming of the test sessions (tests/kernel_builds.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kernel_builds
from flashmoe_core import MoEConfig
from flashmoe_core.kernel.jit import with_mainloop
from flashmoe_core.kernel.specs import moe_backward_spec, moe_spec, ring_test_spec


def test_fused_specs_are_listed_by_their_configuration_and_made_again():
    cfg = MoEConfig(tokens=40, hidden=128, ffn=256, experts=4, top_k=2, mlp="gated")
    for spec, fn in ((moe_spec(cfg), "moe_spec"), (moe_backward_spec(cfg), "moe_backward_spec"),
                     (with_mainloop(moe_spec(cfg), "sm90"), "moe_spec")):
        entry = json.loads(json.dumps(kernel_builds._derive(spec)))
        assert entry["fn"] == fn and "spec" not in entry
        assert kernel_builds._spec(entry) == spec
    # Any other spec is kept as it is.
    entry = json.loads(json.dumps(kernel_builds._derive(ring_test_spec())))
    assert set(entry) == {"spec"} and kernel_builds._spec(entry) == ring_test_spec()


def test_a_seeded_tree_is_listed_as_edits_that_make_the_same_sources_again(tmp_path):
    from flashmoe_core.host.toolchain import device_tree_digest, find_toolchain

    base = find_toolchain().device_root
    mutant = tmp_path / "m" / "device"
    shutil.copytree(base, mutant)
    gemm = mutant / "include/flashmoe/gemm/tile_gemm.cuh"
    text = gemm.read_text()
    # Two edits, one of a line that occurs more than once (context makes it unique).
    assert text.count("    sm90::wgmma_commit();\n") == 1 and text.count("    CUTE_UNROLL\n") > 1
    gemm.write_text(text.replace("    sm90::wgmma_commit();\n", "")
                    .replace("    CUTE_UNROLL\n", "    CUTE_NO_UNROLL\n", 1))
    edits = json.loads(json.dumps(kernel_builds._mutation(base, mutant)))
    assert list(edits) == ["include/flashmoe/gemm/tile_gemm.cuh"] and len(edits[list(edits)[0]]) == 2
    again = tmp_path / "again" / "device"
    assert kernel_builds.seeded_tree(base, again, edits)
    assert device_tree_digest(again) == device_tree_digest(mutant) != device_tree_digest(base)
    # An edit whose old text is gone is not applied.
    stale = {"include/flashmoe/gemm/tile_gemm.cuh": [["no such text", ""]]}
    assert not kernel_builds.seeded_tree(base, tmp_path / "stale" / "device", stale)
    # A tree with a file more is not text edits.
    (mutant / "include/extra.cuh").write_text("x")
    assert kernel_builds._mutation(base, mutant) is None


def test_jobs_follow_the_selected_tests_order_and_skip_the_others():
    entries = [{"test": "a", "kind": "emulator", "n": 1}, {"test": "b", "kind": "cubin", "n": 2},
               {"test": "c", "kind": "emulator", "n": 3}, {"test": "a", "kind": "cubin", "n": 4}]
    assert [e["n"] for e in kernel_builds.jobs(["c", "a"], entries)] == [3, 1, 4]
    assert kernel_builds.jobs(["z"], entries) == []


def test_the_committed_list_makes_valid_specs():
    # A stale entry only costs time, but one that no longer makes a spec would be
    # skipped silently forever: every entry must still make one.
    entries = json.loads(kernel_builds.LIST.read_text())
    assert entries, "tests/kernel_builds.json is empty"
    for e in entries:
        assert e["kind"] in ("emulator", "cubin") and e["cache"] in ("default", "shared"), e
        kernel_builds._spec(e)


@pytest.mark.slow
@pytest.mark.emulator
def test_the_warmer_builds_a_listed_kernel_into_the_cache(tmp_path):
    # One real emulator build by the background process, into a private cache.
    task = tmp_path / "task.json"
    job = {"test": "t", "cache": "default", "kind": "emulator", "checked": False,
           **kernel_builds._derive(ring_test_spec())}
    task.write_text(json.dumps({"caches": {"default": str(tmp_path / "c")}, "jobs": [job]}))
    proc = subprocess.run([sys.executable, str(Path(kernel_builds.__file__)), str(task)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert len(list((tmp_path / "c").rglob("*.so"))) == 1
