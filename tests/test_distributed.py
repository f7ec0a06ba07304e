"""The distributed oracle equals the single-process oracle bit for bit (mpirun)."""

from pathlib import Path

import pytest

from conftest import run_mpi

WORKER = str(Path(__file__).with_name("mpi_oracle_worker.py"))


@pytest.mark.mpi
@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_distributed_equals_single_process(ranks):
    proc = run_mpi(ranks, [WORKER])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [l for l in proc.stdout.splitlines() if l.startswith(("OK", "MISMATCH"))]
    assert len(lines) == 5 and all(l.startswith("OK") for l in lines), proc.stdout


@pytest.mark.mpi
def test_world_size_must_match_ranks():
    code = ("from flashmoe_core import *; from flashmoe_core.oracle.distributed import "
            "moe_forward_distributed as f; import numpy as np\n"
            "c = MoEConfig(tokens=4, hidden=8, ffn=8, experts=2, world_size=3)\n"
            "try:\n    f(c, MoEWeights.random(c), np.zeros((4, 8), np.float32))\n"
            "except ValueError as e:\n    print('ERR', e)\n")
    proc = run_mpi(2, ["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert "cfg.world_size=3" in proc.stdout and "mpirun -np 3" in proc.stdout
