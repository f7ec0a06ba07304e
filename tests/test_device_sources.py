"""Static rules every device source obeys (CPU tier)."""

import re

import pytest

from flashmoe_core.host.toolchain import device_root

ROOT = device_root()
SOURCES = sorted(p for p in ROOT.rglob("*") if p.suffix in (".cuh", ".cu"))
LOOP = re.compile(r"\bwhile\s*\(|\bfor\s*\(\s*;\s*;\s*\)|\bdo\s*\{")


def _code(line: str) -> str:
    return line.split("//", 1)[0]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_open_ended_loop_states_its_bound(path):
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if LOOP.search(_code(line)):
            here = line + (lines[i - 1] if i else "")
            assert "bounded:" in here, f"{path.name}:{i + 1}: loop without a '// bounded:' reason"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_memory_polling_only_through_bounded_waits(path):
    if path.name in ("wait.cuh", "sync.cuh"):
        return
    text = "\n".join(_code(l) for l in path.read_text().splitlines())
    # Raw volatile access (the polling mechanism) lives in sync.cuh/wait.cuh only;
    # "asm volatile" is an inline-assembly qualifier, not a memory access.
    raw = re.sub(r"asm\s+volatile", "", text)
    assert not re.search(r"\bvolatile\b", raw), f"{path.name}: poll through bounded_wait"
    assert "nanosleep" not in text


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_trap_or_printf(path):
    # Kernels report faults through the host-visible record and leave; they never kill
    # the context or print.
    text = "\n".join(_code(l) for l in path.read_text().splitlines())
    assert "__trap" not in text and "asm(\"trap" not in text and "printf(" not in text


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.cu")), ids=lambda p: p.name)
def test_entry_points_document_their_launch_contract(path):
    text = path.read_text()
    if "__global__" in text and "abi_check" not in path.name:
        assert "Launch contract" in text, f"{path.name} lacks a 'Launch contract' comment"
    for m in re.finditer(r"__global__[^(]*\b(\w+)\s*\(", text):
        assert 'extern "C"' in text[max(0, m.start() - 200):m.start()], m.group(1)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_fault_checks_are_block_uniform(path):
    # A per-thread read of the fault record can split a block (one thread leaves, the
    # others wait at a barrier): outside wait.cuh, ask block_fault_raised().
    if path.name == "wait.cuh":
        return
    text = "\n".join(_code(l) for l in path.read_text().splitlines())
    assert not re.search(r"(?<!block_)fault_raised\(", text), \
        f"{path.name}: use block_fault_raised(site) (thread 0 reads, the block agrees)"
