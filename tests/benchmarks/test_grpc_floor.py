"""benchmarks/grpc_floor.py, briefly: a short run prints the three contenders and the split of
the tier's overhead, whose parts add up to it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_short_run_splits_the_tiers_overhead():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grpc_floor.py"),
                             "--rounds", "1", "--seconds", "0.1"], capture_output=True,
                            text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("  ")[1].strip() for line in lines[1:4]] == [
        "ORT alone (in-process)", "bare gRPC (canned answer)", "wpk-serve"]
    total, *parts = map(int, re.findall(r"(-?\d+) us", lines[-1]))
    assert abs(total - sum(parts)) <= 2
