"""The package's layering, read from the source with ``ast`` (nothing is imported).

- the import graph of ``nmoe_flwr`` has no cycles;
- ``algorithms/`` and ``data/`` reach neither ``flwr`` nor ``grpc``, directly or
  through the modules they import (they run where Flower is not installed);
- ``inference/`` reaches no ``flwr`` (a device serves its expert without it);
- nothing outside ``cli/`` imports ``nmoe_flwr.cli``;
- the package root holds about ten modules, and every folder's ``__init__``
  says what lives there and what may import it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "nmoe_flwr"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names), at any depth of the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            out.add(root)
            # "from . import x" / "from .algorithms import fedce" name submodules.
            out.update(f"{root}.{a.name}" for a in node.names)
    return out


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}
GRAPH = {m: {i for i in imports_of(p) if i in MODULES and i != m} for m, p in MODULES.items()}
EXTERNAL = {m: {i.split(".")[0] for i in imports_of(p) if not i.startswith("nmoe_flwr")} for m, p in MODULES.items()}


def reachable(start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in GRAPH[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_the_graph_is_read():
    """The parser sees the edges it must (guards every other test here against reading nothing)."""
    assert "nmoe_flwr.algorithms.training" in GRAPH["nmoe_flwr.algorithms.fedce"]
    assert "nmoe_flwr.pipelines.nmoe" in GRAPH["nmoe_flwr.server_app"]
    assert "flwr" in EXTERNAL["nmoe_flwr.client_app"]


def test_no_import_cycles():
    """Depth-first search over package-internal imports finds no back edge.

    A package's ``__init__`` counts as importing what it re-exports: a
    module that imports ``nmoe_flwr.data`` runs all of ``data/__init__``.
    """
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(GRAPH[m]):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])
    assert cycles == []


@pytest.mark.parametrize("layer, banned", [
    ("nmoe_flwr.algorithms", {"flwr", "grpc", "grpc_health"}),
    ("nmoe_flwr.data", {"flwr", "grpc", "grpc_health"}),
    ("nmoe_flwr.inference", {"flwr"}),
])
def test_layer_reaches_no_banned_package(layer, banned):
    """Every module the layer imports, transitively, stays free of the banned packages."""
    offenders = {}
    for m in (m for m in MODULES if m == layer or m.startswith(layer + ".")):
        for dep in reachable(m):
            hit = EXTERNAL[dep] & banned
            if hit:
                offenders[f"{m} -> {dep}"] = sorted(hit)
    assert offenders == {}


def test_nothing_outside_cli_imports_cli():
    importers = sorted(
        m for m, deps in GRAPH.items()
        if not m.startswith("nmoe_flwr.cli") and any(d == "nmoe_flwr.cli" or d.startswith("nmoe_flwr.cli.") for d in deps)
    )
    assert importers == []


def test_package_root_holds_about_ten_modules():
    root = sorted(p.name for p in PKG.glob("*.py"))
    assert len(root) <= 11, root


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in PKG.glob("*/__init__.py")))
def test_every_folder_says_what_lives_there_and_who_may_import_it(folder):
    doc = ast.get_docstring(ast.parse((PKG / folder / "__init__.py").read_text())) or ""
    assert len(doc.split()) >= 30, doc
    assert "import" in doc.lower(), doc  # the import rule is stated
