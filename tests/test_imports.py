"""The package's modules: no two import each other in a circle (function-level imports included), and each imports
on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "qlora_rft"


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file, for every module and subpackage of `package`."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that `name` imports anywhere in its file (in functions too; not under TYPE_CHECKING):
    `from pkg import sub` counts as an import of the submodule `pkg.sub`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def module_of(dotted: str) -> str | None:  # the longest package module that `dotted` names or lies in
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    found = set()
    todo = [ast.parse(path.read_text())]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and _type_checking(node):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.update(module_of(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.update(module_of(f"{base}.{alias.name}") if f"{base}.{alias.name}" in modules else module_of(base)
                         for alias in node.names)
    return found - {None, name}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports, as [a, b, ..., a], or None when the graph has none."""
    done, path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return None
        path.append(node)
        for after in sorted(graph.get(node, ())):
            if cycle := visit(after):
                return cycle
        path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        if cycle := visit(start):
            return cycle
    return None


def test_find_cycle_names_the_circle_and_passes_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_imports_in_functions_and_submodules_but_not_type_checking_ones(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from pkg.b import g\n")
    (pkg / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
                              "from pkg.sub import leaf\n")
    (pkg / "c.py").write_text("from . import a\nfrom .sub.leaf import x\n")
    (pkg / "sub" / "__init__.py").write_text("import os\n")
    (pkg / "sub" / "leaf.py").write_text("from .. import b\n")
    assert import_graph(pkg) == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.leaf"},
                                 "pkg.c": {"pkg.a", "pkg.sub.leaf"}, "pkg.sub": set(), "pkg.sub.leaf": {"pkg.b"}}
    assert find_cycle(import_graph(pkg)) == ["pkg.b", "pkg.sub.leaf", "pkg.b"]


def test_no_module_of_the_package_imports_another_in_a_circle():
    graph = import_graph()
    assert {"qlora_rft.trainer", "qlora_rft.sft", "qlora_rft.run"} <= graph.keys()
    assert "qlora_rft.run" in graph["qlora_rft.sft"]  # the graph is read, not empty
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _import_alone(name: str) -> str | None:
    """None when `import name` works in a fresh interpreter, else the last line of its error."""
    done = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)}, timeout=300)
    return None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["no output"])[-1]


@pytest.mark.slow  # one interpreter per module, most of them loading torch
def test_each_module_imports_alone_in_a_fresh_interpreter():
    names = [n for n in package_modules() if n != "qlora_rft.__main__"]  # importing __main__ runs the CLI
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        errors = dict(zip(names, pool.map(_import_alone, names)))
    failed = {name: error for name, error in errors.items() if error is not None}
    assert not failed, "\n".join(f"{name}: {error}" for name, error in failed.items())
