"""The WPK optimizer on real networks: ONNX Runtime defaults vs the optimized slice (fp32,
lossless) with wpk's own candidates only (OpenVINO off) and with all candidates, and OpenVINO
alone for reference, timed side by side in interleaved rounds on this machine.

The networks are exported at benchmark time with the CPU build of torch (torchvision's
classifiers at 224x224 with BatchNorm statistics randomised as trained weights have them, and
a 4-layer BERT-style encoder at sequence 128; TorchScript exporter, opset 17, batch 1). wpk's
own example models are accepted by name too.

Every speedup is the median of per-round ratios (default time / candidate time, each round
timing both back to back) over `--runs` independent runs of `--rounds` rounds, with the 95 %
interval of that median and the range of the runs' own medians. Per model it also prints
what the chosen kernels saved one by one against what the slice saves end to end.

    pip install torch==2.13.0 torchvision transformers   # CPU build; see benchmarks/zoo_torch.py
    python benchmarks/optimizer_models.py [--models resnet50,mobilenet_v2,efficientnet_b0,bert]
        [--trials 24] [--seconds 300] [--runs 3] [--rounds 10] [--markdown FILE]
"""
from __future__ import annotations

import argparse
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
from wpk.optimizer import pipeline
from wpk.optimizer.measure import Ratio, compare_ratio, hardware_id
from wpk.optimizer.session import DEFAULT_SESSION, make_session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.zoo_torch import _bert, _vision  # noqa: E402

VISION = ("resnet18", "resnet50", "mobilenet_v2", "efficientnet_b0")
DEFAULT_MODELS = "resnet50,mobilenet_v2,efficientnet_b0,bert"


def export(name: str, directory: Path) -> onnx.ModelProto:
    """The model `name` with its batch fixed to 1 (and sequence to 128 for BERT)."""
    if name in VISION:
        path = _vision(name, 224, "torchscript")(directory)
        shapes = {"image": (1, 3, 224, 224)}
    elif name == "bert":
        path = _bert("torchscript")(directory)
        shapes = {"input_ids": (1, 128), "attention_mask": (1, 128)}
    else:
        from wpk.examples import EXAMPLES

        if name not in EXAMPLES:
            sys.exit(f"optimizer_models: unknown model {name!r} (torchvision: "
                     f"{', '.join(VISION)}; bert; examples: {', '.join(EXAMPLES)})")
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
    args = parser.parse_args()
    console = make_console()
    columns = ("model", "ORT ms", "wpk (OpenVINO off)", "chosen", "wpk (all)", "chosen",
               "OpenVINO alone", "kernels: one by one vs end to end (ms)")
    table = Table(title=f"wpk-optimize vs ONNX Runtime defaults, fp32 ({hardware_id()})")
    for col in columns:
        table.add_column(col)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="wpk-bench-"))
    log = str(work / "tuning.jsonl")
    started = time.strftime("%Y-%m-%d %H:%M")
    for name in args.models.split(","):
        model = export(name, work / "models")
        names = [o.name for o in model.graph.output]
        feed = feed_for(model)
        variants = {"wpk": False} if args.no_openvino_runs else {"wpk": False, "wpk+ov": True}
        reports = {}
        for key, openvino in variants.items():
            console.print(f"{name}: optimizing ({key})")
            reports[key] = pipeline.optimize(model, work / f"{name}-{key}", pipeline.Options(
                budget=pipeline.Budget(args.trials, args.seconds), openvino=openvino,
                log_path=log), name=name)
        default = make_session(model.SerializeToString(), DEFAULT_SESSION)
        run_default = lambda: default.run(names, feed)  # noqa: E731
        cells = {}
        for key in variants:
            optimized = wpk.optimizer.load(work / f"{name}-{key}")
            ratio, per_run = pooled(run_default, lambda: optimized.run(names, feed), args.runs,
                                    args.rounds, 0.1 if "ov" in key else 0.0)
            cells[key] = (ratio, per_run)
            del optimized
        if not args.no_openvino_runs:
            alone = wpk.optimizer.load(pipeline.save_openvino(model, work / f"{name}-ov"))
            cells["ov"] = pooled(run_default, lambda: alone.run(names, feed), args.runs,
                                 args.rounds, 0.1)
            del alone
        gains = []
        for key, report in reports.items():
            cand = report.candidates.get(report.chosen, {})
            if "operator_gains_ms" in cand:
                gains.append(f"{key}: {cand['operator_gains_ms']:.2f} vs "
                             f"{cand['end_to_end_gain_ms']:.2f} ({cand['kernels']} kernels)")
        row = [name, f"{cells['wpk'][0].baseline_ms:.2f}", cell(*cells["wpk"]),
               reports["wpk"].chosen]
        row += [cell(*cells["wpk+ov"]), reports["wpk+ov"].chosen, cell(*cells["ov"])] \
            if "ov" in cells else ["-", "-", "-"]
        row.append("; ".join(gains) or "-")
        rows.append(row)
        table.add_row(*row)
        console.print(" | ".join(row))
    console.print(table)
    if args.markdown:
        lines = [f"Machine: {hardware_id()}; commit {commit()}; started {started}; command: "
                 f"`python benchmarks/optimizer_models.py --models {args.models} "
                 f"--trials {args.trials} --seconds {args.seconds:g} --runs {args.runs} "
                 f"--rounds {args.rounds}`", "",
                 "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
