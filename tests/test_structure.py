"""The shape of the library: parameters per public function, line lengths.

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
        for path in modules(apart=False)
        for name, n in public_functions(ast.parse(path.read_text(encoding="utf-8")))
        if n > MAX_PARAMS
    ]
    assert not too_many, f"more than {MAX_PARAMS} parameters: group them in a config object"


@pytest.mark.parametrize("apart", [False, True], ids=["core", "text-to-image and app"])
def test_at_most_5_percent_of_the_lines_exceed_100_columns(apart):
    lines = [line for p in modules(apart) for line in p.read_text(encoding="utf-8").splitlines()]
    long = sum(len(line) > MAX_COLUMNS for line in lines)
    assert lines and long <= MAX_LONG_SHARE * len(lines), f"{long} of {len(lines)} lines"
