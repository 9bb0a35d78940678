"""The shape of the code, measured from the source with ``ast`` (nothing imported or run):
parameters per public function, line lengths, the import graph.

Text-to-image and the web app (``lpd/text``, ``lpd/app``, ``lpd/demo/t2i*``) count as their own
group under the same rules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LPD = Path(__file__).resolve().parents[1] / "lpd"
MAX_PARAMS, MAX_COLUMNS, MAX_LONG_SHARE = 10, 100, 0.05


def _apart(path: Path) -> bool:
    rel = path.relative_to(LPD)
    return (
        rel.parts[0] in ("text", "app") or rel.parts[:1] == ("demo",) and rel.name.startswith("t2i")
    )


def modules(apart: bool) -> list[Path]:
    """The modules of the core library (``apart`` False) or of the text-to-image and app group."""
    return sorted(p for p in LPD.rglob("*.py") if _apart(p) == apart)


def public_functions(tree: ast.Module) -> list[tuple[str, int]]:
    """(name, parameter count) of every public function and method (``self``/``cls`` not counted,
    ``*args`` and ``**kwargs`` one each) of public classes, ``__init__`` and ``__call__`` included."""
    out = []

    def visit(node: ast.AST, prefix: str, in_class: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef) and not child.name.startswith("_"):
                visit(child, f"{prefix}{child.name}.", True)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if child.name.startswith("_") and child.name not in ("__init__", "__call__"):
                    continue
                a = child.args
                positional = [*a.posonlyargs, *a.args]
                n = len(positional) + len(a.kwonlyargs) + (a.vararg is not None)
                n += a.kwarg is not None
                n -= bool(in_class and positional and positional[0].arg in ("self", "cls"))
                out.append((prefix + child.name, n))

    visit(tree, "", False)
    return out


def test_the_parameter_counter_counts_as_documented():
    tree = ast.parse(
        "def f(a, b=1, *c, d, **e): pass\n"
        "def _hidden(a, b, c, d, e, f, g, h, i, j, k): pass\n"
        "class K:\n"
        "    def m(self, x, /, y, *, z): pass\n"
        "    @classmethod\n"
        "    def c(cls, x): pass\n"
        "    def __init__(self, a): pass\n"
        "class _P:\n"
        "    def m(self, a, b, c, d, e, f, g, h, i, j, k): pass\n"
    )
    assert public_functions(tree) == [("f", 5), ("K.m", 3), ("K.c", 1), ("K.__init__", 1)]


def test_no_public_function_of_the_library_takes_more_than_10_parameters():
    too_many = [
        f"{path.relative_to(LPD.parent)}:{name} ({n})"
        for path in modules(apart=False) + modules(apart=True)
        for name, n in public_functions(ast.parse(path.read_text(encoding="utf-8")))
        if n > MAX_PARAMS
    ]
    assert not too_many, f"more than {MAX_PARAMS} parameters: group them in a config object"


@pytest.mark.parametrize("apart", [False, True], ids=["core", "text-to-image and app"])
def test_at_most_5_percent_of_the_lines_exceed_100_columns(apart):
    lines = [line for p in modules(apart) for line in p.read_text(encoding="utf-8").splitlines()]
    long = sum(len(line) > MAX_COLUMNS for line in lines)
    assert lines and long <= MAX_LONG_SHARE * len(lines), f"{long} of {len(lines)} lines"


ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------- import graph

MAX_LAYERS = 7  # the longest chain of imports (entry points and the app included)
CONSUMERS = ("lpd.demo", "lpd.app")  # they use the library; only the app uses the demo


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*patterns: str) -> dict[str, Path]:
    return {_module(p): p for pattern in patterns for p in sorted(ROOT.glob(pattern))}


def _imports(source: str, name: str, package: str, nodes: set[str]) -> set[str]:
    """The modules of ``nodes`` that the code of module ``name`` imports, functions included."""
    targets = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in nodes else base for a in node.names
            ]
        else:
            continue
        for target in found:
            if name.startswith("benchmarks.") and f"{package}.{target}" in nodes:
                target = f"{package}.{target}"  # benchmarks import each other by bare name
            while target and target not in nodes:  # lpd.models.LPD -> lpd.models
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules it imports, over ``lpd/``, the entry points and ``benchmarks/``."""
    nodes = _sources("lpd/**/*.py", "main_*.py", "benchmarks/**/*.py")
    return {
        name: _imports(
            path.read_text(encoding="utf-8"),
            name,
            name if path.name == "__init__.py" else name.rpartition(".")[0],
            set(nodes),
        )
        for name, path in nodes.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle once: a path that returns to its start."""
    state, stack, found = {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def _layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """The floor of each module of an acyclic graph: 1 + the highest floor it imports."""
    floors: dict[str, int] = {}

    def floor(node: str) -> int:
        if node not in floors:
            floors[node] = 1 + max((floor(t) for t in graph[node]), default=0)
        return floors[node]

    for node in graph:
        floor(node)
    return floors


def test_the_import_graph_has_no_circle_and_few_layers():
    graph = import_graph()
    assert {"lpd.files", "lpd.export", "main_eval", "benchmarks.bench_common"} <= set(graph)
    assert "lpd.files" in graph["lpd.models"] and "lpd.hub" in graph["lpd.models"]
    assert _cycles(graph) == []
    floors = _layers(graph)
    top = max(floors, key=floors.get)
    assert floors[top] <= MAX_LAYERS, f"{top} stands on {floors[top]} layers"
    # no import runs back up: every module stands above all that it imports
    assert all(floors[a] > floors[b] for a in graph for b in graph[a])


def test_file_helpers_are_the_ground_floor():
    graph = import_graph()
    assert graph["lpd.files"] == set()
    assert not {m for m in graph["lpd.hub"] if m != "lpd.files"}


def test_the_measure_sees_imports_inside_functions_and_circles():
    tree = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(tree) == [["a", "b", "c", "a"]]
    assert _layers({"a": {"b"}, "b": {"c"}, "c": set()}) == {"a": 3, "b": 2, "c": 1}
    code = "import lpd.b\nfrom . import c\ndef f():\n    from lpd.d import x, e\n    import os\n"
    nodes = {"lpd.a", "lpd.b", "lpd.c", "lpd.d", "lpd.d.e"}
    assert _imports(code, "lpd.a", "lpd", nodes) == {"lpd.b", "lpd.c", "lpd.d", "lpd.d.e"}


def test_the_library_imports_nothing_from_its_demo():
    graph = import_graph()
    leaning = sorted(
        f"{a} -> {b}"
        for a in graph
        for b in graph[a]
        if b.startswith("lpd.demo") and a.startswith("lpd") and not a.startswith(CONSUMERS)
    )
    assert leaning == []


def test_no_private_name_is_imported_from_another_module():
    """``from lpd.x import _name`` (or from an entry point or benchmark) nowhere, tests included."""
    ours = ("lpd", "main_", "bench_")
    files = _sources("lpd/**/*.py", "*.py", "benchmarks/**/*.py", "scripts/**/*.py", "tests/*.py")
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}: from {node.module} import {alias.name}"
        for path in files.values()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(ours)
        for alias in node.names
        if alias.name.startswith("_") and not alias.name.startswith("__")
    ]
    assert found == []
