"""Best latency found vs. number of measurements for GA, RL and random search on the same
generated-kernel schedule space (real measurements on this machine, fresh log per strategy).

    python benchmarks/search_strategies.py [--trials 32] [--op dw|conv|gemm] [--seeds 2]
"""
from __future__ import annotations

import argparse
import math

import numpy as np
from rich.table import Table

from wpk.console import make_console
from wpk.optimizer import codegen_c, ops
from wpk.optimizer.build import CKernel
from wpk.optimizer.measure import compare_ms, hardware_id
from wpk.optimizer.search import Evaluator, STRATEGIES

OPS = {
    "dw": lambda: ops.conv2d(1, 96, 56, 56, 96, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 96, relu=True),
    "conv": lambda: ops.conv2d(1, 32, 28, 28, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, relu=True),
    "gemm": lambda: ops.gemm(1, 512, 1024, False, True, bias="row", relu=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--op", choices=sorted(OPS), default="dw")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    compute = OPS[args.op]()
    space = ops.schedule_space(compute)
    arrays = ops.random_buffers(compute, np.random.default_rng(0))
    cache: dict[str, float] = {}

    def measure(config):
        schedule = ops.make_schedule(compute, config)
        kernel = CKernel(codegen_c.lower_c(compute, schedule), compute.name, len(arrays))
        return compare_ms({"k": lambda: kernel(*arrays)}, rounds=1, repeats=8)["k"]

    checkpoints = [c for c in (4, 8, 12, 16, 24, 32, 48, 64) if c <= args.trials]
    table = Table(title=f"best ms after N measurements: {args.op} "
                        f"({sum(1 for _ in space)} schedules, {hardware_id()})")
    table.add_column("strategy")
    for c in checkpoints:
        table.add_column(f"N={c}")
    console = make_console()
    for name, cls in STRATEGIES.items():
        curves = []
        for seed in range(args.seeds):
            evaluator = Evaluator(f"{args.op}:{name}:{seed}", measure, max_trials=args.trials)
            cls(seed=seed).search(space, evaluator)   # no hand-picked seeds: compare search
            curve = evaluator.best_curve()
            curves.append([curve[min(c, len(curve)) - 1] if curve else math.inf
                           for c in checkpoints])
        mean = np.mean(curves, axis=0)
        table.add_row(name, *(f"{v:.3f}" for v in mean))
        console.print(name, " ".join(f"N={c}:{v:.3f}" for c, v in zip(checkpoints, mean)))
    console.print(table)
    del cache


if __name__ == "__main__":
    main()
