"""What `wpk-profile --ops` prints: the table's families at a glance."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def print_table_summary(document: dict[str, Any], path: Path) -> None:
    """One row per operator family: points, the range of times, and a typical rate."""
    from rich.table import Table

    from wpk.console import make_console

    console = make_console()
    device = document["device"]
    families: dict[str, list[dict]] = {}
    for entry in document["entries"]:
        families.setdefault(entry["family"], []).append(entry)
    table = Table(title=f"latency table of {device['name']} ({device['provider']}, "
                        f"threads: {device['threads']})")
    for column in ("family", "points", "fastest ms", "slowest ms", "best GFLOP/s", "best GB/s"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for family, entries in sorted(families.items()):
        gflops = max(e["flops"] / e["ms"] / 1e6 for e in entries)
        gbytes = max(e["bytes"] / e["ms"] / 1e6 for e in entries)
        table.add_row(family, str(len(entries)), f"{min(e['ms'] for e in entries):.4f}",
                      f"{max(e['ms'] for e in entries):.3f}",
                      f"{gflops:.1f}" if gflops >= 0.05 else "-", f"{gbytes:.1f}")
    console.print(table)
    overhead = document["overhead_ms"]
    scale = document.get("calibration", {}).get("scale", 1.0)
    console.print(f"{len(document['entries'])} points; overheads {overhead['node'] * 1000:.1f} "
                  f"us per node, {overhead['run'] * 1000:.1f} us per run; in-network scale "
                  f"{scale:.3f}; NCHWc block {document.get('layout', {}).get('nchwc_block', 0)}"
                  f" -> {path}")
