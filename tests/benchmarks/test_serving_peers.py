"""benchmarks/serving_peers.py, briefly: ONNX Runtime alone and one wpk-serve on the mlp
give their rows in the printed table and the markdown file; an uninstalled peer is one line
and no row (neither PyTriton nor MLServer is needed here)."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc")

from benchmarks import serving_peers  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def test_ort_alone_and_one_wpk_tier_give_their_rows(tmp_path):
    markdown = tmp_path / "peers.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "serving_peers.py"), "--models", "mlp",
         "--contenders", "ort,wpk", "--seconds", "0.2", "--rounds", "2", "--markdown",
         str(markdown)], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("mlp ")]
    assert any("ORT alone (in-process)" in row for row in rows), result.stdout
    assert any("wpk, 1 tier (wpk-serve)" in row for row in rows), result.stdout
    table = markdown.read_text()
    assert "| mlp | ORT alone (in-process) |" in table
    wpk_row = next(line for line in table.splitlines() if "| mlp | wpk, 1 tier" in line)
    cells = [cell.strip() for cell in wpk_row.strip("|").split("|")]
    assert len(cells) == len(serving_peers.COLUMNS)
    assert float(cells[4].split()[0]) > 0          # requests/s at 8 in flight
    assert cells[5].startswith("+") or cells[5].startswith("-")   # p50 over ORT alone


def test_a_peer_that_is_not_installed_is_one_line_and_no_contender(monkeypatch, tmp_path):
    real = serving_peers.importlib.util.find_spec
    monkeypatch.setattr(serving_peers.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("pytriton", "mlserver")
                        else real(name, *a))
    workload = serving_peers.Workload("mlp", tmp_path / "mlp.onnx", tmp_path, {}, [])
    skipped: list[str] = []
    with contextlib.ExitStack() as stack:
        found = serving_peers.contenders(["pytriton", "mlserver"], workload, stack, skipped)
    assert found == []
    assert [line.split(": ")[1] for line in skipped] == \
        ["skipping Triton (PyTriton)", "skipping MLServer"]
    assert all("is not installed" in line for line in skipped)
