"""The package's layers, read from its source: data flows model -> partitioner -> plan ->
optimizer -> runtime -> bridge -> deploy, and a lower layer never imports a higher one.

    core (wpk/*.py) <- partitioner <- optimizer <- runtime <- bridge <- deploy

An import that goes up a layer, or module-level imports that form a cycle, fail here naming
the file and line. Function-level (lazy) imports count for the layer rule too: a lower layer
that reaches up at run time is still coupled to the higher one."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "wpk"
LAYERS = ("core", "partitioner", "optimizer", "runtime", "bridge", "deploy")


def _module(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "core"


def _imports(path: Path, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """(imported wpk module, line, at module level) for every import of `path`."""
    module = _module(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for statement in tree.body for node in ast.walk(statement)
                 if not isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef,
                                               ast.ClassDef))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{alias.name}" for alias in node.names]
            # `from wpk.x import y`: y is a module or a name in wpk.x
            targets = [n if (root / Path(*n.split("."))).with_suffix(".py").exists()
                       or (root / Path(*n.split("."))).is_dir() else target for n in names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        found += [(t, node.lineno, id(node) in top_level) for t in targets
                  if t.split(".")[0] == "wpk"]
    return found


def _files() -> list[Path]:
    return sorted(f for f in PACKAGE.rglob("*.py") if "_generated" not in f.parts)


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in _files():
        source_layer = _layer(_module(path))
        for target, line, _ in _imports(path):
            if LAYERS.index(_layer(target)) > LAYERS.index(source_layer):
                upward.append(f"{path.relative_to(ROOT)}:{line} ({source_layer}) imports "
                              f"{target} ({_layer(target)})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_module_level_imports_form_no_cycle():
    graph = nx.DiGraph()
    for path in _files():
        for target, _, top in _imports(path):
            if top and target != _module(path):
                graph.add_edge(_module(path), target)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"module-level import cycles: {cycles}"


def test_the_reader_resolves_relative_and_lazy_imports(tmp_path):
    """The checker itself can fail: a relative import one layer up, inside a function."""
    (tmp_path / "wpk" / "partitioner").mkdir(parents=True)
    (tmp_path / "wpk" / "runtime").mkdir()
    (tmp_path / "wpk" / "runtime" / "slice.py").write_text("")
    source = tmp_path / "wpk" / "partitioner" / "search.py"
    source.write_text("from ..plan import Plan\n\ndef f():\n    from ..runtime import slice\n")
    found = _imports(source, tmp_path)
    assert ("wpk.plan", 1, True) in found and ("wpk.runtime.slice", 4, False) in found
    assert LAYERS.index(_layer("wpk.runtime.slice")) > LAYERS.index(_layer("wpk.partitioner.search"))


def test_an_import_graph_tool_resolves_every_import_to_a_file_and_agrees():
    """grimp (import-linter's engine) builds the package's import graph on its own: every
    module it finds is a file of wpk/, every import resolves to one, and its layer check
    agrees with ours."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("wpk")
    files = {_module(path) for path in PACKAGE.rglob("*.py")}
    assert graph.modules == files
    unresolved = {(importer, imported) for importer in graph.modules
                  for imported in graph.find_modules_directly_imported_by(importer)
                  if imported not in files}
    assert not unresolved
    higher_first = tuple(f"wpk.{layer}" for layer in reversed(LAYERS[1:]))
    assert not graph.find_illegal_dependencies_for_layers(layers=higher_first)
