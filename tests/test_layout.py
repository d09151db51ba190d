"""The package's shape: no import cycles between sublab modules, and a README file map that matches the tree.

Import cycles: every src/sublab/**/*.py is parsed with `ast` (nothing is imported). An edge A -> B is an
import of B that runs when A is imported: module level, class bodies, try/except and if/else included;
imports inside functions (lazy, a legitimate way to break a cycle) and inside `if TYPE_CHECKING:` are not.
`from sublab.pkg import name` points at sublab.pkg.name when that is a module file, else at sublab.pkg.
Every strongly connected component of more than one module is reported with the import lines that close it.

File map: the table under "## File map" in README.md. The first column names one path in backticks, or
several (`scripts/setup.sh`, `quickstart.sh`): later names are relative to the first one's folder. Every
named path must exist, and every .py file under src/sublab except __init__.py must be named by an entry,
itself or through a listed folder.

    pytest tests/test_layout.py -q
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SRC = REPO / "src"
PACKAGE = "sublab"


# ---------------------------------------------------------------------------------------------------------
# Import graph
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One import statement of a module: the module it names (not yet resolved to a file) and where."""

    target: str
    line: int
    lazy: bool
    """True inside a function or an `if TYPE_CHECKING:` block: it does not run when the module is imported."""


def module_files(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (`pkg/__init__.py` is `pkg`)."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` or `if typing.TYPE_CHECKING:`."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _relative_base(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module a relative `from ... import` starts from (`from ..x import y` in a.b.c -> a.x)."""
    package = module if is_package else module.rpartition(".")[0]
    parts = package.split(".")
    if level - 1 >= len(parts):
        raise ValueError(f"relative import beyond the top package in {module}")
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def collect_imports(tree: ast.Module, module: str, is_package: bool) -> list[Import]:
    """Every import in a module's source, absolute, marked lazy when it does not run at import time."""
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _relative_base(module, is_package, node.level, node.module)
            # `from base import name` may name a submodule; resolve_import picks the file later.
            found.extend(Import(f"{base}.{alias.name}", node.lineno, lazy) for alias in node.names)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            for child in ast.iter_child_nodes(node):
                visit(child, True)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, lazy)
        else:
            for child in ast.iter_child_nodes(node):
                visit(child, lazy)

    visit(tree, False)
    return found


def resolve_import(target: str, modules: dict[str, Path]) -> str | None:
    """The module file an import runs: the longest prefix of `target` that is a module of the package
    (`sublab.pkg.name` if that is a module, else `sublab.pkg`); None for imports from outside it."""
    parts = target.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def import_graph(src: Path, package: str) -> dict[str, dict[str, int]]:
    """module -> {imported module -> line} over the imports that run when the module is imported."""
    modules = module_files(src, package)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for imp in collect_imports(tree, name, is_package=path.name == "__init__.py"):
            target = resolve_import(imp.target, modules)
            if imp.lazy or target is None or target == name:
                continue
            graph[name].setdefault(target, imp.line)
    return graph


def strongly_connected_components(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; each component sorted, components in a stable order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return sorted(components)


def describe_cycles(graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> list[str]:
    """One readable paragraph per import cycle: its modules and the import lines inside it."""
    out = []
    for component in strongly_connected_components(graph):
        if len(component) < 2:
            continue
        members = set(component)
        lines = [f"cycle of {len(component)} modules: {', '.join(component)}"]
        for a in component:
            for b, line in sorted(graph[a].items()):
                if b in members:
                    path = modules[a]
                    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
                    lines.append(f"    {a} imports {b}  ({where}:{line})")
        out.append("\n".join(lines))
    return out


def test_import_graph_helpers_on_a_small_package(tmp_path: Path) -> None:
    """The checker itself: a real cycle is found; lazy, TYPE_CHECKING and outside imports are not edges."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import os\nfrom pkg.sub import b\n",
        "sub/__init__.py": "from . import b\n",
        "sub/b.py": "from ..a import thing\n",
        "c.py": "def f():\n    import pkg.d\n",
        "d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.c\nelse:\n    import json\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text)
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b": 2}
    assert graph["pkg.sub"] == {"pkg.sub.b": 1}
    assert graph["pkg.sub.b"] == {"pkg.a": 1}
    assert graph["pkg.c"] == {} and graph["pkg.d"] == {}
    cycles = [c for c in strongly_connected_components(graph) if len(c) > 1]
    assert cycles == [["pkg.a", "pkg.sub.b"]]
    (report,) = describe_cycles(graph, module_files(tmp_path, "pkg"))
    assert "pkg.sub.b imports pkg.a" in report and "b.py:1" in report


def test_no_import_cycles() -> None:
    cycles = describe_cycles(import_graph(SRC, PACKAGE), module_files(SRC, PACKAGE))
    assert not cycles, (
        "import cycles between sublab modules (move the shared code into a module both can import, or "
        "import lazily inside the function that needs it):\n" + "\n".join(cycles)
    )


# ---------------------------------------------------------------------------------------------------------
# README file map
# ---------------------------------------------------------------------------------------------------------


def file_map_entries(readme: str, heading: str = "## File map") -> list[list[str]]:
    """The backticked names of each first cell of the table under `heading`, in table order."""
    lines = readme.splitlines()
    if heading not in (line.strip() for line in lines):
        raise AssertionError(f"README.md has no {heading!r} heading")
    start = [line.strip() for line in lines].index(heading) + 1
    rows: list[str] = []
    for line in lines[start:]:
        stripped = line.strip()
        if stripped.startswith("|"):
            rows.append(stripped)
        elif rows or stripped.startswith("#"):
            break  # the table ended, or the section ended without one
    if len(rows) < 3:
        raise AssertionError(f"no table with entries under {heading!r} in README.md")
    entries = []
    for row in rows[2:]:  # skip the header and the |---|---| line
        first_cell = row.strip("|").split("|")[0]
        names = re.findall(r"`([^`]+)`", first_cell)
        if names:
            entries.append(names)
    return entries


def entry_paths(names: list[str]) -> list[str]:
    """Repository-relative paths of one entry: later names are relative to the first one's folder.

    >>> entry_paths(["scripts/setup.sh", "quickstart.sh"])
    ['scripts/setup.sh', 'scripts/quickstart.sh']
    >>> entry_paths(["src/sublab/serve/"])
    ['src/sublab/serve/']
    """
    first, rest = names[0], names[1:]
    folder = first.rstrip("/") if first.endswith("/") else first.rpartition("/")[0]
    prefix = f"{folder}/" if folder else ""
    return [first] + [name if name.startswith(prefix) else prefix + name for name in rest]


def file_map_paths(repo: Path) -> list[str]:
    """Every path the README's file map names, repository-relative, in table order."""
    readme = (repo / "README.md").read_text(encoding="utf-8")
    return [path for names in file_map_entries(readme) for path in entry_paths(names)]


def uncovered_sources(repo: Path, mapped: list[str], package_dir: str = "src/sublab") -> list[str]:
    """.py files under package_dir (except __init__.py) that no entry names, itself or through a folder."""
    files = {p for p in mapped if not p.endswith("/") and not (repo / p).is_dir()}
    folders = [p.rstrip("/") + "/" for p in mapped if p.endswith("/") or (repo / p).is_dir()]
    missing = []
    for path in sorted((repo / package_dir).rglob("*.py")):
        rel = path.relative_to(repo).as_posix()
        if path.name == "__init__.py" or rel in files or any(rel.startswith(f) for f in folders):
            continue
        missing.append(rel)
    return missing


def test_file_map_helpers() -> None:
    readme = (
        "# x\n\n## File map\n\n| file | what it is |\n|---|---|\n"
        "| `src/a.py` | a |\n| `scripts/setup.sh`, `test.sh` | b |\n| `src/pkg/` | c |\n\n## Next\n"
        "| `not/in/the/map.py` | d |\n"
    )
    entries = file_map_entries(readme)
    assert entries == [["src/a.py"], ["scripts/setup.sh", "test.sh"], ["src/pkg/"]]
    assert [p for e in entries for p in entry_paths(e)] == [
        "src/a.py",
        "scripts/setup.sh",
        "scripts/test.sh",
        "src/pkg/",
    ]
    with pytest.raises(AssertionError, match="no '## File map' heading"):
        file_map_entries("# x\n| `a.py` | a |\n")


def test_file_map_paths_exist() -> None:
    missing = [
        p
        for p in file_map_paths(REPO)
        if not (REPO / p).exists() or (p.endswith("/") and not (REPO / p).is_dir())
    ]
    assert not missing, "README.md's file map names paths that do not exist:\n    " + "\n    ".join(missing)


def test_file_map_covers_every_module() -> None:
    uncovered = uncovered_sources(REPO, file_map_paths(REPO))
    assert not uncovered, (
        "modules missing from README.md's file map (add a row, or list their folder):\n    "
        + "\n    ".join(uncovered)
    )
