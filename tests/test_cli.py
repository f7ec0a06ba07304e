"""The run and build command lines."""

import json
import os
import subprocess
import sys

import pytest

from conftest import HAS_GPU, REPO, run_mpi

SMALL = ["--tokens", "64", "--hidden", "32", "--ffn", "48", "--experts", "6"]


def run(args, env=None, cwd=None):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "flashmoe_core.run"] + list(args),
                          capture_output=True, text=True, env=e, cwd=cwd, timeout=300)


@pytest.mark.skipif(HAS_GPU, reason="checks the GPU-less fallback")
def test_auto_falls_back_to_reference_in_one_line(tmp_path):
    p = run(SMALL + ["--check"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    notes = [l for l in p.stderr.splitlines() if "reference backend" in l]
    assert len(notes) == 1 and "no usable GPU" in notes[0]
    assert p.stdout.startswith("reference: tokens/rank=64") and "check PASS" in p.stdout


@pytest.mark.skipif(HAS_GPU, reason="checks the GPU-less error")
def test_gpu_backend_without_gpu_is_a_clear_error():
    p = run(SMALL + ["--backend", "gpu"])
    assert p.returncode == 3 and "needs an NVIDIA GPU" in p.stderr
    assert "Traceback" not in p.stderr


def test_json_summary():
    p = run(SMALL + ["--backend", "reference", "--json", "--iters", "1", "--mlp", "gated",
                     "--activation", "silu", "--dtype", "float16", "--capacity-factor", "1.0"])
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["backend"] == "reference" and s["iters"] == 1 and s["median_ms"] > 0
    assert s["config"]["mlp"] == "gated" and s["config"]["capacity_factor"] == 1.0
    assert s["dropped_assignments"] >= 0


def test_config_file_and_flag_override(tmp_path):
    from flashmoe_core import MoEConfig

    f = tmp_path / "cfg.json"
    f.write_text(MoEConfig(tokens=32, hidden=16, ffn=16, experts=4, top_k=1,
                           dtype="float32").to_json())
    p = run(["--config", str(f), "--experts", "5", "--backend", "reference", "--json"])
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)["config"]
    assert (s["tokens"], s["experts"], s["top_k"], s["dtype"]) == (32, 5, 1, "float32")


@pytest.mark.parametrize("args,fragment", [
    (["--top-k", "17"], "MoEConfig.top_k=17"),
    (["--hidden", "30"], "multiple of 8"),
    (["--world-size", "2"], "launch with mpirun -np 2"),
    (["--iters", "0"], "--iters 0"),
    (["--config", "/nonexistent.json"], "cannot read it"),
])
def test_bad_input_exits_2_with_a_message(args, fragment):
    p = run(SMALL + ["--backend", "reference"] + args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert fragment in p.stderr and "Traceback" not in p.stderr


def test_binary_config_and_negative_seed_name_the_flag(tmp_path):
    f = tmp_path / "layer.json"
    f.write_bytes(bytes(range(256)))
    p = run(["--config", str(f), "--backend", "reference"])
    assert p.returncode == 2 and f"--config {f}: not a text file" in p.stderr
    f.write_text('{"tokens": 4, "hidden": 9, "ffn": 8, "experts": 2}')
    p = run(["--config", str(f), "--backend", "reference"])
    assert p.returncode == 2 and f"--config {f}: MoEConfig.hidden=9" in p.stderr
    p = run(SMALL + ["--seed", "-1", "--backend", "reference"])
    assert p.returncode == 2 and "--seed -1" in p.stderr


ENV_CASES = {
    # variable values every path refuses, whichever backend reads them
    "timeout-word": ({"FLASHMOE_TIMEOUT_S": "banana"}, "reference", "FLASHMOE_TIMEOUT_S"),
    "timeout-negative": ({"FLASHMOE_TIMEOUT_S": "-1"}, "reference", "FLASHMOE_TIMEOUT_S"),
    "timeout-nan": ({"FLASHMOE_TIMEOUT_S": "nan"}, "emulator", "FLASHMOE_TIMEOUT_S"),
    "quiet": ({"FLASHMOE_QUIET": "maybe"}, "reference", "FLASHMOE_QUIET"),
    "device-dir": ({"FLASHMOE_DEVICE_DIR": "/nonexistent/device"}, "emulator",
                   "FLASHMOE_DEVICE_DIR"),
    "cxx-missing": ({"FLASHMOE_CXX": "no-such-c++"}, "emulator", "FLASHMOE_CXX"),
    # the cache folder and the compiler, found unusable before anything compiles
    "cache-is-a-file": ({"FLASHMOE_CACHE_DIR": "{file}"}, "emulator", "is not a folder"),
    "cache-unwritable": ({"FLASHMOE_CACHE_DIR": "/proc/flashmoe-cache"}, "emulator",
                         "kernel cache folder /proc/flashmoe-cache is not usable"),
    "cxx-fails": ({"FLASHMOE_CXX": "false"}, "emulator", "does not work"),
    "cxx-builds-nothing": ({"FLASHMOE_CXX": "true"}, "emulator",
                           "cannot build a C++17 shared library"),
}


@pytest.mark.parametrize("case", list(ENV_CASES))
def test_environment_problems_exit_3_in_one_line_before_any_compile(case, tmp_path):
    env, backend, fragment = ENV_CASES[case]
    afile = tmp_path / "a-file"
    afile.write_text("")
    env = {k: v.format(file=afile) for k, v in env.items()}
    env.setdefault("FLASHMOE_CACHE_DIR", str(tmp_path / "cache"))  # a miss: would compile
    p = run(SMALL + ["--backend", backend], env=env)
    assert p.returncode == 3, (p.stdout, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines
    assert "compiling" not in p.stderr


@pytest.mark.parametrize("backend", ["reference", "emulator"])
def test_a_layer_too_large_for_the_machine_exits_3_before_allocating(backend):
    p = run(["--tokens", "1048576", "--hidden", "65536", "--ffn", "65536", "--experts", "1024",
             "--backend", backend])
    assert p.returncode == 3 and "GiB of host memory" in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "compiling" not in p.stderr


def test_exit_codes_are_documented_once():
    from flashmoe_core.cli import run as run_module
    from flashmoe_core.cli import EXIT_CODES

    readme = (REPO / "README.md").read_text()
    assert sorted(EXIT_CODES) == [0, 1, 2, 3, 4]
    for code in EXIT_CODES:
        assert f"| {code} |" in readme
    assert "4 a kernel fault or timeout" in " ".join(run_module.__doc__.split())


def test_bad_flag_value_is_an_argparse_error():
    p = run(["--capacity-factor", "lots"])
    assert p.returncode == 2 and "expected a number or 'none'" in p.stderr


def test_help_lists_every_config_field():
    import dataclasses

    from flashmoe_core import MoEConfig

    p = run(["--help"])
    for flag in ("--config", "--backend", "--seed", "--warmup", "--iters", "--check", "--json"):
        assert flag in p.stdout
    for f in dataclasses.fields(MoEConfig):  # one flag per field, new ones included
        assert "--" + f.name.replace("_", "-") in p.stdout, f.name


def test_shared_experts_and_capacity_rules_from_flags():
    p = run(SMALL + ["--backend", "reference", "--json", "--iters", "1", "--check", "--mlp",
                     "gated", "--n-shared", "2", "--shared-ffn", "16", "--shared-gate",
                     "--capacity-factor", "1.0", "--capacity-order", "slot"])
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    c = s["config"]
    assert (c["n_shared"], c["shared_ffn"], c["shared_gate"], c["capacity_order"]) == \
        (2, 16, True, "slot")
    assert s["check"]["passed"], s["check"]
    p = run(SMALL + ["--backend", "reference", "--shared-gate"])
    assert p.returncode == 2 and "MoEConfig.shared_gate" in p.stderr


@pytest.mark.mpi
def test_mpirun_runs_the_distributed_oracle_and_checks_it():
    p = run_mpi(3, ["-m", "flashmoe_core.run", "--backend", "reference", "--check",
                    "--tokens", "32", "--hidden", "16", "--ffn", "24", "--experts", "7",
                    "--capacity-factor", "1.0"])
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1  # rank 0 only
    assert "world=3" in lines[0] and "check PASS: distributed oracle == single-process" in lines[0]


@pytest.mark.mpi
def test_mpirun_placement_must_fit_the_world():
    p = run_mpi(2, ["-m", "flashmoe_core.run", "--backend", "reference", "--tokens", "8",
                    "--hidden", "8", "--ffn", "8", "--experts", "3", "--placement", "0,1,2"])
    assert p.returncode == 2 and "MoEConfig.placement" in p.stderr


def test_build_command_rejects_bad_arch():
    p = subprocess.run([sys.executable, "-m", "flashmoe_core.build", "--arch", "sm_70"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and "sm_70" in p.stderr and "not supported" in p.stderr


@pytest.mark.compile
def test_build_command_fills_the_cache(tmp_path):
    env = dict(os.environ, FLASHMOE_CACHE_DIR=str(tmp_path))
    cmd = [sys.executable, "-m", "flashmoe_core.build", "--arch", "sm_80", "--kernels", "tests"]
    from flashmoe_core.kernel import specs

    # Only the cheap kernels: swap in a spec list without the tile GEMMs.
    code = ("import sys, flashmoe_core.cli.build as b, flashmoe_core.kernel.specs as k;"
            "b.test_specs = lambda: [k.abi_check_spec()];"
            "sys.exit(b.main(sys.argv[1:]))")
    p = subprocess.run([sys.executable, "-c", code] + cmd[3:], capture_output=True, text=True,
                       env=env)
    assert p.returncode == 0, p.stderr
    assert "kernels/abi_check.cu" in p.stdout and "compiled in" in p.stdout
    p2 = subprocess.run([sys.executable, "-c", code] + cmd[3:], capture_output=True, text=True,
                        env=dict(env, FLASHMOE_DISABLE_JIT="1"))
    assert p2.returncode == 0 and "cached" in p2.stdout
    assert specs.abi_check_spec() is not None


@pytest.mark.emulator
def test_emulator_backend_runs_and_checks_the_fused_kernel():
    p = run(["--tokens", "40", "--hidden", "64", "--ffn", "64", "--experts", "5",
             "--backend", "emulator", "--check", "--json"])
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert s["backend"] == "emulator" and s["check"]["passed"] and s["iters"] == 1
    assert s["check"]["rel_error"] <= 1e-2


@pytest.mark.emulator
def test_emulator_backend_runs_expert_parallel_pes_in_one_process():
    p = run(["--tokens", "40", "--hidden", "64", "--ffn", "64", "--experts", "5",
             "--world-size", "2", "--backend", "emulator", "--check"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("emulator: tokens/rank=40") and "world=2" in p.stdout
    assert "check PASS" in p.stdout
