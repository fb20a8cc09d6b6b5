"""Functions a reader can hold in their head: at most 25 branches (cyclomatic complexity, as
radon counts it) and under 80 lines. KNOWN lists exceptions waiting to be broken up (none
today); it may only shrink: the test fails when a listed function is within the limits (so
that it leaves the list) and when any other function crosses one."""
from __future__ import annotations

from pathlib import Path

import pytest

radon_complexity = pytest.importorskip("radon.complexity")

ROOT = Path(__file__).resolve().parents[1]
MAX_COMPLEXITY = 25
MAX_LINES = 79
# file -> functions over a limit, waiting to be broken up
KNOWN: dict[str, set[str]] = {}


def _over_the_limits() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / "wpk").rglob("*.py")):
        if "_generated" in path.parts or path.name.startswith("_open_inference"):
            continue
        for block in radon_complexity.cc_visit(path.read_text()):
            for function in [block, *getattr(block, "methods", [])]:
                if type(function).__name__ == "Class":
                    continue
                lines = function.endline - function.lineno + 1
                if function.complexity > MAX_COMPLEXITY or lines > MAX_LINES:
                    found.setdefault(str(path.relative_to(ROOT)), set()).add(
                        function.fullname)
    return found


def test_no_new_function_over_the_limits_and_the_known_list_only_shrinks():
    found = _over_the_limits()
    new = {f: names - KNOWN.get(f, set()) for f, names in found.items()}
    fixed = {f: names - found.get(f, set()) for f, names in KNOWN.items()}
    assert not {f: n for f, n in new.items() if n}, \
        f"over {MAX_COMPLEXITY} branches or {MAX_LINES} lines: break them up"
    assert not {f: n for f, n in fixed.items() if n}, \
        "now within the limits: remove them from KNOWN"
