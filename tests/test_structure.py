"""The package's dependency rules, read from the sources' import statements:
flashmoe_core -> host -> (device sources), never back, and the two backends of the
fused kernel (the GPU layer and the emulator) share kernel_io rather than import
each other."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set:
    """Every module a source file imports (relative imports resolved), lazy ones too."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    if package == "host":
        package = "flashmoe_core.host"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_host_never_imports_the_public_package():
    for path in sorted((REPO / "host").glob("*.py")):
        bad = {m for m in imports(path)
               if m.startswith("flashmoe_core") and not m.startswith("flashmoe_core.host")}
        assert not bad, f"host/{path.name} imports {sorted(bad)}: host/ takes plain values"


def test_the_emulator_does_not_import_the_gpu_layer():
    for name in ("emulator.py", "emulator_backward.py", "kernel_io.py"):
        got = imports(REPO / "flashmoe_core" / name)
        assert not {m for m in got if m.startswith("flashmoe_core.layer")}, \
            f"flashmoe_core/{name} imports the GPU layer; shared helpers live in kernel_io"


def test_kernel_io_depends_on_neither_backend():
    got = imports(REPO / "flashmoe_core" / "kernel_io.py")
    for backend in ("flashmoe_core.layer", "flashmoe_core.emulator", "flashmoe_core.jit"):
        assert not {m for m in got if m.startswith(backend)}, (backend, sorted(got))


def test_the_import_resolver_sees_relative_imports():
    # The checks above are only as good as this: a lazy relative import is found.
    got = imports(REPO / "flashmoe_core" / "layer.py")
    assert "flashmoe_core.emulator" in got and "flashmoe_core.kernel_io" in got
