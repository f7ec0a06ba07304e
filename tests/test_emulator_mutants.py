"""The memory-ordering mutation suite: one-line bugs of the kinds persistent GPU kernels
fail with, each seeded into a copy of the device sources, each of which the emulator's
checked mode (weak memory, race detection, preemption) must report.

On a GPU these are silent wrong results or hangs that no test there is expected to
catch; the unchecked emulator (sequentially consistent, stores in order, threads
switching only at barriers) passes every one of them.
"""

import concurrent.futures
import dataclasses
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from flashmoe_core import MoEConfig, MoEWeights, random_tokens
from flashmoe_core.kernel import jit
from flashmoe_core.emulator import (EmulatedMoELayer, EmulatorError, EmulatorOptions, nvshmem_ping,
                                    ring_test, tile_gemm)
from flashmoe_core.host import emulator as host_emu
from flashmoe_core.host.toolchain import find_toolchain
from flashmoe_core.kernel.specs import moe_spec, nvshmem_ping_spec, ring_test_spec, tile_gemm_spec

pytestmark = pytest.mark.emulator

FUSED = "include/flashmoe/moe/fused.cuh"
SYNC = "include/flashmoe/sync.cuh"
GEMM = "include/flashmoe/gemm/tile_gemm.cuh"
# Two up tiles per row tile: the block that completes a row tile's counter is then often
# not the one that wrote a slice (the one whose missing release fence matters).
CFG = MoEConfig(tokens=64, hidden=128, ffn=256, experts=8, top_k=2)


@dataclasses.dataclass(frozen=True)
class Mutant:
    kind: str      # the kind of bug (test id)
    file: str      # under device/
    old: str       # the line(s) as they are ...
    new: str       # ... and as the bug has them
    runner: str    # fused, ring, gemm, gemm90 (the wgmma mainloop) or ping
    report: str    # what the emulator's report must say (regex)
    also: tuple = ()  # further (file, old, new) edits of the same bug


MUTANTS = [
    Mutant("missing-release-fence-before-counter", FUSED,
           "    if (threadIdx.x == 0) {\n      __threadfence();\n"
           "      if (atomicAdd(&L.dep_rowtile[rt], 1u)",
           "    if (threadIdx.x == 0) {\n      if (atomicAdd(&L.dep_rowtile[rt], 1u)",
           "fused", r"data race on global memory \(read-after-write\) at 'z'"),
    # The up task's release fence and the ring's own fence both gone: nothing orders a
    # row tile's results before its down tasks (not even the completing block's own).
    Mutant("no-fence-between-results-and-publication", FUSED,
           "    if (threadIdx.x == 0) {\n      __threadfence();\n"
           "      if (atomicAdd(&L.dep_rowtile[rt], 1u)",
           "    if (threadIdx.x == 0) {\n      if (atomicAdd(&L.dep_rowtile[rt], 1u)",
           "fused", r"data race on global memory \(read-after-write\) at '(z|y_expert)'",
           also=((SYNC, "Desc desc, const WaitSite& site) const {\n    __threadfence();\n",
                  "Desc desc, const WaitSite& site) const {\n"),)),
    Mutant("plain-load-in-acquire-spin", SYNC,
           "[&] { return load_volatile(&state[abi::kBarrier]) >= target; }",
           "[&] { return state[abi::kBarrier] >= target; }",
           "ring", r"(cacheable load|data race).*'state'"),
    Mutant("missing-syncthreads-before-shared-reuse", "kernels/ring_test.cu",
           "    const long long task = s_task;\n    __syncthreads();\n",
           "    const long long task = s_task;\n",
           # Thread 0 overwrites the task word while others still read it; when it
           # races far enough ahead, the block meets at two barriers (a GPU hang).
           "ring", r"shared-memory race .* on __shared__ .*s_task|meet at different barriers"),
    Mutant("missing-barrier-between-staging-and-epilogue", GEMM,
           "      staged = stage_acc(acc, smem);\n    }\n    __syncthreads();\n    return staged;",
           "      staged = stage_acc(acc, smem);\n    }\n    return staged;",
           "gemm", r"shared-memory race \(read-after-write\) on __shared__ smem"),
    Mutant("non-atomic-shared-counter", FUSED,
           "atomicAdd(&s_kept, kept_here);", "s_kept += kept_here;",
           "fused", r"shared-memory race .* on __shared__ .*s_kept"),
    Mutant("block-scope-fence-where-device-scope-is-needed", FUSED,
           "    __threadfence();  // release (after the block barrier)",
           "    __threadfence_block();  // release (after the block barrier)",
           "fused", r"data race on global memory \(read-after-write\) at 'y_expert'"),
    Mutant("cacheable-load-of-another-blocks-data", FUSED,
           "const int row = load_cg(&L.token_rows[t * C::K + j]);",
           "const int row = L.token_rows[t * C::K + j];",
           "fused", r"cacheable load \(ld\.global\.ca\) at fused\.cuh:\d+ .* of 'token_rows'"),
    Mutant("missing-nvshmem-fence-between-put-and-signal", "kernels/nvshmem_ping.cu",
           "  nvshmem_fence();\n", "",
           "ping", r"data race on global memory .* at 'heap'.*nvshmem_ping\.cu:\d+"),
    Mutant("missing-acquire-fence-after-observing", SYNC,
           "    if (!ok) return -1;\n    __threadfence();", "    if (!ok) return -1;",
           "fused", r"data race on global memory \(read-after-write\) at '(z|y_expert)'"),
    # The block that completes a token tile's column combines it at once: without the
    # acquire fence its reads of the other blocks' result rows are unordered.
    Mutant("missing-acquire-before-inline-combine", FUSED,
           "          __threadfence();  // acquire: the other blocks' rows of this tile\n", "",
           "fused", r"data race on global memory \(read-after-write\) at 'y_expert'"),
    Mutant("missing-barrier-before-pipeline-refill", GEMM,
           "          cp_async_wait<kStages - 2>();\n          __syncthreads();\n        }",
           "          cp_async_wait<kStages - 2>();\n        }",
           "gemm", r"shared-memory race .* on __shared__ smem .*tile_gemm\.cuh:\d+"),
    # The wgmma mainloop: the landed cp.async stage (generic proxy) read by wgmma (async
    # proxy) with no proxy fence between; on a GPU, stale operand bytes now and then.
    Mutant("missing-proxy-fence-before-wgmma", GEMM,
           "      sm90::fence_proxy_async();\n      __syncthreads();  // the stage landed",
           "      __syncthreads();  // the stage landed",
           "gemm90", r"wgmma\.mma_async at \S*sm90\.cuh:\d+ reads .* wrote through the generic "
           r"proxy at \S*tile_gemm\.cuh:\d+.* and issued no fence\.proxy\.async"),
]

# Not a bug: the annotation of the intended race (the progress stamp reads state words
# other blocks zero with plain stores). Without it the detector reports that race.
UNANNOTATED = Mutant("benign-race-annotation-removed", "include/flashmoe/wait.cuh",
                     '  FMOE_BENIGN_RACE("progress stamp: any recent value of the state words");\n',
                     "", "ring", r"strong \(volatile or atomic\) load at wait\.cuh:\d+")
MUTANTS.append(UNANNOTATED)

SPECS = {"fused": moe_spec(CFG), "ring": ring_test_spec(), "gemm": tile_gemm_spec("bfloat16"),
         "gemm90": jit.with_mainloop(tile_gemm_spec("bfloat16"), "sm90"),
         "ping": nvshmem_ping_spec()}


def make_mutant(root: Path, m: Mutant) -> Path:
    dst = root / m.kind / "device"
    shutil.copytree(find_toolchain().device_root, dst)
    for file, old, new in ((m.file, m.old, m.new),) + m.also:
        path = dst / file
        text = path.read_text()
        assert text.count(old) == 1, f"the mutation site is gone from {file}: {old!r}"
        path.write_text(text.replace(old, new))
    return dst


@pytest.fixture(scope="module")
def mutant_dirs(tmp_path_factory):
    """Every mutant's device tree, its checked library compiled (two at a time)."""
    root = tmp_path_factory.mktemp("mutants")
    dirs = {m.kind: make_mutant(root, m) for m in MUTANTS}
    compiler = host_emu.find_compiler()

    def build(m: Mutant):
        host_emu.build_library(SPECS[m.runner], find_toolchain(str(dirs[m.kind])), compiler,
                               cache=jit.kernel_cache(), checked=True)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        list(pool.map(build, MUTANTS))
    return dirs


def run(runner: str, seed: int) -> None:
    """One launch (two for the fused kernel) of a runner's kernel, all checks on; a
    result that differs from NumPy counts as caught too (but the report is asserted)."""
    opts = EmulatorOptions.strict(seed)
    if runner == "fused":
        w = MoEWeights.random(CFG, 0)
        layer = EmulatedMoELayer(CFG, w, grid=4, timeout_s=20, options=opts)
        x = random_tokens(CFG, 1)
        for _ in range(2):
            layer(x)
    elif runner == "ring":
        state, ring, seen = (np.zeros(16, np.uint32), np.zeros(4000, np.uint64),
                             np.zeros(4800, np.uint32))
        ring_test(state, ring, seen, 800, 5, grid=4, timeout_s=20, options=opts)
    elif runner in ("gemm", "gemm90"):
        rng = np.random.default_rng(seed)
        a = rng.standard_normal((130, 200)).astype(np.float32)
        b = rng.standard_normal((72, 200)).astype(np.float32)
        with pytest.MonkeyPatch.context() as mp:  # gemm90: the sm_90a (wgmma) mainloop
            mp.setenv("FLASHMOE_EMULATOR_MAINLOOP", "sm90" if runner == "gemm90" else "sm80")
            tile_gemm(a, b, "bfloat16", options=opts)
    else:
        nvshmem_ping(2, count=64, epoch=3, options=opts)


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.kind for m in MUTANTS])
def test_seeded_memory_ordering_bug_is_reported(mutant, mutant_dirs, monkeypatch):
    monkeypatch.setenv("FLASHMOE_DEVICE_DIR", str(mutant_dirs[mutant.kind]))
    # A missing fence shows only when another block reads in the window it opens; the
    # emulator widens that window, and more seeds make a miss unlikely.
    # (About half the seeds show the up task's missing release fence: this layer's row
    # tiles are half tiles, whose short up tasks leave a short window.)
    caught = None
    for seed in range(1, 9):
        try:
            run(mutant.runner, seed)
        except EmulatorError as exc:
            caught = str(exc)
            break
    assert caught is not None, f"{mutant.kind}: not reported under seeds 1-8"
    assert re.search(mutant.report, caught, re.S), caught
    # Both sides of the report are source lines of the device code.
    assert len(re.findall(r"\w+\.(?:cuh|cu):\d+", caught)) >= 2, caught


def test_ordering_mutants_pass_the_unchecked_emulator(mutant_dirs, monkeypatch):
    """Why the checks exist: without them, ordering bugs go unseen (barrier bugs the
    unchecked emulator catches already, as a divergence or in the results)."""
    by_kind = {m.kind: m for m in MUTANTS}
    monkeypatch.setenv("FLASHMOE_DEVICE_DIR", str(mutant_dirs["plain-load-in-acquire-spin"]))
    state, ring, seen = (np.zeros(16, np.uint32), np.zeros(4000, np.uint64),
                         np.zeros(4800, np.uint32))
    assert ring_test(state, ring, seen, 800, 5, grid=4, timeout_s=20)["code"] == 0
    assert (seen == 1).all()
    kind = "missing-nvshmem-fence-between-put-and-signal"
    assert by_kind[kind].runner == "ping"
    monkeypatch.setenv("FLASHMOE_DEVICE_DIR", str(mutant_dirs[kind]))
    got, records = nvshmem_ping(2, count=64, epoch=3)
    assert [r["code"] for r in records] == [0, 0]
    assert got[1].tolist() == list(range(64)) and got[0].tolist() == [1000 + i for i in range(64)]


def test_weak_memory_alone_shows_a_missing_release_fence_in_the_results(mutant_dirs,
                                                                          monkeypatch):
    """The store buffers by themselves (no race detector): a consumer reads the old bytes
    of rows whose producer published without a fence, and the output is wrong."""
    from flashmoe_core.cli.gpu_run import TOLERANCE, compare

    monkeypatch.setenv("FLASHMOE_DEVICE_DIR",
                       str(mutant_dirs["no-fence-between-results-and-publication"]))
    w = MoEWeights.random(CFG, 0)
    layer = EmulatedMoELayer(CFG, w, grid=4, timeout_s=20, options=EmulatorOptions(weak=True))
    errors = []
    for launch in range(4):  # fresh tokens each time: the stale rows are the last launch's
        layer.options = EmulatorOptions(weak=True, seed=launch + 1)
        x = random_tokens(CFG, 10 + launch)
        y, routing = layer(x, return_routing=True)
        errors.append(compare(CFG, w, x, y, routing)["rel_error"])
    assert max(errors) > TOLERANCE[CFG.dtype], errors
