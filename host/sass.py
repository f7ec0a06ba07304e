"""What a cubin's machine code looks like, without a GPU: resources and SASS loops.

Uses ``cuobjdump`` and ``nvdisasm`` from the ``nvidia-cuda-cuobjdump`` and
``nvidia-cuda-nvdisasm`` wheels (the ``report`` extra). :func:`resources` reads the
registers, stack, shared and local memory per kernel; :func:`mma_loops` finds every
loop of the SASS that issues tensor-core instructions (the GEMM mainloops) and counts
what one iteration issues, by kind.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Dict, List

from .errors import FlashMoEError

__all__ = ["Resources", "Insn", "Loop", "tool", "resources", "disassemble", "mma_loops",
           "instruction_kind", "KINDS"]

KINDS = ("mma", "gmem->smem", "ldsm", "lds/sts", "barrier", "spill", "global", "other")
"""Instruction kinds a loop's mix is counted in."""


def tool(name: str) -> Path:
    """Path of ``cuobjdump`` or ``nvdisasm`` from its wheel."""
    spec = importlib.util.find_spec("nvidia")
    for root in (spec.submodule_search_locations or []) if spec else []:
        for sub in ("cu13", "cu12", "cuda_nvdisasm", "cuda_cuobjdump"):
            p = Path(root) / sub / "bin" / name
            if p.is_file():
                return p
    wheel = {"nvdisasm": "nvidia-cuda-nvdisasm", "cuobjdump": "nvidia-cuda-cuobjdump"}[name]
    raise FlashMoEError(f"{name} is not installed; pip install {wheel} (or the package's "
                        "'report' extra: pip install 'flashmoe-core[report]')")


def _run(args: List[str], cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            p = subprocess.run([*args, f.name], capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FlashMoEError(f"{args[0]} failed to run: {exc}") from None
    if p.returncode != 0:
        raise FlashMoEError(f"{Path(args[0]).name} rejected the cubin: {p.stderr.strip()}")
    return p.stdout


@dataclasses.dataclass(frozen=True)
class Resources:
    """Per-kernel resources as the assembler allotted them."""

    registers: int
    stack: int
    shared: int      # static shared memory, bytes
    local: int       # local memory per thread, bytes


def resources(cubin: bytes) -> Dict[str, Resources]:
    """Kernel name -> :class:`Resources` (``cuobjdump --dump-resource-usage``)."""
    out = {}
    text = _run([str(tool("cuobjdump")), "--dump-resource-usage"], cubin)
    for name, body in re.findall(r"Function ([\w$]+):\s*\n\s*(.*)", text):
        fields = dict(re.findall(r"(\w+):(\d+)", body))
        out[name] = Resources(int(fields.get("REG", 0)), int(fields.get("STACK", 0)),
                              int(fields.get("SHARED", 0)), int(fields.get("LOCAL", 0)))
    return out


_INSN = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(@!?U?P[0-9T]\s+)?([A-Z][A-Z0-9_.]*)(.*)$")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclasses.dataclass(frozen=True)
class Insn:
    """One SASS instruction: address, guard predicate ('' if none), opcode, operands,
    and the address a branch goes to (-1 if none)."""

    addr: int
    pred: str
    opcode: str
    operands: str
    target: int


def disassemble(cubin: bytes) -> Dict[str, List[Insn]]:
    """Kernel name -> its instructions in address order (``nvdisasm -c``)."""
    raw: Dict[str, List[tuple]] = {}
    labels: Dict[str, Dict[str, int]] = {}
    current = None
    pending: List[str] = []
    for line in _run([str(tool("nvdisasm")), "-c"], cubin).splitlines():
        m = re.match(r"^\.text\.([\w$]+):", line)
        if m:
            current = m.group(1)
            raw[current], labels[current] = [], {}
            continue
        if current is None:
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSN.match(line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[current][name] = addr
            pending = []
            raw[current].append((addr, (m.group(2) or "").strip(), m.group(3), m.group(4)))
    out = {}
    for name, insns in raw.items():
        table = labels[name]
        out[name] = [Insn(a, pred, op, rest, table.get(_target(rest), -1))
                     for a, pred, op, rest in insns]
    return out


def _target(rest: str) -> str:
    m = _TARGET.search(rest)
    return m.group(1) if m else ""


def instruction_kind(opcode: str) -> str:
    """The kind (one of :data:`KINDS`) an opcode is counted as."""
    base = opcode.split(".")[0]
    if base in ("HMMA", "HGMMA", "IMMA", "DMMA", "QGMMA", "IGMMA", "BGMMA"):
        return "mma"
    if base in ("LDGSTS", "UTMALDG", "UBLKCP", "UTMAPF", "LDGDEPBAR"):
        return "gmem->smem"
    if base == "LDSM":
        return "ldsm"
    if base in ("LDS", "STS"):
        return "lds/sts"
    if base in ("BAR", "SYNCS", "DEPBAR", "WARPGROUP", "WARPSYNC"):
        return "barrier"
    if base in ("LDL", "STL"):
        return "spill"
    if base in ("LDG", "STG", "LD", "ST", "ATOM", "ATOMG", "RED", "ATOMS"):
        return "global"
    return "other"


@dataclasses.dataclass(frozen=True)
class Loop:
    """One loop of a kernel's SASS: [start, end] addresses, what one iteration issues
    (by opcode and by kind), and its waits for wgmma groups (``WARPGROUP.DEPBAR``): one
    per k-tile when the wgmmas run as a group, one per wgmma when ptxas serialised them."""

    start: int
    end: int
    opcodes: Dict[str, int]
    kinds: Dict[str, int]
    wgmma_waits: int = 0

    @property
    def instructions(self) -> int:
        return sum(self.kinds.values())


def _blocks(insns: List[Insn]):
    """Basic blocks (lists of instruction indices) and their successors."""
    index = {ins.addr: i for i, ins in enumerate(insns)}
    leaders = {0}
    for i, ins in enumerate(insns):
        if ins.opcode.startswith(("BRA", "EXIT", "RET", "BRX", "JMX")):
            if ins.target in index:
                leaders.add(index[ins.target])
            if i + 1 < len(insns):
                leaders.add(i + 1)
    starts = sorted(leaders)
    blocks = [list(range(a, b)) for a, b in zip(starts, starts[1:] + [len(insns)])]
    block_of = {blk[0]: n for n, blk in enumerate(blocks)}
    succ = []
    for n, blk in enumerate(blocks):
        last = insns[blk[-1]]
        nxt = [n + 1] if n + 1 < len(blocks) else []
        if last.opcode.startswith("BRA"):
            tgt = [block_of[index[last.target]]] if last.target in index else []
            succ.append(tgt + (nxt if last.pred else []))
        elif last.opcode.startswith(("EXIT", "RET", "BRX", "JMX")):
            succ.append(nxt if last.pred else [])
        else:
            succ.append(nxt)
    return blocks, succ


def _dominators(succ: List[List[int]]) -> List[int]:
    """Dominator sets (bit masks) of every block reachable from block 0."""
    n = len(succ)
    pred = [[] for _ in range(n)]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    order, seen, stack = [], {0}, [(0, iter(succ[0]))]
    while stack:  # iterative DFS for the reverse postorder
        node, it = stack[-1]
        nxt = next((v for v in it if v not in seen), None)
        if nxt is None:
            order.append(node)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    order.reverse()
    full = (1 << n) - 1
    dom = [full] * n
    dom[0] = 1
    changed = True
    while changed:  # bounded: the sets only shrink
        changed = False
        for v in order[1:]:
            d = full
            for u in pred[v]:
                if u in seen:
                    d &= dom[u]
            d |= 1 << v
            if d != dom[v]:
                dom[v], changed = d, True
    return [d if v in seen else 0 for v, d in enumerate(dom)]


def mma_loops(insns: List[Insn]) -> List[Loop]:
    """The innermost natural loops that issue tensor-core instructions (the GEMM
    mainloops), each with what one iteration may issue: every instruction of the
    loop's blocks once, out-of-line blocks it jumps to and back from included."""
    if not insns:
        return []
    blocks, succ = _blocks(insns)
    dom = _dominators(succ)
    pred = [[] for _ in blocks]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    loops = {}
    for u, vs in enumerate(succ):
        for h in vs:
            if dom[u] >> h & 1:  # back edge u -> h: h dominates u
                body, work = {h, u}, ([u] if u != h else [])  # h's own preds stay out
                while work:
                    x = work.pop()
                    for p in pred[x]:
                        if p not in body:
                            body.add(p)
                            work.append(p)
                loops.setdefault(h, set()).update(body)
    with_mma = [frozenset(b) for b in loops.values()
                if any(instruction_kind(insns[i].opcode) == "mma" for n in b for i in blocks[n])]
    inner = [b for b in with_mma if not any(o < b for o in with_mma)]
    out = []
    for body in sorted(inner, key=min):
        ops = [insns[i].opcode for n in body for i in blocks[n]]
        counts = Counter(op.split(".")[0] for op in ops)
        kinds = Counter(instruction_kind(op) for op in ops)
        addrs = [insns[i].addr for n in body for i in blocks[n]]
        waits = sum(1 for op in ops if op.startswith("WARPGROUP.DEPBAR"))
        out.append(Loop(min(addrs), max(addrs), dict(counts), {k: kinds.get(k, 0) for k in KINDS},
                        waits))
    return out


def read_symbol(cubin: bytes, name: str, size: int = 4) -> bytes:
    """The initial bytes of a ``__device__`` constant (e.g. a size a kernel exports),
    read from the cubin's ELF symbol table without loading it."""
    import struct

    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        raise FlashMoEError("not a 64-bit ELF cubin")
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize)
                for i in range(shnum)]
    for sh in sections:
        if sh[1] != 2:  # SHT_SYMTAB
            continue
        strtab = sections[sh[6]]
        for off in range(sh[4], sh[4] + sh[5], 24):
            st_name, _, _, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", cubin,
                                                                             off)
            start = strtab[4] + st_name
            sym = cubin[start:cubin.index(b"\0", start)].decode()
            if sym == name and 0 < st_shndx < shnum:
                data = sections[st_shndx]
                if data[1] == 8:  # SHT_NOBITS: zero-initialised
                    return bytes(size)
                base = data[4] + st_value
                return cubin[base:base + min(size, st_size or size)]
    raise FlashMoEError(f"the cubin has no symbol {name}")
