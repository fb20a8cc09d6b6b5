"""Tables for whoever reads them: folded, never cut, on an 80-column terminal; plain text,
one line per row, when piped (rich's default cut `benchmarks/runtime_overhead.py > file` to
mostly '…' and split `127.0.0.1:8001` over two lines)."""
from __future__ import annotations

import io
import re
import subprocess
import sys

from rich.table import Table

from wpk.console import WpkConsole, make_console

ADDRESS = "127.0.0.1:18001"


def _table() -> Table:
    table = Table(title="links")
    for column in ("link", "address", "bandwidth", "RTT", "codec", "tensors", "bytes out",
                   "transfer ms"):
        table.add_column(column)
    table.add_row("device -> edge", ADDRESS, "20 Mbit/s", "5 ms", "fp16+zstd",
                  "relu_13_out, add_17_out, conv_12_out", "1.2 MB", "0.512")
    return table


def test_a_narrow_terminal_folds_cells_and_never_cuts_them():
    out = io.StringIO()
    WpkConsole(file=out, force_terminal=True, width=80, no_color=True).print(_table())
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.getvalue())    # styles
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80


def test_piped_output_is_plain_text_one_line_per_row():
    out = io.StringIO()
    console = make_console(file=out)          # a StringIO is not a terminal
    console.print(_table())
    lines = out.getvalue().splitlines()
    assert not any(ch in out.getvalue() for ch in "│┃━─…")
    row = next(line for line in lines if line.startswith("device -> edge"))
    assert ADDRESS in row and "relu_13_out, add_17_out, conv_12_out" in row


def test_a_command_piped_into_a_file_prints_whole_values(mlp_path, tmp_path):
    result = subprocess.run([sys.executable, "-m", "wpk.partitioner.cli", str(mlp_path),
                             "--tiers", "device,edge,cloud", "--no-calibrate", "-o",
                             str(tmp_path / "plan")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "…" not in result.stdout and "│" not in result.stdout
    assert any(line.startswith("device -> edge") for line in result.stdout.splitlines())
