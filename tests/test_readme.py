"""Every command and code block of README.md, run as printed.

Each ``bash`` or ``python`` block carries a ``<!-- readme-test: KIND -->`` line saying
how it is tested:

- ``cpu``, ``emulator``, ``mpi``, ``compile``: run as printed (bash blocks in a fresh
  folder, python blocks after the README's earlier ``cpu`` python blocks), in the tier
  of that marker;
- ``gpu``: the same, on a GPU;
- ``fresh``: the quick start, in a fresh copy of the checkout (venv, install, run);
- ``collect``: pytest commands, run with ``--collect-only`` (running the suite from
  inside itself would recurse);
- ``parse (why)``: what no single machine runs (several GPUs, Slurm, a cluster, a
  long build): every ``flashmoe_core.run`` command's flags are parsed into a valid
  configuration, ``mpirun`` carries the flags the README promises, and scripts exist
  and pass ``bash -n``;
- ``excerpt (why)``: a python fragment of a program that a test runs whole (the why
  names it): it must compile.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HAS_GPU, REPO

README = (REPO / "README.md").read_text()
KINDS = ("cpu", "emulator", "mpi", "compile", "gpu", "fresh", "collect", "parse", "excerpt")
_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<kind>\w+)(?: \((?P<why>[^)]*)\))? -->\n)?"
                    r"```(?P<lang>\w*)\n(?P<body>.*?)```", re.S)


def _blocks():
    out = []
    for m in _BLOCK.finditer(README):
        if m.group("lang") in ("bash", "python"):
            line = README.count("\n", 0, m.start("body")) + 1
            out.append(dict(kind=m.group("kind"), why=m.group("why"), lang=m.group("lang"),
                            body=m.group("body"), line=line))
    return out


BLOCKS = _blocks()
MARKS = {"emulator": [pytest.mark.emulator], "mpi": [pytest.mark.mpi],
         "compile": [pytest.mark.compile, pytest.mark.slow], "gpu": [pytest.mark.gpu],
         "fresh": [pytest.mark.slow]}


def _params(kinds):
    return [pytest.param(b, id=f"line{b['line']}-{b['lang']}", marks=MARKS.get(b["kind"], []))
            for b in BLOCKS if b["kind"] in kinds]


def _env(**extra):
    env = dict(os.environ)
    # The interpreter running the tests is the README's `python` (its venv's bin first).
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _bash(body, cwd, env, timeout=900):
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=cwd, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    if "--check" in body:
        assert p.stdout.count("check PASS") == body.count("--check"), p.stdout
    return p


def _commands(body):
    """The block's commands, continuation lines joined, comments dropped."""
    joined = body.replace("\\\n", " ")
    out = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            out.append(words)
    return out


def test_every_block_says_how_it_is_tested():
    assert len(BLOCKS) >= 12
    for b in BLOCKS:
        assert b["kind"] in KINDS, f"README.md line {b['line']}: a {b['lang']} block without " \
                                   f"<!-- readme-test: KIND --> (one of {KINDS})"
        assert (b["kind"] in ("parse", "excerpt")) == bool(b["why"]), b["line"]
        assert b["kind"] != "excerpt" or b["lang"] == "python", b["line"]


def test_no_placeholder_is_left_in_the_readme():
    for marker in ("TOTAL_MIN", "QUICK_MIN", "EMU_MIN"):
        assert marker not in README, marker


@pytest.mark.parametrize("block", _params(("cpu", "emulator", "mpi", "compile", "gpu")))
def test_block_runs_as_printed(block, tmp_path, request):
    if block["lang"] == "bash":
        extra = {}
        if block["kind"] == "compile":  # share the compile tier's cache (same kernels)
            extra["FLASHMOE_CACHE_DIR"] = str(request.getfixturevalue("shared_cache"))
        _bash(block["body"], tmp_path, _env(**extra))
        return
    namespace = {"__name__": "readme"}
    for earlier in BLOCKS:  # the blocks this one follows (cfg, w, x, ...)
        if earlier is block:
            break
        if earlier["lang"] == "python" and earlier["kind"] == "cpu":
            exec(compile(earlier["body"], f"README.md:{earlier['line']}", "exec"), namespace)
    if block["kind"] == "gpu":
        for module in re.findall(r"^import (\w+)", block["body"], re.M):
            pytest.importorskip(module)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block["body"], f"README.md:{block['line']}", "exec"), namespace)
    finally:
        os.chdir(cwd)


def _checkout_copy(dest: Path) -> None:
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, target)


@pytest.mark.parametrize("block", _params(("fresh",)))
def test_quick_start_on_a_fresh_copy(block, tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("needs a git checkout to copy")
    copy = tmp_path / "checkout"
    _checkout_copy(copy)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep)
                                  if p != venv_bin)
    env["FLASHMOE_CACHE_DIR"] = str(tmp_path / "cache")
    p = _bash(block["body"], copy, env, timeout=1200)
    assert "no kernel ran" in p.stdout and (copy / ".venv").is_dir()


@pytest.mark.parametrize("block", _params(("collect",)))
def test_pytest_commands_select_tests(block):
    for words in _commands(block["body"].replace("&&", "\n")):
        if words[:3] != ["python", "-m", "pytest"]:
            continue
        p = subprocess.run([sys.executable, "-m", "pytest", *words[3:], "--collect-only", "-q",
                            "-p", "no:cacheprovider"], cwd=REPO, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        assert re.search(r"\d+(/\d+)? tests? (collected|selected)", p.stdout), p.stdout[-500:]


@pytest.mark.parametrize("block", _params(("parse",)))
def test_commands_no_single_machine_runs_parse(block):
    from flashmoe_core.cli import run
    from flashmoe_core.cli import config_from_args

    for words in _commands(block["body"]):
        if words[0] == "mpirun":
            assert "--allow-run-as-root" in words, words
        world = 1
        for flag in ("-np", "--ntasks-per-node"):
            for i, w in enumerate(words):
                if w == flag:
                    world = int(words[i + 1])
                elif w.startswith(flag + "="):
                    world = int(w.split("=", 1)[1])
        if "flashmoe_core.run" in words:
            args = run._parser().parse_args(words[words.index("flashmoe_core.run") + 1:])
            cfg = config_from_args(args, world_size=world)
            assert cfg.world_size == world
        for w in words:
            if w.startswith("tools/"):
                script = REPO / w
                assert script.is_file() and os.access(script, os.X_OK), w
                assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, w


@pytest.mark.parametrize("block", _params(("excerpt",)))
def test_excerpts_compile(block):
    compile(block["body"], f"README.md:{block['line']}", "exec")
