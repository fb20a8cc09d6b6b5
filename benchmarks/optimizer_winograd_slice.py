"""Where the fp32 time goes when Winograd kernels run inside a resnet_like slice: ONNX Runtime
defaults on the whole model vs. the same model cut into segments with ONNX Runtime sub-sessions
in the kernels' places (the cost of the cut alone) vs. the cut with the Winograd kernels (the
segment executor) vs. the same kernels as custom operators inside ONNX Runtime's own NCHWc
graph (one session, no cut: `wpk.optimizer.ort_ops`). One run, interleaved; two sets of
kernels: every 3x3 stride-1 convolution, and only the first stage's two.

    python benchmarks/optimizer_winograd_slice.py [--rounds 3]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from rich.table import Table

from wpk.console import make_console
from wpk.examples import resnet_like
from wpk.optimizer import ort_ops, passes, winograd
from wpk.optimizer.executor import KernelSegment, load
from wpk.optimizer.kernels import load_initializers
from wpk.optimizer.measure import compare_ms, hardware_id
from wpk.optimizer.pipeline import save_segmented
from wpk.optimizer.selection import node_model, shapes_of
from wpk.optimizer.session import DEFAULT_SESSION, make_session

# tile size per input height (the variants per-operator selection picks here)
TILE = {56: 4, 28: 4, 14: 2, 7: 2}


class OrtStep:
    """An ONNX Runtime sub-session standing in for one kernel step of the cut."""

    def __init__(self, model, spec):
        self.session = make_session(node_model(model, spec).SerializeToString(),
                                    DEFAULT_SESSION, spinning=False)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.output = spec.output

    def __call__(self, env):
        env[self.output] = self.session.run(None, {n: env[n] for n in self.inputs})[0]


def winograd_specs(model, only_first_stage: bool):
    consts, shapes = load_initializers(model), shapes_of(model)
    consumers = winograd.node_consumers(model)
    outputs = {o.name for o in model.graph.output}
    specs = []
    for node in model.graph.node:
        x = shapes.get(node.input[0]) if node.input else None
        if node.op_type != "Conv" or x is None or len(x) != 4:
            continue
        spec = winograd.winograd_spec(node, consumers, outputs, shapes, consts,
                                      m=TILE.get(x[2], 4))
        if spec is not None and (not only_first_stage or x[2] == 56):
            specs.append(spec)
    return specs


def inside_ort(model, offline, specs):
    """A session of ONNX Runtime's NCHWc graph with the same convolutions (same weights, same
    tile sizes) running as Winograd custom operators."""
    by_tile = {m: ort_ops.nchwc_sites(offline, model, m=m) for m in (2, 4)}
    chosen = []
    for spec in specs:
        same = [i for i, site in enumerate(by_tile[4])
                if np.array_equal(site.weights["Wt"], spec.weights["Wt"])]
        if same:
            chosen.append(by_tile[spec.params["m"]][same[0]])
    library = ort_ops.build_library([ort_ops.op_kernel(s, i) for i, s in enumerate(chosen)])
    return make_session(ort_ops.custom_op_model(offline, chosen).SerializeToString(),
                        DEFAULT_SESSION, offline_optimized=True, custom_ops=str(library))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    ok, why = winograd.supported()
    console = make_console()
    if not ok:
        console.print(f"skipped: {why}")
        return
    original = resnet_like()
    model, _ = passes.run_passes(original)
    default = make_session(original.SerializeToString(), DEFAULT_SESSION)
    work = Path(tempfile.mkdtemp(prefix="wpk-wino-"))
    onnx.save(model, str(work / "model.onnx"))
    offline = onnx.load(str(passes.ort_offline_optimize(work / "model.onnx",
                                                       work / "model.ort.onnx")))
    feed = {"image": np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)}
    reference = default.run(None, feed)[0]
    table = Table(title=f"resnet_like fp32, ORT defaults vs cut slices ({hardware_id()})")
    for col in ("kernels on", "kernels", "ORT ms", "cut, ORT in place ms", "speedup",
                "cut, Winograd ms", "speedup", "inside ORT ms", "speedup", "rel. error"):
        table.add_column(col)
    for label, first_only in (("every 3x3 stride-1 conv", False), ("first stage only", True)):
        specs = winograd_specs(model, first_only)
        directory = tempfile.mkdtemp(prefix="wpk-wino-")
        save_segmented(model, specs, directory)
        mixed = load(directory)
        cut = load(directory)
        by_output = {s.output: s for s in specs}
        cut.segments = [OrtStep(model, by_output[s.output]) if isinstance(s, KernelSegment)
                        else s for s in cut.segments]
        inside = inside_ort(model, offline, specs)
        out = mixed.run(None, feed)[0]
        error = max(float(np.linalg.norm(o - reference) / np.linalg.norm(reference))
                    for o in (out, inside.run(None, feed)[0]))
        for _ in range(args.rounds):
            t = compare_ms({"ort": lambda: default.run(None, feed),
                            "cut": lambda: cut.run(None, feed),
                            "wino": lambda: mixed.run(None, feed),
                            "inside": lambda: inside.run(None, feed)}, rounds=6, repeats=20)
            row = (label, str(len(specs)), f"{t['ort']:.3f}", f"{t['cut']:.3f}",
                   f"{t['ort'] / t['cut']:.2f}x", f"{t['wino']:.3f}",
                   f"{t['ort'] / t['wino']:.2f}x", f"{t['inside']:.3f}",
                   f"{t['ort'] / t['inside']:.2f}x", f"{error:.1e}")
            table.add_row(*row)
            console.print(" | ".join(row))
    console.print(table)


if __name__ == "__main__":
    main()
