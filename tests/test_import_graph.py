"""The architecture as imports: the core imports no adapter and no ecosystem library; adapters form no circle.

Every import counts, including those inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "sae_selfexplain_plugin"
ADAPTERS = ROOT / "adapters"
ADAPTER_PACKAGE = "sae_selfexplain_plugin.adapters"


def imported_modules(path: Path, package: str) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved against `package`)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import x` names a module
    return names


def adapter_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in ADAPTERS.glob("*.py") if p.stem != "__init__"}
    graph = {}
    for name, path in modules.items():
        deps = {m.removeprefix(ADAPTER_PACKAGE + ".").split(".")[0] for m in imported_modules(path, ADAPTER_PACKAGE)
                if m.startswith(ADAPTER_PACKAGE + ".")}  # fmt: skip
        graph[name] = (deps & modules.keys()) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_adapters_import_graph_has_no_circle():
    graph = adapter_graph()
    assert "sae_lens" in graph and "nnsight" in graph  # the parse found the modules it should
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_imports_no_adapter_and_no_ecosystem_library():
    libraries = {"sae_lens", "nnsight", "transformer_lens", "transformers"}
    for path in CORE.glob("*.py"):
        imported = imported_modules(path, "sae_selfexplain_plugin")
        bad = {m for m in imported if m.split(".")[0] in libraries or m.startswith(ADAPTER_PACKAGE)}
        assert not bad, f"{path.name} imports {sorted(bad)}"
