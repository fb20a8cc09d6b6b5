"""OpenVINO's CPU plugin vs. ONNX Runtime on the example models, each variant timed head to
head against ORT's defaults on the same (graph-passed) model in the same run: OpenVINO at f32
(forced), bf16 and f16, and int8 (ORT's static QDQ model run by ORT and by OpenVINO), with each
variant's relative error.

    python benchmarks/optimizer_openvino.py [--models resnet_like,mobilenet_like,mlp]
        [--rounds 8] [--threads 0]

Needs `pip install 'wpk[openvino]'`. Speedup = ORT default ms / variant ms (higher is better).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from rich.table import Table

import wpk.optimizer
from wpk.console import make_console
from wpk.examples import EXAMPLES
from wpk.optimizer import accuracy, passes, pipeline
from wpk.optimizer.measure import compare_ms, hardware_id
from wpk.optimizer.openvino_backend import missing_reason
from wpk.optimizer.session import DEFAULT_SESSION, make_session
from wpk.tensor_spec import TensorSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet_like,mobilenet_like,mlp")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="0: each runtime's default")
    args = parser.parse_args()
    reason = missing_reason()
    if reason:
        sys.exit(f"optimizer_openvino: {reason}")
    console = make_console()
    variants = ["ov f32", "ov bf16", "ov f16", "ort int8", "ov int8"]
    table = Table(title=f"OpenVINO vs ONNX Runtime defaults ({hardware_id()}); speedup "
                        f"(relative error)")
    table.add_column("model")
    table.add_column("ORT default ms")
    for v in variants:
        table.add_column(v)
    work = Path(tempfile.mkdtemp(prefix="wpk-ov-"))
    for name in args.models.split(","):
        model, _ = passes.run_passes(EXAMPLES[name]())   # what the optimizer's candidates get
        out_names = [o.name for o in model.graph.output]
        default = make_session(model.SerializeToString(), DEFAULT_SESSION)
        inp = default.get_inputs()[0]
        spec = TensorSpec.from_ort(inp.name, inp.shape, "tensor(float)")  # free dims: 1
        feeds = accuracy.sample_inputs([spec], 9, seed=3)
        calibrate, check = feeds[:6], feeds[6:]
        (work / name).mkdir()
        int8_path = pipeline._quantize_int8(model, calibrate, work / name)
        int8 = onnx.load(str(int8_path))
        dirs = {"ov f32": pipeline.save_openvino(model, work / f"{name}-f32", "fp32",
                                                 args.threads),
                "ov bf16": pipeline.save_openvino(model, work / f"{name}-bf16", "bf16",
                                                  args.threads),
                "ov f16": pipeline.save_openvino(model, work / f"{name}-f16", "fp16",
                                                 args.threads),
                "ov int8": pipeline.save_openvino(int8, work / f"{name}-ovint8", "fp32",
                                                  args.threads)}
        cells, default_ms = [], []
        for variant in variants:
            if variant == "ort int8":
                session = make_session(int8.SerializeToString(), DEFAULT_SESSION)
            else:
                session = wpk.optimizer.load(dirs[variant])
            times = compare_ms({"default": lambda: default.run(out_names, check[0]),
                                variant: lambda: session.run(out_names, check[0])},
                               rounds=args.rounds, repeats=10, settle_s=0.1)
            errors = accuracy.compare(lambda f: default.run(out_names, f),
                                      lambda f: session.run(out_names, f), check, out_names)
            rel = max(e.relative for e in errors)
            default_ms.append(times["default"])
            cells.append(f"{times['default'] / times[variant]:.2f}x ({rel:.1e})")
            del session
        row = [name, f"{np.median(default_ms):.3f}", *cells]
        console.print(" | ".join(row))
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
