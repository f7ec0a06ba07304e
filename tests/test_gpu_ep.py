"""GPU tier: expert parallelism with several PEs on the available GPU(s) (mpirun)."""

from pathlib import Path

import pytest

from conftest import run_mpi

pytestmark = [pytest.mark.gpu, pytest.mark.mpi]
WORKER = str(Path(__file__).with_name("mpi_gpu_ep_worker.py"))


def _run(ranks, mode):
    p = run_mpi(ranks, [WORKER, mode], timeout=600)
    results = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
    return p, results


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_matches_oracle_and_world_1(ranks):
    p, results = _run(ranks, "check")
    assert p.returncode == 0 and len(results) == ranks, p.stdout + p.stderr


def test_delayed_rank_still_correct():
    p, results = _run(2, "delay")
    assert p.returncode == 0, p.stdout + p.stderr


def test_absent_rank_makes_the_others_time_out():
    p, results = _run(2, "absent")
    assert p.returncode == 0, p.stdout + p.stderr
    assert any("timeout" in l and "peer=1" in l for l in results), results


@pytest.mark.parametrize("ranks", [2, 4])
def test_expert_parallel_backward_equals_world_1(ranks):
    p, results = _run(ranks, "backward")
    assert p.returncode == 0 and len(results) == ranks, p.stdout + p.stderr
