"""Best latency found vs. number of measurements for GA, RL and random search on the same
generated-kernel schedule space (real measurements on this machine), each with and without the
cost model (`wpk/optimizer/cost_model.py`), and with the model given the tuning log of the same
operator at another shape ("+log": what a second model with similar layers gets).

    python benchmarks/search_strategies.py [--trials 32] [--op dw|conv|gemm] [--seeds 2]

Every row shares one cache of measurements (each schedule is timed once per run), so rows
differ only in which schedules their search chose to measure.
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
from wpk.optimizer.database import TuningLog
from wpk.optimizer.search import Evaluator, GeneticSearch, RandomSearch, ReinforceSearch
from wpk.optimizer.space import config_key

OPS = {
    "dw": lambda: ops.conv2d(1, 96, 56, 56, 96, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 96, relu=True),
    "conv": lambda: ops.conv2d(1, 32, 28, 28, 32, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1, relu=True),
    "gemm": lambda: ops.gemm(1, 512, 1024, False, True, bias="row", relu=True),
}
# the same operator at another shape: the tuning log a "+log" row starts from
OTHER_SHAPE = {
    "dw": lambda: ops.conv2d(1, 144, 28, 28, 144, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 144,
                             relu=True),
    "conv": lambda: ops.conv2d(1, 64, 14, 14, 64, 3, 3, (1, 1), (1, 1, 1, 1), (1, 1), 1,
                               relu=True),
    "gemm": lambda: ops.gemm(1, 256, 2048, False, True, bias="row", relu=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=32)
    parser.add_argument("--op", choices=sorted(OPS), default="dw")
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    console = make_console()
    compute = OPS[args.op]()
    measure, space = cached_measure(compute), ops.schedule_space(compute)
    other_compute = OTHER_SHAPE[args.op]()
    other_log = TuningLog(None)
    # the other shape's log: a GA search of it with the full budget, as a first model would get
    other = Evaluator(f"{args.op}:other", cached_measure(other_compute), log=other_log,
                      max_trials=args.trials, learn=False)
    GeneticSearch(seed=99).search(ops.schedule_space(other_compute), other)

    checkpoints = [c for c in (4, 8, 12, 16, 24, 32, 48, 64) if c <= args.trials]
    table = Table(title=f"best ms after N measurements: {args.op} "
                        f"({sum(1 for _ in space)} schedules, {hardware_id()}), "
                        f"mean of {args.seeds} seeds")
    table.add_column("strategy")
    for c in checkpoints:
        table.add_column(f"N={c}")
    rows = [("random", RandomSearch, False, False)]
    for name, cls in (("ga", GeneticSearch), ("rl", ReinforceSearch)):
        rows += [(name, cls, False, False), (f"{name}+model", cls, True, False),
                 (f"{name}+model+log", cls, True, True)]
    for label, cls, learn, with_log in rows:
        curves = []
        for seed in range(args.seeds):
            log = TuningLog(None)
            if with_log:
                for record in other_log.records:
                    log.add(record["task"], record["hardware"], record["config"], record["ms"])
            evaluator = Evaluator(f"{args.op}:{label}:{seed}", measure, log=log,
                                  max_trials=args.trials, learn=learn)
            cls(seed=seed).search(space, evaluator)   # no hand-picked seeds: compare search
            curve = evaluator.best_curve()
            curves.append([curve[min(c, len(curve)) - 1] if curve else math.inf
                           for c in checkpoints])
        mean = np.mean(curves, axis=0)
        table.add_row(label, *(f"{v:.3f}" for v in mean))
        console.print(label, " ".join(f"N={c}:{v:.3f}" for c, v in zip(checkpoints, mean)))
    console.print(table)


def cached_measure(compute):
    """Time a schedule of `compute` once per run (later asks get the same figure)."""
    arrays = ops.random_buffers(compute, np.random.default_rng(0))
    cache: dict[str, float] = {}

    def measure(config):
        key = config_key(config)
        if key not in cache:
            schedule = ops.make_schedule(compute, config)
            kernel = CKernel(codegen_c.lower_c(compute, schedule), compute.name, len(arrays))
            cache[key] = compare_ms({"k": lambda: kernel(*arrays)}, rounds=1, repeats=8)["k"]
        return cache[key]
    return measure


if __name__ == "__main__":
    main()
