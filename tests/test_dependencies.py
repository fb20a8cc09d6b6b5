"""What the product imports, pyproject.toml declares: a fresh virtual environment that installs
only the declared dependencies runs every module.

CI once passed on a Python that happened to have networkx while no list declared it; these two
checks fail on that whatever this machine has installed."""
from __future__ import annotations

import ast
import importlib
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Import names whose distribution is named otherwise (used when the package is not installed,
# so that an undeclared import is caught on a machine that lacks it too).
DISTRIBUTION_OF = {"grpc": "grpcio", "grpc_tools": "grpcio-tools", "google": "protobuf",
                   "paho": "paho-mqtt", "yaml": "pyyaml", "cupy": "cupy-cuda12x"}
# Imported lazily, behind a clear message, by code that works without them.
OPTIONAL_AT_RUN_TIME = {"pycuda", "cupy", "openvino", "cryptography", "matplotlib", "deap", "grpc",
                        "google", "zstandard", "paho", "tritonclient", "torch"}


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    project = PYPROJECT["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    return {_normalized(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in requirements}


PACKAGE = ROOT / "wpk"


def _product_files() -> list[Path]:
    """Every module of the package (folder path = import path), generated code aside."""
    return sorted(f for f in PACKAGE.rglob("*.py") if "_generated" not in f.parts)


def _third_party_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n != "wpk"}


def test_every_third_party_import_of_the_product_is_declared():
    declared = _declared()
    installed = packages_distributions()
    undeclared = {}
    for path in _product_files():
        for name in _third_party_imports(path):
            owners = {_normalized(d) for d in installed.get(name, [])}
            owners.add(_normalized(DISTRIBUTION_OF.get(name, name)))
            if not owners & declared:
                undeclared.setdefault(name, str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but declared in no list of pyproject.toml: {undeclared}"


def _modules() -> list[str]:
    return sorted(".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for f in _product_files())


@pytest.mark.parametrize("module", _modules())
def test_every_module_imports_with_the_declared_dependencies(module):
    """Imports every module for real: a dependency missing from this environment (which
    `.ci/run` builds from pyproject.toml alone) fails here, naming the module."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name and error.name.split(".")[0] in OPTIONAL_AT_RUN_TIME:
            pytest.skip(f"{module} needs the optional {error.name}")
        raise
