"""The emulator under mpirun: one PE per process, the symmetric heaps in the node's
shared memory, the layer's own collective host logic (config agreement, recovery)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import mpirun_command, run_mpi

pytestmark = [pytest.mark.mpi, pytest.mark.emulator]

WORKER = str(Path(__file__).with_name("mpi_emulator_worker.py"))
RUN = ["-m", "flashmoe_core.run", "--backend", "emulator", "--tokens", "48", "--hidden", "128",
       "--ffn", "128", "--experts", "9", "--check"]


def results(stdout: str, ranks: int) -> list:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == ranks, stdout
    return sorted(lines)


# Two ranks here; the README's block runs the same command on four.
@pytest.mark.parametrize("ranks", [2])
def test_run_command_with_one_pe_per_process(ranks):
    p = run_mpi(ranks, RUN, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("emulator: tokens/rank=48") and f"world={ranks}" in p.stdout
    assert "check PASS" in p.stdout, p.stdout
    assert not list(Path("/dev/shm").glob("flashmoe-emu-*")), "a heap segment was left behind"


def test_every_check_on_with_one_pe_per_process():
    p = run_mpi(2, [WORKER, "check"], timeout=600)
    lines = results(p.stdout, 2)
    assert p.returncode == 0 and all(" ok " in ln + " " for ln in lines), p.stdout + p.stderr


def test_killed_rank_makes_the_others_time_out_naming_it():
    env = dict(os.environ, OMPI_MCA_rmaps_base_oversubscribe="1")
    # --enable-recovery: the survivors keep running when a rank dies, as a job whose
    # collective layer waits for a dead peer would.
    cmd = mpirun_command(3) + ["--enable-recovery", sys.executable, WORKER, "kill"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert len(lines) == 2, p.stdout + p.stderr  # the killed rank prints nothing
    for ln in lines:
        assert " ok phase=" in ln and "peer=2" in ln, p.stdout
    assert not list(Path("/dev/shm").glob("flashmoe-emu-*")), "a heap segment was left behind"
