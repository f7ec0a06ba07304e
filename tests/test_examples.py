"""The README's training example runs, its loss goes down, and its NumPy and DLPack loops
are the same computation (on the CPU emulator)."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.emulator

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_example", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_training_example_loss_goes_down_alike_with_numpy_and_dlpack():
    mod = load_example()
    numpy_losses = mod.train("emulator", dlpack=False, steps=8, say=lambda _: None)
    dlpack_losses = mod.train("emulator", dlpack=True, steps=8, say=lambda _: None)
    # The loop cycles over four batches: each one's loss fell by its second visit.
    assert all(numpy_losses[i + 4] < 0.9 * numpy_losses[i] for i in range(4)), numpy_losses
    assert numpy_losses == dlpack_losses  # bitwise the same steps


def test_training_example_script_runs():
    out = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "3", "--dlpack"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loss" in out.stdout and "in 3 steps" in out.stdout
