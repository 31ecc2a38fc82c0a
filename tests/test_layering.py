"""The library's layering: every module imports alone, no module imports another that (directly or
through others) imports it back, and modules/ (the layers) import nothing from passes/ (the graph
rewrites built on them).

Modules are found on disk, with the package layout of pyproject.toml: passes/ and cli/ at the
repository root install as wasi_compress.passes and wasi_compress.cli."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package name -> folder (pyproject.toml's [tool.setuptools.package-dir])
PACKAGE_DIRS = {"wasi_compress": ROOT / "wasi_compress", "wasi_compress.passes": ROOT / "passes",
                "wasi_compress.cli": ROOT / "cli"}


def library_files() -> dict[str, Path]:
    """module name -> file, for every module of the library."""
    found: dict[str, Path] = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = library_files()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module a (possibly relative) `from ... import` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """Library modules an import statement runs: the named module (or, for `from p import m`, the
    submodule m) and the packages above it, whose __init__ runs first (except packages that contain
    the importer: those are already importing)."""
    named: set[str] = set()
    if isinstance(node, ast.Import):
        named = {alias.name for alias in node.names}
    else:
        base = _resolve(module, node)
        named = {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    out = set()
    for name in named:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in MODULES and (candidate == name or not module.startswith(candidate + ".")):
                out.add(candidate)
    out.discard(module)
    return out


def _imports(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(imports run when the module is imported, imports inside functions), as library module names.
    A package's lazy ``__getattr__`` and ``if TYPE_CHECKING:`` blocks are not imports at run time."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top: set[str] = set()
    lazy: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) and child.name == "__getattr__" \
                    and node is tree:
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (lazy if in_function else top).update(_targets(module, child))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return top, lazy


def _graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    top, every = {}, {}
    for module, path in MODULES.items():
        t, lazy = _imports(module, path)
        top[module], every[module] = t, t | lazy
    return top, every


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return sorted(out)


def _describe(graph: dict[str, set[str]], cycles: list[list[str]]) -> str:
    lines = []
    for component in cycles:
        members = set(component)
        edges = [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
        lines.append("cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(edges))
    return "\n".join(lines)


def test_the_scan_sees_the_library_and_its_lazy_imports():
    assert {"wasi_compress.loading", "wasi_compress.passes.capture", "wasi_compress.cli.main"} <= set(MODULES)
    top, every = _graphs()
    assert "wasi_compress.inputs" in top["wasi_compress.checkpoint"]
    assert "wasi_compress.passes.replace" in every["wasi_compress.checkpoint"] - top["wasi_compress.checkpoint"]
    # a cycle the scan must find: a -> b -> a
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_no_import_cycle_at_module_level():
    top, _ = _graphs()
    cycles = _cycles(top)
    assert not cycles, _describe(top, cycles)


def test_no_import_cycle_counting_lazy_imports():
    """Imports inside functions count too: a cycle hidden in a function is still a tangle."""
    _, every = _graphs()
    cycles = _cycles(every)
    assert not cycles, _describe(every, cycles)


def test_modules_import_nothing_from_passes():
    _, every = _graphs()
    bad = {m: sorted(t for t in every[m] if t.startswith("wasi_compress.passes"))
           for m in every if m == "wasi_compress.modules" or m.startswith("wasi_compress.modules.")}
    assert not {m: t for m, t in bad.items() if t}


# Imports each module into an interpreter that has run nothing of the library but the package's own
# __init__ (which every `import wasi_compress.x` runs first): a driver imports that and the heavy
# third-party packages once, then forks one child per module, so each child starts in the state of a
# fresh interpreter at the moment it begins importing the module, in a fraction of the time.
_DRIVER = textwrap.dedent("""
    import importlib, os, sys, traceback
    import wasi_compress
    for heavy in ("torch", "torch.fx", "timm", "safetensors.torch", "numpy", "click", "rich"):
        try:
            importlib.import_module(heavy)
        except Exception:
            pass
    loaded = sorted(m for m in sys.modules if m.startswith("wasi_compress"))
    assert loaded == ["wasi_compress", "wasi_compress._compat"], loaded
    failed = []
    for name in sys.argv[1:]:
        pid = os.fork()
        if pid == 0:
            try:
                importlib.import_module(name)
            except BaseException:
                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            failed.append(name)
    print("FAILED:", " ".join(failed))
    sys.exit(1 if failed else 0)
""")


@pytest.mark.slow  # one fresh interpreter importing every module in turn
def test_every_module_imports_alone():
    names = sorted(m for m in MODULES if m not in ("wasi_compress", "wasi_compress._compat"))
    result = subprocess.run([sys.executable, "-c", _DRIVER, *names], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-6000:]
    # the package itself, alone (the driver's first import)
    result = subprocess.run([sys.executable, "-c", "import wasi_compress"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-4000:]
