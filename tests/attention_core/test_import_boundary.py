"""attention_core imports only torch, safetensors and the standard library, and does nothing on import."""

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
