"""The package's import graph: no cycles (counting the package __init__ that every submodule import
runs), no module importing another module's _private name, and every module importable on its own."""
import ast
import os
import subprocess
import sys
from pathlib import Path

from loop_helpers import REPO

PACKAGE = REPO / "mrjax"


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> modules it imports (anywhere in it, function-level imports too; importing
    a.b.c also runs a and a.b), and the imports of other modules' _private names."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []

    def add(m: str, target: str) -> None:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            if name in modules and name != m and not m.startswith(name + "."):  # a package's own __init__ is no cycle
                graph[m].add(name)

    for m, f in modules.items():
        package = m if f.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("mrjax"):
                        add(m, alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                if not base.startswith("mrjax"):
                    continue
                add(m, base)
                for alias in node.names:
                    if f"{base}.{alias.name}" in modules:
                        add(m, f"{base}.{alias.name}")
                    elif alias.name.startswith("_") and base != m:
                        private.append(f"{m} imports {base}.{alias.name}")
    return graph, private


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycles_and_no_private_imports():
    modules = _modules()
    graph, private = _imports(modules)
    assert "mrjax.loop" in graph and "mrjax.rundir" in graph["mrjax.loop"]  # the walk sees real edges
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    assert not private, private


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# Run in one fresh interpreter: before each module, every mrjax module is dropped from sys.modules, so
# each import starts from a package that nothing has imported yet (third-party modules stay loaded:
# what is checked is mrjax's own import order).
IMPORT_EACH_ALONE = """
import importlib, sys
failures = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "mrjax" or m.startswith("mrjax.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as error:
        failures.append(f"{name}: {type(error).__name__}: {error}")
print("\\n".join(failures))
"""


def test_every_module_imports_on_its_own():
    names = [m for m in _modules() if not m.endswith("__main__")]
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH_ALONE, *names], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu"))
    assert done.returncode == 0, done.stderr[-3000:]
    failures = [line for line in done.stdout.splitlines() if line.strip()]
    assert not failures, failures
    assert len(names) > 40
