"""benchmarks/link_framing.py, briefly: without pyzmq (not a wpk dependency) it says so in one
line and exits 0; with it, a short run gives a row per size and transport."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "link_framing.py"


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=env)


@pytest.mark.skipif(importlib.util.find_spec("zmq") is not None, reason="pyzmq is installed")
def test_without_pyzmq_it_is_one_line_and_exit_0():
    result = run()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["link_framing.py: pyzmq is not installed here (not "
                                          "a wpk dependency); nothing measured"]
    assert not result.stderr


@pytest.mark.skipif(importlib.util.find_spec("zmq") is None, reason="pyzmq is not installed")
def test_a_short_run_gives_a_row_per_size_and_transport():
    result = run("--rounds", "1", "--seconds", "0.02")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:]]
    assert [(row[0] + " " + row[1], row[2]) for row in rows] == [
        (size, kind) for size in ("8 KB", "600 KB", "4 MB") for kind in ("wpk", "zmq")]
