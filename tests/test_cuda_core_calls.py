"""Keyword arguments of cuda.core's option classes, checked against the installed cuda.core.

These classes are built only on a GPU path, so a renamed field (``enable_timing`` became
``timing_enabled``) would otherwise surface first on a GPU. The check reads every call
in the package and tools from its source and needs no GPU.
"""

import ast
from pathlib import Path

import pytest

core = pytest.importorskip("cuda.core")

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("EventOptions", "LaunchConfig", "ProgramOptions", "LinkerOptions", "StreamOptions")
SOURCES = sorted(p for d in ("flashmoe_core", "host", "tools") for p in (ROOT / d).rglob("*.py"))


def _calls():
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) \
                else None
            if name in CLASSES:
                kws = [k.arg for k in node.keywords if k.arg is not None]
                yield f"{path.relative_to(ROOT)}:{node.lineno}", name, kws


CALLS = list(_calls())


def test_the_scan_finds_the_calls():
    names = {c[1] for c in CALLS}
    assert {"EventOptions", "LaunchConfig", "ProgramOptions", "LinkerOptions"} <= names


@pytest.mark.parametrize("where,cls,keywords", CALLS, ids=[c[0] for c in CALLS])
def test_keywords_are_fields_of_the_installed_class(where, cls, keywords):
    klass = getattr(core, cls)
    unknown = [k for k in keywords if not hasattr(klass, k)
               and k not in getattr(klass, "__dataclass_fields__", {})]
    assert not unknown, f"{where}: cuda.core {core.__version__} {cls} has no field {unknown}"
