"""The house's rules of layout, held by a test: room sizes, module and function lengths, the import graph.

Read from the source with ast (nothing is imported but capsspec itself, for its __all__):
- capsspec/ has at most 12 files at its root; no module outside tests/ is over 700 lines; no
  function in capsspec/, backends/ or conformance/ is over 80 lines;
- no import cycle among capsspec/, backends/ (capsspec.backends) and conformance/
  (capsspec.conformance), counting imports inside functions too (a function-level import that
  dodges a cycle at import time is still a cycle of the design);
- the longest chain of imports inside capsspec/ is at most 7 modules deep;
- imports run one way: the root of capsspec/ (the spec) imports neither capsspec.training nor
  capsspec.tools, and capsspec.training does not import capsspec.tools.
Each rule is a small function on plain data, shown to fail on a small synthetic case.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject.toml's package-dir).
PACKAGES = {"capsspec": "capsspec", "backends": "capsspec.backends", "conformance": "capsspec.conformance"}
MAX_ROOT_FILES = 12
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 80
MAX_IMPORT_DEPTH = 7


# ===================================================================================== the rules, on plain data
def module_name(path: Path, folder: str) -> str:
    """capsspec/tools/cli.py -> capsspec.tools.cli; backends/torch/__init__.py -> capsspec.backends.torch."""
    parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGES[folder], *parts])


def imported_modules(source: str, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that `module`'s source imports, anywhere in it (functions included), with
    relative imports resolved; `from M import n` counts M.n when that is a module, else M."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(source)
    # `if TYPE_CHECKING:` imports are for annotations only: they never run, so they make no edge.
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                 for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:  # `import a.b.attr`-like names: the nearest module that exists
                t = t.rpartition(".")[0]
            if t and t != module:
                found.add(t)
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles of graph until none is left: each one found, then one of its edges set aside."""
    graph = {n: set(ts) for n, ts in graph.items()}
    cycles = []
    while (cycle := find_cycle(graph)) is not None:
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest chain of imports a -> b -> ... (modules, in order) of an acyclic graph (a walk that meets
    its own path again stops there: find_cycle reports cycles)."""
    best: dict[str, list[str]] = {}

    def chain(n: str, path: frozenset[str]) -> list[str]:
        if n not in best:
            tails = [chain(m, path | {n}) for m in sorted(graph.get(n, ())) if m not in path and m != n]
            best[n] = [n] + max(tails, key=len, default=[])
        return best[n]

    return max((chain(n, frozenset()) for n in sorted(graph)), key=len, default=[])


def long_functions(source: str, limit: int) -> list[tuple[str, int]]:
    """(name, lines) of every function or method of source longer than limit lines (its def to its last line)."""
    return [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(source))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > limit]


def wrong_way_imports(graph: dict[str, set[str]], root_modules: set[str]) -> list[str]:
    """Imports against the rooms' direction: root spec <- training <- tools."""
    bad = []
    for a, targets in sorted(graph.items()):
        for b in sorted(targets):
            to_upper = b.startswith(("capsspec.training", "capsspec.tools"))
            if (a in root_modules and to_upper) or (a.startswith("capsspec.training") and
                                                    b.startswith("capsspec.tools")):
                bad.append(f"{a} imports {b}")
    return bad


# ===================================================================================== the house as it is
def _sources() -> dict[str, tuple[Path, str]]:
    """Every module of capsspec/, backends/ and conformance/: name -> (path, source)."""
    found = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[module_name(path, folder)] = (path, path.read_text(encoding="utf-8"))
    return found


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    known = set(sources)
    return {m: imported_modules(src, m, path.name == "__init__.py", known) for m, (path, src) in sources.items()}


# `python -m capsspec`: the program's entry, which imports the command line (capsspec.tools.cli) and is
# imported by nothing. It sits at the root by the layout's rule, but it is the top of the house, not the
# spec: the rooms' direction and the depth of the import chains are of the modules below it.
PROGRAM = "capsspec.__main__"


def _inside_capsspec(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph of the modules whose files are under capsspec/ (backends and conformance are installed
    under capsspec. but live elsewhere), the program's entry aside."""
    inside = {m for m in graph if _module_folder(m) == "capsspec" and m != PROGRAM}
    return {m: graph[m] & inside for m in inside}


def test_the_root_of_capsspec_holds_at_most_12_files():
    files = sorted(p.name for p in (ROOT / "capsspec").iterdir() if p.is_file() and p.suffix != ".pyc")
    assert len(files) <= MAX_ROOT_FILES, f"capsspec/ has {len(files)} files at its root: {files}"


def test_no_module_outside_tests_is_over_700_lines():
    skip = {"tests", ".git", "__pycache__", ".venv", "venv", "site", "build", "dist"}
    long = {}
    for path in sorted(ROOT.rglob("*.py")):
        if not skip.intersection(path.relative_to(ROOT).parts):
            n = len(path.read_text(encoding="utf-8").splitlines())
            if n > MAX_MODULE_LINES:
                long[str(path.relative_to(ROOT))] = n
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_80_lines():
    long = {}
    for m, (path, src) in _sources().items():
        for name, n in long_functions(src, MAX_FUNCTION_LINES):
            long[f"{path.relative_to(ROOT)}:{name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_no_import_cycle(folder):
    # One test per folder: a cycle fails the test of every folder it passes through.
    cycles = [c for c in all_cycles(_graph()) if any(_module_folder(m) == folder for m in c)]
    assert not cycles, f"import cycles through {folder}/: " + "; ".join(" -> ".join(c) for c in cycles)


def _module_folder(module: str) -> str:
    for folder in ("backends", "conformance"):
        if module == PACKAGES[folder] or module.startswith(PACKAGES[folder] + "."):
            return folder
    return "capsspec"


def test_the_import_chains_inside_capsspec_are_at_most_7_modules_deep():
    inside = _inside_capsspec(_graph())
    chain = longest_chain(inside)
    assert len(chain) <= MAX_IMPORT_DEPTH, (f"the longest import chain inside capsspec/ is {len(chain)} modules "
                                            f"deep: {' -> '.join(chain)}")
    print(f"longest import chain inside capsspec/: {len(chain)}: {' -> '.join(chain)}")


def test_imports_run_one_way_spec_then_training_then_tools():
    graph = _graph()
    root_modules = {module_name(p, "capsspec") for p in (ROOT / "capsspec").glob("*.py")} - {PROGRAM}
    bad = wrong_way_imports(graph, root_modules)
    assert not bad, f"imports against the rooms' direction: {bad}"


def test_every_name_in_capsspec_all_imports():
    import capsspec

    missing = []
    for name in capsspec.__all__:
        try:
            exec(f"from capsspec import {name}", {})
        except ImportError as exc:
            missing.append(f"{name}: {exc}")
    assert not missing and len(set(capsspec.__all__)) == len(capsspec.__all__), missing


# ===================================================================================== each rule can fail
def test_a_cycle_is_found_and_an_acyclic_graph_passes():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
    assert all_cycles({"a": {"b"}, "b": {"a", "c"}, "c": {"b"}}) == [["a", "b", "a"], ["b", "c", "b"]]


def test_function_level_and_relative_imports_make_edges():
    known = {"p", "p.a", "p.b", "p.sub", "p.sub.c"}
    src = "from . import a\ndef f():\n    from .sub import c\n    from ..b import thing\n    import p.sub.c.attr\n"
    assert imported_modules(src, "p.sub.d", False, known) == {"p.sub", "p.b", "p.sub.c"}
    assert imported_modules("from . import a\nfrom .sub.c import x\n", "p", True, known) == {"p.a", "p.sub.c"}
    typing_only = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import a\nelse:\n    from . import b\n"
    assert imported_modules(typing_only, "p.c", False, known) == {"p.b"}
    # a cycle through a function-level import is a cycle
    graph = {"p.a": imported_modules("def f():\n    from . import b\n", "p.a", False, known),
             "p.b": imported_modules("from .a import x\n", "p.b", False, known)}
    assert find_cycle(graph) == ["p.a", "p.b", "p.a"]


def test_the_longest_chain_is_counted_in_modules():
    graph = {"a": {"b", "x"}, "b": {"c"}, "c": {"d"}, "x": set(), "d": set()}
    assert longest_chain(graph) == ["a", "b", "c", "d"]
    assert len(longest_chain({f"m{i}": {f"m{i + 1}"} for i in range(8)})) == 9 > MAX_IMPORT_DEPTH


def test_a_long_function_is_found():
    body = "\n".join(f"        x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    src = f"def short():\n    pass\n\nclass K:\n    def long(self):\n{body}\n"
    assert long_functions(src, MAX_FUNCTION_LINES) == [("long", MAX_FUNCTION_LINES + 1)]


def test_an_import_against_the_rooms_is_found():
    graph = {"capsspec.ops": {"capsspec.training.train"}, "capsspec.training.train": {"capsspec.tools.cli"},
             "capsspec.tools.cli": {"capsspec.training.train", "capsspec.ops"}}
    assert wrong_way_imports(graph, {"capsspec.ops"}) == ["capsspec.ops imports capsspec.training.train",
                                                          "capsspec.training.train imports capsspec.tools.cli"]
