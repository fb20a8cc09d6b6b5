"""Planning time vs. model size (generated DAGs of 50..5,000 nodes), three tiers.

Target: a 1,000-node model plans in under 2 s on a 2-core machine. Prints, per size, the time
to build the graph view and the time to plan (cost model + exact min-cut search), and the
growth factor between sizes.

    python benchmarks/partition_speed.py [--sizes 50,200,1000,5000]
"""
from __future__ import annotations

import argparse
import time
from rich.table import Table

from wpk.console import make_console
from wpk.examples import random_dag
from wpk.graph import Graph
from wpk.partitioner.api import partition
from wpk.partitioner.costs import Efficiency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,100,200,500,1000,2000,5000")
    parser.add_argument("--objective", default="latency")
    args = parser.parse_args()
    table = Table(title=f"planning time, 3 tiers, objective {args.objective}")
    for column in ("nodes", "tensors", "graph view s", "plan s", "growth vs previous"):
        table.add_column(column, justify="right")
    previous = None
    for size in (int(s) for s in args.sizes.split(",")):
        model = random_dag(size, seed=size)
        start = time.perf_counter()
        graph = Graph.load(model)
        loaded = time.perf_counter()
        partition(graph, ["device", "edge", "cloud"], objective=args.objective,
                  efficiency=Efficiency(), verify=False)
        planned = time.perf_counter()
        plan_s = planned - loaded
        growth = f"{plan_s / previous[1]:.1f}x for {size / previous[0]:.1f}x nodes" \
            if previous else "-"
        table.add_row(str(len(graph.nodes)), str(len(graph.tensors)), f"{loaded - start:.3f}",
                      f"{plan_s:.3f}", growth)
        previous = (size, plan_s)
        if size == 1000:
            verdict = "meets" if plan_s < 2.0 else "MISSES"
            table.caption = f"1,000 nodes: {plan_s:.2f} s ({verdict} the 2 s target)"
    make_console().print(table)


if __name__ == "__main__":
    main()
