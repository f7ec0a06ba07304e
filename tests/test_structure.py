"""The package's dependency rules, read from the sources' import statements:
flashmoe_core -> host -> (device sources), never back; the oracle depends on no
backend; the two backends of the fused kernel (gpu/ and emulator/) share kernel/
rather than import each other, and kernel/ imports neither."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set:
    """Every module a source file imports (relative imports resolved), lazy ones too."""
    parts = path.relative_to(REPO).with_suffix("").parts
    package = ".".join(parts[:-1])  # a module's package; an __init__'s is its own folder
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


def modules(folder: str):
    return sorted((REPO / "flashmoe_core" / folder).glob("*.py"))


def forbidden(paths, prefixes):
    for path in paths:
        bad = {m for m in imports(path) for p in prefixes if m == p or m.startswith(p + ".")}
        assert not bad, f"{path.relative_to(REPO)} imports {sorted(bad)}"


def test_the_emulator_does_not_import_the_gpu_backend():
    forbidden(modules("emulator"), ["flashmoe_core.gpu"])


def test_the_gpu_backend_imports_the_emulator_only_to_dispatch_to_it():
    for path in modules("gpu"):
        got = {m for m in imports(path) if m.startswith("flashmoe_core.emulator")}
        assert not got or path.name == "layer.py", (path.name, got)


def test_kernel_depends_on_neither_backend_nor_the_commands():
    forbidden(modules("kernel"), ["flashmoe_core.gpu", "flashmoe_core.emulator",
                                  "flashmoe_core.cli"])


def test_the_oracle_depends_on_no_backend():
    forbidden(modules("oracle"), ["flashmoe_core.gpu", "flashmoe_core.emulator",
                                  "flashmoe_core.kernel", "flashmoe_core.cli",
                                  "flashmoe_core.host"])


def test_the_import_resolver_sees_relative_imports():
    # The checks above are only as good as this: lazy relative imports are found, from
    # a module and from a package's __init__.
    got = imports(REPO / "flashmoe_core" / "gpu" / "layer.py")
    assert "flashmoe_core.emulator" in got and "flashmoe_core.kernel.contract" in got
    got = imports(REPO / "flashmoe_core" / "emulator" / "__init__.py")
    assert "flashmoe_core.kernel.contract" in got and "flashmoe_core.emulator.training" in got
