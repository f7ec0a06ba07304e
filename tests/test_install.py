"""The installed package finds its device sources and host code from anywhere."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

PROBE = ("import flashmoe_core, flashmoe_core.host.compiler as c;"
         "from flashmoe_core.kernel.jit import toolchain;"
         "t = toolchain(); print(t.device_root);"
         "print((t.device_root / 'include/flashmoe/abi.cuh').is_file());"
         "print(all(p.is_dir() for p in t.include_dirs))")


def test_device_sources_found_from_another_directory(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "FLASHMOE_DEVICE_DIR"}
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0, p.stderr
    root, has_abi, includes = p.stdout.split()
    assert has_abi == "True" and includes == "True"
    assert Path(root).name in ("_device", "device")


@pytest.mark.slow
def test_wheel_carries_device_sources_and_host(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                        "-q", "-w", str(tmp_path), str(REPO)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    wheel = next(tmp_path.glob("flashmoe_core-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in ("flashmoe_core/_device/include/flashmoe/abi.cuh",
                 "flashmoe_core/_device/include/flashmoe/gemm/tile_gemm.cuh",
                 "flashmoe_core/_device/kernels/tile_gemm.cu",
                 "flashmoe_core/host/compiler.py", "flashmoe_core/cli/run.py"):
        assert must in names, must
    assert not any(n.startswith(("tests/", "tools/", "host/", "device/")) for n in names)
    # The unpacked wheel alone (no checkout on the path) finds its device sources.
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {k: v for k, v in os.environ.items() if k != "FLASHMOE_DEVICE_DIR"}
    env["PYTHONPATH"] = str(site)
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0, p.stderr
    root, has_abi, includes = p.stdout.split()
    assert Path(root) == site / "flashmoe_core" / "_device" and has_abi == "True"
