"""Per-operator shapes from ResNet, MobileNet and MLP layers: ONNX Runtime alone on the
operator vs. our best generated kernel (tuned here) vs. the implementation per-operator
selection keeps. One run, side by side; prints which shapes our kernels win and by how much.
3x3 stride-1 convolutions also get the best Winograd variant (F(2,3) / F(4,3), thread split).

    python benchmarks/optimizer_ops.py [--trials 16] [--strategy ga]
"""
from __future__ import annotations

import argparse
import math
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.table import Table

from wpk.console import make_console
from wpk.optimizer import ops, winograd
from wpk.optimizer.database import TuningLog
from wpk.optimizer.kernels import BoundKernel, spec_for_node
from wpk.optimizer.measure import compare_ms, hardware_id
from wpk.optimizer.search import Evaluator, make_strategy
from wpk.optimizer.session import DEFAULT_SESSION, make_session

# (label, op, input shape, weight shape, attributes, fuse relu)
SHAPES = [
    ("resnet stem 7x7/2", "Conv", (1, 3, 224, 224), (32, 3, 7, 7), dict(strides=[2, 2], pads=[3] * 4), True),
    ("resnet 3x3 32@56", "Conv", (1, 32, 56, 56), (32, 32, 3, 3), dict(pads=[1] * 4), True),
    ("resnet 3x3 64@28", "Conv", (1, 64, 28, 28), (64, 64, 3, 3), dict(pads=[1] * 4), True),
    ("resnet 3x3 128@14", "Conv", (1, 128, 14, 14), (128, 128, 3, 3), dict(pads=[1] * 4), True),
    ("resnet 3x3 256@7", "Conv", (1, 256, 7, 7), (256, 256, 3, 3), dict(pads=[1] * 4), True),
    ("resnet 3x3/2 64@28", "Conv", (1, 32, 56, 56), (64, 32, 3, 3), dict(strides=[2, 2], pads=[1] * 4), True),
    ("resnet maxpool 3x3/2", "MaxPool", (1, 32, 112, 112), None, dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4), False),
    ("mobilenet dw 3x3 96@56", "Conv", (1, 96, 56, 56), (96, 1, 3, 3), dict(pads=[1] * 4, group=96), True),
    ("mobilenet dw 3x3/2 64@112", "Conv", (1, 64, 112, 112), (64, 1, 3, 3), dict(strides=[2, 2], pads=[1] * 4, group=64), True),
    ("mobilenet pw 1x1 24->96@56", "Conv", (1, 24, 56, 56), (96, 24, 1, 1), {}, True),
    ("mobilenet gap 640@7", "GlobalAveragePool", (1, 640, 7, 7), None, {}, False),
    ("mlp gemm 2048x2048", "Gemm", (1, 2048), (2048, 2048), dict(transB=1), True),
    ("mlp gemm 1024x512", "Gemm", (1, 1024), (512, 1024), dict(transB=1), True),
]


def build(op, x_shape, w_shape, attrs, relu):
    rng = np.random.default_rng(0)
    inits, inputs = [], ["X"]
    if w_shape is not None:
        inits.append(numpy_helper.from_array(rng.standard_normal(w_shape).astype(np.float32) * 0.1, "W"))
        bias_len = w_shape[0]
        inits.append(numpy_helper.from_array(rng.standard_normal(bias_len).astype(np.float32), "B"))
        inputs += ["W", "B"]
    nodes = [helper.make_node(op, inputs, ["Y0"], name="op", **attrs)]
    out = "Y0"
    if relu:
        nodes.append(helper.make_node("Relu", ["Y0"], ["Y"], name="relu"))
        out = "Y"
    graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in list(model.graph.input) + list(model.graph.value_info)}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    spec = spec_for_node(model.graph.node[0], shapes, consts, out if relu else None)
    return model, spec, out


def winograd_spec_for(model, out, m, split):
    """The Winograd spec of the benchmark model's Conv (with its Relu), or None."""
    consumers = winograd.node_consumers(model)
    shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in list(model.graph.input) + list(model.graph.value_info)}
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return winograd.winograd_spec(model.graph.node[0], consumers, {out}, shapes, consts,
                                  m=m, split=split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--strategy", default="ga")
    parser.add_argument("--log", default=None, help="tuning log to reuse (default: fresh)")
    args = parser.parse_args()
    console = make_console()
    log = TuningLog(args.log or tempfile.mktemp(suffix=".jsonl"))
    table = Table(title=f"per-operator: ONNX Runtime vs generated kernels ({hardware_id()})")
    for col in ("operator", "ORT ms", "ours ms", "ours/ORT speedup", "Winograd ms",
                "Winograd/ORT speedup", "selected", "best schedule"):
        table.add_column(col)
    for label, op, x_shape, w_shape, attrs, relu in SHAPES:
        model, spec, out = build(op, x_shape, w_shape, attrs, relu)
        x = np.random.default_rng(1).random(x_shape, dtype=np.float32)
        session = make_session(model.SerializeToString(), DEFAULT_SESSION)
        reference = session.run(None, {"X": x})[0]
        feeds = {"X": x}

        def measure(config, spec=spec):
            kernel = BoundKernel(spec, config)
            if not np.allclose(kernel(feeds), reference, rtol=1e-3, atol=1e-3):
                return math.inf
            return compare_ms({"k": lambda: kernel(feeds)}, rounds=1, repeats=10)["k"]

        compute = spec.compute()
        evaluator = Evaluator(spec.signature(), measure, hardware_id(), log, max_trials=args.trials)
        best = make_strategy(args.strategy, 0, ops.seed_configs(compute)).search(
            ops.schedule_space(compute), evaluator)
        kernel = BoundKernel(spec, best.config)
        fns = {"ort": lambda: session.run(None, feeds), "ours": lambda: kernel(feeds)}
        variants = {}
        for m, split in winograd.VARIANTS:
            wspec = winograd_spec_for(model, out, m, split)
            if wspec is None or split == "channels" and not winograd.channels_split_useful(
                    winograd.winograd_shape(wspec.params), m):
                continue
            wino = winograd.WinogradKernel(wspec)
            if np.linalg.norm(wino(feeds) - reference) > winograd.TOLERANCE * \
                    np.linalg.norm(reference):
                continue
            variants[f"m{m}-{split}"] = wino
            fns[f"m{m}-{split}"] = lambda wino=wino: wino(feeds)
        times = compare_ms(fns, rounds=5, repeats=10)
        wino_key = min(variants, key=times.get) if variants else None
        best_ms = min(times[k] for k in ["ours"] + ([wino_key] if wino_key else []))
        selected = ("winograd " + wino_key if wino_key and times[wino_key] == best_ms else "ours") \
            if best_ms < 0.9 * times["ort"] else "ORT"
        wino_cells = (f"{times[wino_key]:.3f}", f"{times['ort'] / times[wino_key]:.2f}x") \
            if wino_key else ("-", "-")
        table.add_row(label, f"{times['ort']:.3f}", f"{times['ours']:.3f}",
                      f"{times['ort'] / times['ours']:.2f}x", *wino_cells, selected,
                      ops.make_schedule(compute, best.config).describe())
        console.print(f"{label}: ORT {times['ort']:.3f} ms, ours {times['ours']:.3f} ms "
                      f"({times['ort'] / times['ours']:.2f}x)"
                      + (f", Winograd {wino_key} {times[wino_key]:.3f} ms "
                         f"({times['ort'] / times[wino_key]:.2f}x)" if wino_key else "")
                      + f" -> {selected}")
    console.print(table)


if __name__ == "__main__":
    main()
