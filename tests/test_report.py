"""The static report: SASS loops, occupancy arithmetic, the layer's tasks and padding."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from flashmoe_core import MoEConfig
from flashmoe_core.host.sass import Insn, instruction_kind, mma_loops
from flashmoe_core.cli.report import H100, blocks_per_sm, layer_report
from flashmoe_core.kernel.specs import computed_rows


def _prog(lines):
    """Insns from (opcode, pred, target index or None)."""
    return [Insn(16 * i, pred, op, "", -1 if tgt is None else 16 * tgt)
            for i, (op, pred, tgt) in enumerate(lines)]


def test_mainloop_counts_out_of_line_blocks_it_jumps_to_and_back_from():
    prog = _prog([
        ("MOV", "", None),          # 0 entry
        ("BRA", "", 6),             # 1 to the loop head
        ("LDGSTS", "", None),       # 2 out-of-line refill (before the loop, as nvcc puts it)
        ("LDGSTS", "", None),       # 3
        ("IMAD", "", None),         # 4
        ("BRA", "", 8),             # 5 back into the loop
        ("HMMA", "", None),         # 6 loop head
        ("BRA", "@!P0", 2),         # 7 refill when needed
        ("HMMA", "", None),         # 8
        ("BAR", "", None),          # 9
        ("BRA", "@P1", 6),          # 10 back edge
        ("EXIT", "", None),         # 11
    ])
    (loop,) = mma_loops(prog)
    assert loop.kinds["mma"] == 2 and loop.kinds["gmem->smem"] == 2
    assert loop.kinds["barrier"] == 1 and loop.instructions == 9
    assert (loop.start, loop.end) == (16 * 2, 16 * 10)


def test_only_innermost_loops_that_issue_mma_count():
    prog = _prog([
        ("MOV", "", None),      # 0
        ("IADD3", "", None),    # 1 outer loop head
        ("HMMA", "", None),     # 2 inner loop head
        ("BRA", "@P0", 2),      # 3 inner back edge
        ("BRA", "@P1", 1),      # 4 outer back edge (contains the inner loop)
        ("LDS", "", None),      # 5 a loop without mma
        ("BRA", "@P2", 5),      # 6
        ("EXIT", "", None),
    ])
    (loop,) = mma_loops(prog)
    assert loop.instructions == 2 and loop.kinds["mma"] == 1


def test_instruction_kinds():
    assert instruction_kind("HGMMA.64x128x16.F32.BF16") == "mma"
    assert instruction_kind("UTMALDG.2D") == "gmem->smem"
    assert instruction_kind("STL.64") == "spill" and instruction_kind("LDSM.16.M88.4") == "ldsm"
    assert instruction_kind("FFMA") == "other"


def test_blocks_per_sm_follow_registers_and_shared_memory():
    # The fused kernel at the benchmark shape: 255 registers, ~101 KB of shared memory.
    occ = blocks_per_sm(255, 101132 + 2176)
    assert occ["blocks"] == 2 and occ["registers"] == 2 and occ["shared_memory"] == 2
    assert blocks_per_sm(128, 48 * 1024)["blocks"] == 4  # 64K registers / (128 * 128)
    assert blocks_per_sm(32, 0)["blocks"] == H100["max_warps_per_sm"] // 4


def test_layer_report_counts_tiles_padding_and_tasks():
    cfg = MoEConfig(tokens=1000, hidden=256, ffn=512, experts=4, top_k=2)
    rep = layer_report(cfg, counts=np.array([128, 129, 1, 1742]))
    assert rep["assignments"] == 2000
    assert rep["row_tiles"] == 1 + 2 + 1 + 14 and rep["row_tiles_if_unpadded"] == 16
    # Tails of 1 and 1742 - 13 * 128 = 78 rows: the 1-row tails are half tiles, 78 not.
    assert rep["padded_rows_whole_tiles"] == 18 * 128 - 2000
    assert rep["padded_rows"] == 18 * 128 - 2 * 64 - 2000
    # One GPU: the combine runs in the down epilogue, as no task of its own.
    assert rep["tasks"] == {"gate": 8, "up": 18 * 4, "down": 18 * 2, "combine": 0}
    assert rep["flops"] == cfg.flops(1000, kept=2000) and rep["bound"] in ("compute", "memory")


def test_half_tail_tiles_halve_the_benchmark_routings_padding():
    rep = layer_report(MoEConfig(tokens=16384, hidden=2048, ffn=2048, experts=64, top_k=2))
    assert rep["assignments"] == 32768 and 10 < rep["padding_percent_whole_tiles"] < 16
    assert rep["padding_percent"] < 0.6 * rep["padding_percent_whole_tiles"]


def test_computed_rows_of_an_expert():
    assert [computed_rows(n) for n in (0, 1, 64, 65, 128, 129, 192, 193)] == \
        [0, 64, 64, 128, 128, 192, 192, 256]
    assert [computed_rows(n, half=False) for n in (1, 64, 129)] == [128, 128, 256]


def _small_report(arch, *extra):
    """The command line's JSON report of a small layer's fused kernel for ``arch``."""
    p = subprocess.run([sys.executable, "-m", "flashmoe_core.build", "--arch", arch,
                        "--report", "--json", "--tokens", "256", "--hidden", "128", "--ffn",
                        "256", "--experts", "8", *extra], capture_output=True, text=True,
                       cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stderr
    (rep,) = json.loads(p.stdout)
    return rep


@pytest.mark.compile
def test_report_of_a_real_sm90a_build(tmp_cache):
    rep = _small_report("sm_90a", "--training")
    k = rep["kernel"]
    assert 0 < k["registers"] <= 255 and k["dynamic_smem"] > 64 * 1024
    assert k["mainloops"], "no tensor-core loop found in the fused kernel"
    for loop in k["mainloops"]:
        # Hopper: the wgmma mainloop. A bf16 128x128x32 k-tile (the sm_90a tile) is 2 k16
        # steps of two m64n128 halves, from one warpgroup; a half tile's loop has the
        # first halves.
        assert loop["mma_opcodes"] in ({"HGMMA": 4}, {"HGMMA": 2}), loop
        assert loop["kinds"]["spill"] == 0, loop  # no local memory in the mainloop
        # One wait per k-tile: ptxas did not serialise the wgmmas (it waits after each
        # when, say, one sits under a branch inside the loop).
        assert loop["wgmma_waits"] == 1, loop
        assert sum(loop["kinds"].values()) == loop["instructions_per_k_tile"]
    assert {loop["mma_opcodes"]["HGMMA"] for loop in k["mainloops"]} == {2, 4}
    assert rep["layer"]["tasks"]["combine"] == 0  # folded into the down epilogue
    # --training: the backward kernel too (one warpgroup of 128 threads, wgmma loops).
    b = rep["backward"]
    assert b["kernel"] == "flashmoe_moe_backward" and b["threads"] == 128
    assert b["spill_instructions"] == {"LDL": 0, "STL": 0} and b["mainloops"]
    assert all("HGMMA" in loop["mma_opcodes"] and loop["kinds"]["spill"] == 0
               for loop in b["mainloops"]), b["mainloops"]


@pytest.mark.compile
def test_the_sm80_build_keeps_mma_sync(tmp_cache):
    rep = _small_report("sm_80")
    loops = rep["kernel"]["mainloops"]
    # 4 warps of m16n8k16 over a 128x128x64 k-tile: 128 HMMA per warp per k-tile; a
    # half tile's loop, 64.
    assert loops and all(loop["mma_opcodes"] in ({"HMMA": 128}, {"HMMA": 64})
                         for loop in loops), loops
    assert {loop["mma_opcodes"]["HMMA"] for loop in loops} == {64, 128}
    assert all(loop["kinds"]["spill"] == 0 for loop in loops), loops
