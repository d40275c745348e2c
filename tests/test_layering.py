"""Imports go one way, down the data flow: raw data -> planning -> the planned dataset -> models and
losses -> inference -> evaluation -> training. A module may import its own layer and the layers before
it, never one after it, so a newcomer can follow one case from NIfTI to Dice in order.

Training (the LightningModule and its logging) comes last on purpose: its validation runs the same
sliding-window inference and the same metrics as prediction and evaluation, and neither of those
imports Lightning (prediction starts without it)."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "pancreas_mtl"
# The layers, in order, as the packages below pancreas_mtl (and the few general helper modules at its root)
LAYERS = [
    ("helpers", {"files", "config", "devices", "tables", "output_guard"}),
    ("raw data", {"raw", "synthetic"}),
    ("planning", {"planning"}),
    ("planned dataset", {"dataset"}),
    ("models and losses", {"models", "losses"}),
    ("inference", {"inference"}),
    ("evaluation", {"evaluation"}),
    ("tracking (W&B)", {"tracking"}),
    ("studies", {"studies"}),
    ("training", {"training"}),
    ("commands", {"commands"}),
]
ROOT_HELPERS = {"files", "config", "devices", "tables"}  # general helpers; every other module sits in a layer's package
ENTRY_POINTS = {"__init__", "__main__"}


def _layer(parts: list[str]) -> int | None:
    for rank, (_, names) in enumerate(LAYERS):
        if parts and parts[0] in names:
            return rank
    return None


def _imports(path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("pancreas_mtl.")}


def _module_name(path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
MODULES = sorted(p for p in FILES.values() if p.parent != PACKAGE or p.stem not in ENTRY_POINTS)


def _module_edges(path) -> set[str]:
    """The package's modules that ``path`` imports (at its top or inside a function), by dotted name:
    ``from pancreas_mtl.x import y`` names module ``pancreas_mtl.x.y`` where that is a module."""
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pancreas_mtl"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                edges.add(child if child in FILES else node.module)
        elif isinstance(node, ast.Import):
            edges.update(alias.name for alias in node.names if alias.name.startswith("pancreas_mtl"))
    return {name for name in edges if name in FILES} - {_module_name(path)}


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_down_the_data_flow(path):
    own = _layer(list(path.relative_to(PACKAGE).with_suffix("").parts))
    assert own is not None, f"{path} belongs to no layer; add its package to LAYERS"
    upward = [name for name in _imports(path) if (_layer(name.split(".")[1:]) or 0) > own]
    assert not upward, f"{path.relative_to(REPO_ROOT)} ({LAYERS[own][0]}) imports later layers: {sorted(upward)}"


def test_relative_imports_are_not_used():
    relative = [str(p.relative_to(REPO_ROOT)) for p in FILES.values()
                if any(isinstance(n, ast.ImportFrom) and n.level for n in ast.walk(ast.parse(p.read_text())))]
    assert not relative, f"relative imports hide the layer they reach: {relative}"


def test_the_package_root_holds_only_general_helpers():
    root = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert set(root) <= ENTRY_POINTS | ROOT_HELPERS, f"modules at pancreas_mtl/ outside a layer's package: " \
        f"{sorted(set(root) - ENTRY_POINTS - ROOT_HELPERS)}"
    assert len(root) <= 6, root


def test_every_subpackage_is_a_layer():
    folders = {p.parent for p in PACKAGE.rglob("*.py")} - {PACKAGE}
    namespace = sorted(str(f.relative_to(REPO_ROOT)) for f in folders if not (f / "__init__.py").is_file())
    assert not namespace, f"folders of modules without __init__.py (a wheel would leave them out): {namespace}"
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert packages, "no subpackages found"
    missing = [name for name in packages if _layer([name]) is None]
    assert not missing, f"subpackages in no layer: {missing}"


def test_modules_import_no_circle():
    graph = {name: _module_edges(path) for name, path in FILES.items()}
    index, low, on_stack, stack, circles, counter = {}, {}, set(), [], [], [0]

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    assert graph["pancreas_mtl.commands.cli"], "the import graph was not read"
    assert not circles, f"modules that import each other, directly or round a circle: {circles}"


@pytest.mark.parametrize("path", sorted(FILES.values()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_over_400_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 400, f"{path.relative_to(REPO_ROOT)} has {lines} lines: split it by what its parts do"


@pytest.mark.parametrize("script", ["train.py", "predict.py", "tune.py"])
def test_entry_scripts_are_thin(script):
    """The checkout's scripts only start the package's command, so an installed wheel runs the same code."""
    text = (REPO_ROOT / script).read_text()
    assert "from pancreas_mtl.commands." in text and len(text.splitlines()) <= 20, script
