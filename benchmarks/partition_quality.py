"""Predicted end-to-end latency of the chosen plan vs. running everything on one tier.

For each example model and device->edge bandwidths from 1 Mbit/s to 1 Gbit/s (edge->cloud
at 10x that, capped at 1 Gbit/s), prints the chosen plan's latency next to all-on-device,
all-on-edge and all-on-cloud (those two ship the raw input, which the privacy default
forbids: they are shown as the baseline the plan must beat), the speedup over the best
single tier, and bytes sent beyond the edge vs. sending the raw input.

    python benchmarks/partition_quality.py
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from rich.table import Table

from wpk.console import make_console
from wpk.examples import write_examples
from wpk.graph import Graph
from wpk.partitioner.api import partition
from wpk.partitioner.costs import calibrate

BANDWIDTHS_MBPS = [1, 10, 100, 1000]


def main() -> None:
    efficiency = calibrate()
    console = make_console()
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_examples(tmp):
            graph = Graph.load(path)
            table = Table(title=f"{graph.name} ({len(graph.nodes)} nodes), predicted ms")
            for column in ("device->edge", "plan", "tiers used", "all device", "all edge",
                           "all cloud", "vs all-device", "no-privacy plan", "vs best single",
                           "bytes beyond edge", "raw input"):
                table.add_column(column, justify="right")
            for mbps in BANDWIDTHS_MBPS:
                links = [f"device-edge={mbps}mbit,2ms",
                         f"edge-cloud={min(mbps * 10, 1000)}mbit,40ms"]
                result = partition(graph, ["device", "edge", "cloud"], links=links,
                                   efficiency=efficiency, verify=False)
                open_plan = partition(graph, ["device", "edge", "cloud"], links=links,
                                      efficiency=efficiency, verify=False, privacy="none")
                p = result.plan.predicted
                open_ms = open_plan.plan.predicted["latency_ms"]
                single = p["single_tier_latency_ms"]
                best_single = min(single.values())
                table.add_row(
                    f"{mbps} Mbit/s", f"{p['latency_ms']:.2f}", "+".join(p["tiers_used"]),
                    f"{single['device']:.2f}", f"{single['edge']:.2f}", f"{single['cloud']:.2f}",
                    f"{single['device'] / p['latency_ms']:.2f}x", f"{open_ms:.2f}",
                    f"{best_single / open_ms:.2f}x",
                    f"{p['bytes_beyond_edge'] / 1e3:.1f} KB", f"{p['raw_input_bytes'] / 1e3:.1f} KB")
            console.print(table)
    console.print("plan: raw input stays on the device (the default), so its fair baseline is "
                  "all-on-device (vs all-device). no-privacy plan: the same search allowed to "
                  "ship the raw input; vs best single compares it with the best of the three "
                  "single-tier runs (>= 1.00x: never worse).")


if __name__ == "__main__":
    main()
