"""Host-side logic of the GPU layer that needs no GPU: recovery state, co-located
ranks, aliasing, and the collective agreement of expert-parallel ranks."""

from pathlib import Path

import numpy as np
import pytest

from conftest import run_mpi
from flashmoe_core.host.abi import STATE, STATE_WORDS
from flashmoe_core.kernel.contract import overlaps, ranks_sharing, recovery_state

WORKER = str(Path(__file__).with_name("mpi_layer_worker.py"))


def test_recovery_moves_every_pe_past_every_used_epoch():
    words, epoch = recovery_state([3, 7, 5])
    assert epoch == 8 and words.dtype == np.uint32 and words.shape == (STATE_WORDS,)
    assert words[STATE["epoch"]] == 8 and words.sum() == 8  # every counter zero
    for epochs in ([0], [0, 4], [9, 2, 9]):
        # A launch that failed at epoch e left signals tagged e + 1 on peers; the first
        # launch after recovery tags with the new epoch + 1, which none of them carry.
        assert recovery_state(epochs)[1] + 1 > max(epochs) + 1


def test_ranks_sharing_counts_ranks_on_the_same_gpu_only():
    # Two nodes; on node a each rank sees its own GPU, on node b two ranks share one.
    keys = [("a", "GPU-0"), ("a", "GPU-1"), ("b", "GPU-0"), ("b", "GPU-0"), ("b", "GPU-1")]
    assert [ranks_sharing(keys, r) for r in range(5)] == [1, 1, 2, 2, 1]


def test_overlap_of_byte_ranges():
    assert overlaps(100, 10, 105, 10) and overlaps(105, 10, 100, 10)
    assert not overlaps(100, 10, 110, 10) and not overlaps(110, 10, 100, 10)
    assert overlaps(100, 50, 120, 1)


@pytest.mark.mpi
@pytest.mark.parametrize("mode,needle", [("differ", "differ from rank 0 in ffn"),
                                         ("problem", "failed on rank(s) 1: rank 1's weights")])
def test_expert_parallel_ranks_fail_together(mode, needle):
    p = run_mpi(2, [WORKER, mode], timeout=120)
    results = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
    assert p.returncode == 0 and len(results) == 2, p.stdout + p.stderr
    assert all(" raised " in l and needle in l for l in results), results


@pytest.mark.mpi
def test_expert_parallel_ranks_that_agree_go_on():
    p = run_mpi(2, [WORKER, "same"], timeout=120)
    results = sorted(l for l in p.stdout.splitlines() if l.startswith("RESULT"))
    assert results == ["RESULT 0 ok", "RESULT 1 ok"], p.stdout + p.stderr
