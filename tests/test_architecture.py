"""The shape of the package, read from the source: imports flow one way.

Rules (docs/architecture.md): no import cycles between modules (function-level imports count: they
hide a cycle, they do not remove it); `data`, `models` and `runs` import nothing from `train`,
`evaluate` or `serve`; no module imports another module's `_private` name.

`KNOWN` lists the violations that exist today, each to be removed by the restructuring (issue 14).
The test fails on any violation not listed, and on any listed one that is gone, so the list can
only shrink and always says where the code stands.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src"
PACKAGE = "tunelab"
LOWER_LAYERS = ("tunelab.data", "tunelab.models", "tunelab.runs")
UPPER_LAYERS = ("tunelab.train", "tunelab.evaluate", "tunelab.serve")

KNOWN: set[str] = set()


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / PACKAGE).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _resolve(module: str, node: ast.ImportFrom, modules: dict[str, Path]) -> str:
    if node.level:
        base = module.split(".")
        package = base if modules[module].name == "__init__.py" else base[:-1]
        prefix = package[: len(package) - node.level + 1]
        return ".".join(prefix + ([node.module] if node.module else []))
    return node.module or ""


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Module → the tunelab modules it imports, and every `_private` name imported across modules."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                graph[module] |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, node, modules)
                if target not in modules:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        graph[module].add(sub)
                        continue
                    graph[module].add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__") and target != module:
                        private.append(f"private: {module} imports {target}.{alias.name}")
    for module in graph:
        graph[module].discard(module)
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Each strongly connected component of more than one module (Tarjan's algorithm): every module in
    one imports every other, directly or not."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted("cycle among: " + ", ".join(sorted(c)) for c in components)


def _layer_violations(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"layer: {m} imports {t}"
        for m in sorted(graph)
        if m.startswith(LOWER_LAYERS)
        for t in sorted(graph[m])
        if t.startswith(UPPER_LAYERS)
    ]


def violations() -> set[str]:
    modules = _modules()
    graph, private = _imports(modules)
    return set(_cycles(graph)) | set(_layer_violations(graph)) | set(private)


def test_imports_flow_one_way() -> None:
    found = violations()
    assert sorted(found - KNOWN) == [], "new violations"
    assert sorted(KNOWN - found) == [], "fixed: remove these from KNOWN"


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, ["cycle among: a, b, c"]),
        ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c", "a"}}, ["cycle among: a, b", "cycle among: c, d"]),
        ({"a": {"b"}, "b": set()}, []),
    ],
)
def test_the_cycle_finder_finds_planted_cycles(graph: dict[str, set[str]], expected: list[str]) -> None:
    assert _cycles(graph) == expected


# Functions allowed past 60 lines whatever their body, with the reason in docs/architecture.md.
LONG_BY_DESIGN = {"tunelab.serve.app.create_app"}  # the route table: one nested handler per endpoint


def long_functions() -> list[str]:
    """Functions over 60 lines, unless what makes them long is the signature (a CLI command's option
    declarations) and the body itself is at most 50 lines, or they are listed in LONG_BY_DESIGN."""
    found = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            length = node.end_lineno - node.lineno + 1
            body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
            body_length = node.end_lineno - body[0].lineno + 1
            name = f"{module}.{node.name}"
            if length > 60 and body_length > 50 and name not in LONG_BY_DESIGN:
                found.append(f"{name}: {length} lines")
    return sorted(found)


def test_no_long_functions() -> None:
    assert long_functions() == []
