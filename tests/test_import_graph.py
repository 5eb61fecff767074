"""The architecture as imports: the core imports no adapter and no ecosystem library; adapters form no circle,
and each of their roles (backends, sae_lens, neuronpedia, apps, cli) imports only the roles below it.

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


def module_name(path: Path) -> str:
    """`backends.nnsight` for adapters/backends/nnsight.py, `sae_lens` for adapters/sae_lens/__init__.py."""
    parts = path.relative_to(ADAPTERS).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def adapter_graph() -> dict[str, set[str]]:
    """Every adapters module (sub-packages by their dotted names) -> the adapters modules it imports."""
    modules = {module_name(p): p for p in ADAPTERS.rglob("*.py") if p != ADAPTERS / "__init__.py"}
    graph = {}
    for name, path in modules.items():
        package = (
            f"{ADAPTER_PACKAGE}.{name}" if path.name == "__init__.py" else f"{ADAPTER_PACKAGE}.{name}".rsplit(".", 1)[0]
        )
        deps = set()
        for m in imported_modules(path, package):
            if m.startswith(ADAPTER_PACKAGE + "."):
                dotted = m.removeprefix(ADAPTER_PACKAGE + ".")
                while dotted and dotted not in modules:  # `from .x import name` also names x.name
                    dotted = dotted.rpartition(".")[0]
                if dotted:
                    deps.add(dotted)
        graph[name] = deps - {name}
    return graph


def layer(module: str) -> str:
    """The role of an adapters module: its sub-package, or the module itself (neuronpedia, a deprecated alias)."""
    return module.split(".")[0]


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
    assert {"sae_lens.method", "backends.nnsight", "cli", "apps.whole_sae"} <= graph.keys()  # the parse found them
    assert "backends.transformers" in graph["backends.nnsight"]  # and their imports
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


# Which roles each role may import (besides its own modules): the layers of the architecture, bottom up.
ALLOWED = {
    "backends": set(),
    "neuronpedia": set(),
    "sae_lens": {"backends"},
    "apps": {"backends", "sae_lens", "neuronpedia"},
    "cli": {"backends", "sae_lens", "neuronpedia", "apps"},
}
DEPRECATED_ALIASES = {"embedded", "transformers", "nnsight", "demo_sae"}  # old import paths, until 0.3


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """`module -> dependency` for every import of a role that ALLOWED does not allow that module's role."""
    found = []
    for module, deps in sorted(graph.items()):
        if layer(module) in DEPRECATED_ALIASES:
            continue
        found += [f"{module} -> {d}" for d in sorted(deps) if layer(d) not in ALLOWED[layer(module)] | {layer(module)}]
    return found


def test_each_layer_imports_only_the_layers_below_it():
    graph = adapter_graph()
    roles = {layer(m) for m in graph} - DEPRECATED_ALIASES
    assert roles == set(ALLOWED), f"a new role {roles - set(ALLOWED)} needs its place in ALLOWED"
    assert upward_imports(graph) == []


def test_the_layer_check_catches_an_upward_import():
    graph = {"backends.x": {"apps.y"}, "apps.y": {"backends.x"}, "cli": {"apps.y"}, "sae_lens.z": {"cli"}}
    assert upward_imports(graph) == ["backends.x -> apps.y", "sae_lens.z -> cli"]


def test_the_core_imports_no_adapter_and_no_ecosystem_library():
    libraries = {"sae_lens", "nnsight", "transformer_lens", "transformers"}
    paths = sorted(CORE.rglob("*.py"))
    assert CORE / "direction_adapter" / "training.py" in paths  # sub-packages of the core are checked too
    for path in paths:
        package = ".".join(("sae_selfexplain_plugin", *path.relative_to(CORE).parent.parts))
        imported = imported_modules(path, package)
        bad = {m for m in imported if m.split(".")[0] in libraries or m.startswith(ADAPTER_PACKAGE)}
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_old_import_paths_still_work_with_a_warning():
    import importlib
    import sys

    import pytest

    for old, new in (("embedded", "backends.embedded"), ("transformers", "backends.transformers"),
                     ("nnsight", "backends.nnsight"), ("demo_sae", "apps.demo_sae")):  # fmt: skip
        sys.modules.pop(f"{ADAPTER_PACKAGE}.{old}", None)
        with pytest.warns(DeprecationWarning, match=f"moved to {ADAPTER_PACKAGE}.{new}"):
            module = importlib.import_module(f"{ADAPTER_PACKAGE}.{old}")
        assert module is importlib.import_module(f"{ADAPTER_PACKAGE}.{new}")
