"""The warp-specialised sm_90a mainloop on the CPU emulator (kernels/ws_gemm_test.cu): a
producer warp fills the stages (A rows gathered by cp.async with an mbarrier arrive-on,
B rows by cp.async or TMA), the consumer warpgroup multiplies on wgmma and frees each
stage on an empty barrier, tiles go to the producer as jobs on a third barrier. Checked
against NumPy, and seeded protocol bugs must be reported."""

import numpy as np
import pytest

from conftest import emulator_checks, seed_mutant
from flashmoe_core.emulator import EmulatorError, EmulatorOptions, ws_gemm_test
from flashmoe_core.host.abi import PHASES
from flashmoe_core.numerics import round_to

pytestmark = pytest.mark.emulator

GEMM = "include/flashmoe/gemm/tile_gemm.cuh"


def operands(dtype, rows, n, k, m=None, seed=0):
    """a [rows, K], b [N, K] rounded to dtype, and a gather of m rows of a."""
    rng = np.random.default_rng(seed)
    a = round_to(rng.standard_normal((rows, k)).astype(np.float32), dtype)
    b = round_to(rng.standard_normal((n, k)).astype(np.float32), dtype)
    idx = None if m is None else rng.permutation(rows)[:m].astype(np.int32)
    return a, b, idx


def reference(a, b, idx):
    a64 = a.astype(np.float64)[idx if idx is not None else slice(None)]
    return a64 @ b.astype(np.float64).T


def check(c, want):
    assert not np.isnan(c).any()
    assert np.abs(c - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("tma", [False, True], ids=["b-cp.async", "b-tma"])
def test_warp_specialised_gemm_matches_numpy(tma):
    # 200 gathered rows: a full and a 72-row tile; 3 x 2 tiles on 2 blocks, so each
    # producer takes 3 jobs and 5 k-tiles a job run 4 stages round more than once. K =
    # 312 ends inside a vector span: the tail of the last k-tile loads as zeros.
    a, b, idx = operands("bfloat16", 300, 256, 312, m=200)
    c, fault = ws_gemm_test(a, b, idx, tma=tma, options=emulator_checks())
    assert fault["code"] == 0
    check(c, reference(a, b, idx))


def test_half_tiles_and_other_shapes():
    # float16; 190 rows: the second m-tile (62 rows) is a half tile (only its first 64
    # rows are loaded and multiplied); N = 200 ends inside a tile; one block takes all.
    a, b, _ = operands("float16", 190, 200, 128, seed=1)
    c, fault = ws_gemm_test(a, b, None, grid=1, options=EmulatorOptions(seed=4))
    assert fault["code"] == 0
    check(c, reference(a, b, None))


def test_six_stages_of_64_byte_spans():
    # The sm_90a fused tile: BK = 32 (64-byte spans, 64-byte swizzle on both the cp.async
    # A rows and the TMA B boxes) in 6 stages. 190 gathered rows: the second m-tile is a
    # half tile; K = 296 is 9.25 k-tiles, so the stages wrap and the tail is zeros.
    a, b, idx = operands("bfloat16", 256, 256, 296, m=190, seed=2)
    c, fault = ws_gemm_test(a, b, idx, tma=True, stages=6, bk=32, options=emulator_checks(3))
    assert fault["code"] == 0
    check(c, reference(a, b, idx))


# ------------------------------------------------------------------ seeded bugs
def _mutant(tmp_path, monkeypatch, *edits):
    seed_mutant(tmp_path, monkeypatch, GEMM, *edits)


def _small():
    return operands("bfloat16", 256, 128, 512, m=256, seed=2)


def test_a_stage_freed_before_its_wgmmas_retired_is_reported(tmp_path, monkeypatch):
    # The consumers free the stage they are about to read: the producer refills it
    # while the wgmmas on it are in flight.
    _mutant(tmp_path, monkeypatch,
            "      sm90::fence_proxy_async();\n      wgmma_k_tile<kHalves>(acc, gA, gB, da0, db0, "
            "int(stage));\n",
            "      sm90::fence_proxy_async();\n      sm90::mbarrier_arrive(&ws->empty[stage]);\n"
            "      wgmma_k_tile<kHalves>(acc, gA, gB, da0, db0, int(stage));\n",
            "      if (prev >= 0) sm90::mbarrier_arrive(&ws->empty[prev]);\n", "",
            "    if (prev >= 0 && landed) sm90::mbarrier_arrive(&ws->empty[prev]);\n    named_sync(",
            "    named_sync(")
    with pytest.raises(EmulatorError, match="was written before the wait_group"):
        for seed in (1, 2, 3):
            ws_gemm_test(*_small(), tma=True, grid=1, options=EmulatorOptions(seed=seed))


def test_a_producer_that_does_not_wait_for_a_free_stage_is_reported(tmp_path, monkeypatch):
    _mutant(tmp_path, monkeypatch,
            "        if (!wait_barrier(&ws->empty[stage], phase, site.timeout_ns, &ws->gone)) {",
            "        if (false) {")
    with pytest.raises(EmulatorError, match="was written before the wait_group|every arrival|never waited for|lands after the phase"):
        for seed in (1, 2, 3):
            ws_gemm_test(*_small(), tma=True, grid=1, options=EmulatorOptions(seed=seed))


def test_a_full_barrier_counting_too_few_arrivals_is_reported(tmp_path, monkeypatch):
    # Lane 0's own arrival left out of the count: the phase completes one arrival early,
    # before the last lane's copies landed.
    _mutant(tmp_path, monkeypatch, "kFullArrivals = 33;", "kFullArrivals = 32;")
    with pytest.raises(EmulatorError, match="lands after the phase it was issued in"):
        ws_gemm_test(*_small(), grid=1, options=EmulatorOptions(seed=1))


def test_consumers_that_do_not_fence_the_producers_rows_are_reported(tmp_path, monkeypatch):
    # cp.async writes are the generic proxy's: a wgmma reading them needs a proxy fence
    # after the barrier that handed them over (checked builds).
    _mutant(tmp_path, monkeypatch,
            "      sm90::fence_proxy_async();\n      wgmma_k_tile<kHalves>(",
            "      wgmma_k_tile<kHalves>(")
    with pytest.raises(EmulatorError, match="issued no fence.proxy.async"):
        ws_gemm_test(*_small(), grid=1, options=emulator_checks())


def test_a_job_posted_before_every_row_was_written_is_a_race(tmp_path, monkeypatch):
    # Without the consumers' named barrier, thread 0 posts the job while others still
    # write their rows of the table the producer reads: the happens-before order of
    # named barriers and mbarrier phases finds it (checked builds).
    _mutant(tmp_path, monkeypatch,
            "    sm90::fence_proxy_async();\n    named_sync(kConsumerBarrier, kThreads);\n"
            "    const bool full",
            "    sm90::fence_proxy_async();\n    const bool full")
    with pytest.raises(EmulatorError, match="shared-memory race"):
        ws_gemm_test(*_small(), grid=1, options=emulator_checks())


def test_a_stage_that_never_fills_times_out_with_the_producer_named(tmp_path, monkeypatch):
    # The producer stops after its first job: the consumers' next tile waits for a
    # stage nobody fills, gives up and the fault names the TMA wait; the producer's
    # own waits are bounded as well (kPhaseStageFree when the consumers never post).
    _mutant(tmp_path, monkeypatch, "      if (j.quit) return true;",
            "      if (j.quit || tiles > 0) return true;")
    a, b, idx = _small()
    c, fault = ws_gemm_test(a, np.concatenate([b, b]), idx, grid=1, timeout_s=0.5,
                            options=EmulatorOptions(seed=1))
    assert fault["code_name"] == "timeout"
    assert PHASES[fault["phase"]] == "TMA load of a weight tile"
    assert fault["task"] == 1  # the block's second tile


@pytest.mark.compile
def test_the_sm90a_build_keeps_the_consumer_loop_on_hgmma_without_local_memory(tmp_path):
    from flashmoe_core.host import sass
    from flashmoe_core.host.cache import KernelCache
    from flashmoe_core.host.compiler import build
    from flashmoe_core.host.toolchain import find_toolchain
    from flashmoe_core.kernel.specs import ws_gemm_test_spec

    k = build(ws_gemm_test_spec("bfloat16", 4), "sm_90a", find_toolchain(),
              cache=KernelCache(tmp_path))
    ins = sass.disassemble(k.cubin)["flashmoe_ws_gemm_test"]
    ops = [i.opcode.split(".")[0] for i in ins]
    assert "ARRIVES" in ops  # the producer's cp.async.mbarrier.arrive
    assert ops.count("UTMALDG") >= 1 and "LDGSTS" in ops
    assert not {"LDL", "STL"} & set(ops)  # no local memory anywhere in the kernel
    res = sass.resources(k.cubin)["flashmoe_ws_gemm_test"]
    assert res.stack == 0 and res.local == 0
    loops = sass.mma_loops(ins)
    # The consumer's k-loops: a full tile's 8 wgmmas and a half tile's 4 per k-tile,
    # nothing spilled, no loads issued (the producer's job).
    assert sorted(l.kinds["mma"] for l in loops) == [4, 8]
    for loop in loops:
        assert loop.kinds["spill"] == 0 and loop.kinds["gmem->smem"] == 0
