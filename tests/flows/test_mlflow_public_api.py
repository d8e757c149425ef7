"""flows/ uses MLflow's public API only: no import of, or attribute path through, a private MLflow module.

A private module (`mlflow.tracking._tracking_service`, ...) or name (`from mlflow.x import _y`) can
change in any MLflow release; the registry reaches MLflow through `MlflowClient` and documented
functions with an explicit tracking URI instead. Checked by parsing every module, not by importing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "flows"
MODULES = sorted(PACKAGE.rglob("*.py"))


def private_mlflow_uses(tree: ast.Module) -> list[str]:
    """Dotted MLflow paths with a `_private` part: in imports, and in attribute chains like mlflow.x._y."""
    def private(dotted: str) -> bool:
        parts = dotted.split(".")
        return parts[0] == "mlflow" and any(p.startswith("_") for p in parts[1:])

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if private(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [f"{node.module}.{a.name}" for a in node.names if private(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute):
            parts, inner = [node.attr], node.value
            while isinstance(inner, ast.Attribute):
                parts.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and private(".".join([inner.id, *reversed(parts)])):
                found.append(".".join([inner.id, *reversed(parts)]))
    return found


@pytest.mark.parametrize("source, expected", [
    ("from mlflow.tracking._tracking_service import utils", ["mlflow.tracking._tracking_service.utils"]),
    ("import mlflow.store._unity_catalog", ["mlflow.store._unity_catalog"]),
    ("from mlflow.store.artifact.utils.models import _parse_model_uri",
     ["mlflow.store.artifact.utils.models._parse_model_uri"]),
    ("import mlflow\nmlflow.tracking._tracking_service.utils._tracking_uri",
     ["mlflow.tracking._tracking_service.utils._tracking_uri", "mlflow.tracking._tracking_service.utils",
      "mlflow.tracking._tracking_service"]),
    ("import mlflow.pyfunc\nfrom mlflow.tracking import MlflowClient\nmlflow.pyfunc.save_model", []),
    ("from ._private import x\nimport other._private", []),
])
def test_the_check_finds_private_paths(source, expected):
    assert private_mlflow_uses(ast.parse(source)) == expected


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_flows_uses_no_private_mlflow_api(path):
    uses = private_mlflow_uses(ast.parse(path.read_text(), filename=str(path)))
    assert not uses, f"{path.relative_to(PACKAGE)} uses private MLflow API: {uses}"


def test_models_registered_before_the_registry_package_still_find_their_class():
    """Their stored _pyfunc_entry.py runs `from flows.mlflow_model import AttentionLM` at load time."""
    from flows.mlflow_model import AttentionLM
    from flows.registry.pyfunc import AttentionLM as current

    assert AttentionLM is current
