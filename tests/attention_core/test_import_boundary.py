"""attention_core imports only torch, safetensors and the standard library, has no import cycle, and
does nothing on import."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "attention_core"
ALLOWED = set(sys.stdlib_module_names) | {"torch", "safetensors"}
MODULES = sorted(PACKAGE.rglob("*.py"))


def imported_top_level_names(tree: ast.Module) -> set[str]:
    """Top-level package of every absolute import anywhere in the module (inside functions too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def package_imports(path: Path) -> set[str]:
    """attention_core modules that `path` imports anywhere (inside functions too), by module name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules = {p.stem for p in MODULES}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y, from . import x
            targets = [node.module] if node.module else [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.startswith(PACKAGE.name):
            targets = [node.module.removeprefix(PACKAGE.name).lstrip(".") or "__init__"]
        elif isinstance(node, ast.Import):
            targets = [alias.name.removeprefix(PACKAGE.name).lstrip(".") or "__init__"
                       for alias in node.names if alias.name.split(".")[0] == PACKAGE.name]
        else:
            continue
        # `from . import x` names a module or, failing that, something __init__ defines
        found |= {t.split(".")[0] if t.split(".")[0] in modules else "__init__" for t in targets}
    return found - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None (depth-first search)."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if cycle := visit(nxt):
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if cycle := visit(node):
            return cycle
    return None


def test_the_package_has_modules():
    assert {p.name for p in MODULES} >= {"__init__.py", "config.py", "attention.py", "model.py",
                                         "generation.py", "training.py"}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_imports_stay_inside_the_boundary(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    outside = imported_top_level_names(tree) - ALLOWED
    assert not outside, f"{path.name} imports {sorted(outside)}"
    for node in ast.walk(tree):  # no importlib/__import__ side doors
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "__import__", path.name
        if isinstance(node, ast.Attribute) and node.attr == "import_module":
            pytest.fail(f"{path.name} uses import_module")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_nothing_runs_at_import_time(path):
    """Module bodies hold imports, definitions and constant assignments: no calls, no I/O."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.ClassDef)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):  # docstring
            continue
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            assert not any(isinstance(n, ast.Call) for n in ast.walk(node)), \
                f"{path.name}:{node.lineno} calls something at import time"
            continue
        pytest.fail(f"{path.name}:{node.lineno}: {type(node).__name__} at module level")


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


def test_the_modules_import_each_other_without_a_cycle():
    """Not even a lazy one: an import inside a function still ties the two modules together."""
    graph = {p.stem: package_imports(p) for p in MODULES}
    assert graph["model"] >= {"config", "attention"}  # the parser sees relative imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
