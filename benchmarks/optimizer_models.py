"""Whole-model latency of each example model: ONNX Runtime defaults vs. the WPK-optimized
slice (fp32 only), and again with lossy precisions (int8, bf16, fp16; ORT or OpenVINO) allowed
within an accuracy budget. Baseline and optimized are timed side by side in the same run
(interleaved rounds).

    python benchmarks/optimizer_models.py [--trials 24] [--int8-budget 0.05] [--models mlp,...]
                                          [--fp32-only]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from rich.table import Table

import wpk.optimizer
from wpk.console import make_console
from wpk.examples import EXAMPLES
from wpk.optimizer import accuracy, pipeline
from wpk.optimizer.measure import compare_ms, hardware_id
from wpk.optimizer.session import DEFAULT_SESSION, make_session


# a pause before each timing block: ORT's threads spin for 10-50 ms after a run and would slow
# whichever candidate (OpenVINO above all) is timed right after the default session
SETTLE_S = 0.1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--ops", type=int, default=3)
    parser.add_argument("--int8-budget", type=float, default=0.05)
    parser.add_argument("--models", default=",".join(EXAMPLES))
    parser.add_argument("--fp32-only", action="store_true",
                        help="skip the lossy search (a quick check of the fp32 target)")
    args = parser.parse_args()
    console = make_console()
    table = Table(title=f"example models: ONNX Runtime defaults vs WPK ({hardware_id()})")
    for col in ("model", "default ms", "fp32 ms", "fp32 speedup", "fp32 chosen",
                "lossy ms", "lossy speedup (chosen)", "lossy rel. error", "lossy top-1"):
        table.add_column(col)
    work = Path(tempfile.mkdtemp(prefix="wpk-bench-"))
    for name in args.models.split(","):
        model = EXAMPLES[name]()
        out_names = [o.name for o in model.graph.output]
        log = str(work / "tuning.jsonl")
        fp32 = pipeline.optimize(model, work / f"{name}-fp32", pipeline.Options(
            budget=pipeline.Budget(args.trials), operator_limit=args.ops, log_path=log), name=name)
        default = make_session(model.SerializeToString(), DEFAULT_SESSION)
        inp = default.get_inputs()[0]
        feed = {inp.name: np.random.default_rng(7).random(inp.shape, dtype=np.float32)}
        # head to head, two sessions alive at a time (more thread pools would bias it), and
        # before the lossy search loads OpenVINO (whose threads outlive its candidates)
        opt32 = wpk.optimizer.load(work / f"{name}-fp32")
        t32 = compare_ms({"default": lambda: default.run(out_names, feed),
                          "fp32": lambda: opt32.run(out_names, feed)}, rounds=20, repeats=20,
                         settle_s=SETTLE_S)
        del opt32
        if args.fp32_only:
            row = (name, f"{t32['default']:.3f}", f"{t32['fp32']:.3f}",
                   f"{t32['default'] / t32['fp32']:.2f}x", fp32.chosen, "-", "-", "-", "-")
            table.add_row(*row)
            console.print(" | ".join(row))
            continue
        lossy = pipeline.optimize(model, work / f"{name}-int8", pipeline.Options(
            budget=pipeline.Budget(args.trials), operator_limit=0, per_operator=False,
            accuracy_budget=args.int8_budget, log_path=log), name=name)
        opt8 = wpk.optimizer.load(work / f"{name}-int8")
        t8 = compare_ms({"default": lambda: default.run(out_names, feed),
                         "int8": lambda: opt8.run(out_names, feed)}, rounds=20, repeats=20,
                        settle_s=SETTLE_S)
        times = {"default": t32["default"], "fp32": t32["fp32"],
                 "int8": t8["int8"] * t32["default"] / t8["default"]}
        feeds = accuracy.sample_inputs([(inp.name, inp.shape, np.dtype(np.float32))], 8, seed=11)
        errors = accuracy.compare(lambda f: default.run(out_names, f),
                                  lambda f: opt8.run(out_names, f), feeds, out_names)
        rel = max(e.relative for e in errors)
        top1 = errors[0].top1_agreement
        row = (name, f"{times['default']:.3f}", f"{times['fp32']:.3f}",
               f"{times['default'] / times['fp32']:.2f}x", fp32.chosen, f"{times['int8']:.3f}",
               f"{times['default'] / times['int8']:.2f}x ({lossy.chosen})", f"{rel:.2e}",
               "-" if top1 is None else f"{top1:.2f}")
        table.add_row(*row)
        console.print(" | ".join(row))
    console.print(table)


if __name__ == "__main__":
    main()
