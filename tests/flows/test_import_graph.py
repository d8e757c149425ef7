"""flows' modules import each other without a cycle, counting imports inside functions too (a lazy
import hides a cycle from Python, not from a reader), and none is over about 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

FLOWS = Path(__file__).resolve().parents[2] / "flows"


def module_files() -> dict[str, Path]:
    out = {}
    for path in FLOWS.rglob("*.py"):
        parts = list(path.relative_to(FLOWS.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the flows modules it imports; `from flows.x import name` counts as flows.x.name when
    that is a module, else flows.x."""
    def known(name: str) -> str:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in modules else ""

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges |= {known(a.name) for a in node.names if a.name.split(".")[0] == "flows"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                if base.split(".")[0] == "flows":
                    edges |= {known(f"{base}.{a.name}") or known(base) for a in node.names}
        graph[name] = edges - {name, ""}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
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

    return next((c for n in sorted(graph) if (c := visit(n))), None)


def test_the_graph_sees_lazy_imports_and_finds_cycles():
    graph = import_graph(module_files())
    assert "flows.submit" in graph["flows.__main__"]  # imported only inside cmd_submit
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]


def test_flows_has_no_import_cycle():
    assert find_cycle(import_graph(module_files())) is None


def test_no_module_is_much_over_400_lines():
    long = {name: n for name, path in module_files().items() if (n := len(path.read_text().splitlines())) > 420}
    assert not long, f"split these modules: {long}"
