"""Fused expansion + depthwise kernels (`ai.wpk::DepthwiseConv`) against ONNX Runtime, per
inverted-residual block of mobilenet_like, measured side by side in one run:

- "block alone": a small model holding just that block (ORT's NCHWc graph vs. the same graph
  with the block's two Conv nodes replaced by the custom operator; the better of the two work
  splits);
- "in the model": mobilenet_like with only that block replaced vs. ORT defaults;
- last row: every block replaced, and what `select_custom_ops` (coordinate descent, whole-
  slice timing) keeps.

    python benchmarks/optimizer_depthwise_blocks.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from wpk.examples import depthwise_block, mobilenet_like
from wpk.optimizer import ort_ops, passes, winograd
from wpk.optimizer.measure import compare_ms, hardware_id
from wpk.optimizer.selection import custom_op_variants, select_custom_ops
from wpk.optimizer.session import DEFAULT_SESSION, make_session


def offline_graph(model: onnx.ModelProto, work: Path, name: str) -> onnx.ModelProto:
    onnx.save(model, str(work / f"{name}.onnx"))
    return onnx.load(str(passes.ort_offline_optimize(work / f"{name}.onnx",
                                                     work / f"{name}.ort.onnx")))


def with_kernels(offline: onnx.ModelProto, specs: list):
    """A session of `offline` with `specs` as custom operators."""
    library = ort_ops.build_library([ort_ops.op_kernel(s, i) for i, s in enumerate(specs)])
    return make_session(ort_ops.custom_op_model(offline, specs).SerializeToString(),
                        DEFAULT_SESSION, offline_optimized=True, custom_ops=str(library))


def block_alone(site, work: Path, rounds: int) -> tuple[float, float, str]:
    """(ORT ms, best kernel ms, its variant) for the block of `site` in a model of its own."""
    p = site.params
    model = depthwise_block(p["cin"], p["c"], p["h"], p["w"], p["kernel"], p["stride"],
                            tuple(p["pads"]), p["relu_expand"], p["relu"])
    offline = offline_graph(model, work, "block")
    (alone,) = ort_ops.depthwise_sites(offline, model)
    feed = {"x": np.random.default_rng(1).random((1, 16, p["h"], p["w"]), dtype=np.float32)}
    runs = {"ort": make_session(offline.SerializeToString(), DEFAULT_SESSION,
                                offline_optimized=True)}
    for key, spec in custom_op_variants(alone, winograd.VARIANTS).items():
        runs[key] = with_kernels(offline, [spec])
    times = compare_ms({k: (lambda s=s: s.run(None, feed)) for k, s in runs.items()},
                       rounds=rounds, repeats=50)
    base = times.pop("ort")
    best = min(times, key=times.get)
    return base, times[best], best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    console = Console()
    ok, why = ort_ops.runs_here()
    if not ok:
        console.print(f"skipped: {why}")
        return
    work = Path(tempfile.mkdtemp(prefix="wpk-dw-"))
    model = mobilenet_like()
    offline = offline_graph(model, work, "mobilenet_like")
    sites = ort_ops.depthwise_sites(offline, model)
    feed = {"image": np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)}
    default = make_session(model.SerializeToString(), DEFAULT_SESSION)
    reference = default.run(None, feed)[0]

    table = Table(title=f"mobilenet_like fp32 blocks: ORT vs fused depthwise ({hardware_id()})")
    for col in ("block (cin->c, HxW, stride)", "alone: ORT ms", "kernel ms", "speedup",
                "in model: ORT ms", "replaced ms", "speedup"):
        table.add_column(col)
    for site in sites:
        p = site.params
        base, fused, variant = block_alone(site, work, args.rounds)
        one = with_kernels(offline, [site])
        t = compare_ms({"ort": lambda: default.run(None, feed),
                        "one": lambda: one.run(None, feed)}, rounds=args.rounds, repeats=20)
        row = (f"{p['cin'] or '-'}->{p['c']}, {p['h']}x{p['w']}, s{p['stride']}",
               f"{base:.3f}", f"{fused:.3f} ({variant})", f"{base / fused:.2f}x",
               f"{t['ort']:.3f}", f"{t['one']:.3f}", f"{t['ort'] / t['one']:.2f}x")
        table.add_row(*row)
        console.print(" | ".join(row))

    every = with_kernels(offline, sites)
    chosen = select_custom_ops(model, offline, dict(DEFAULT_SESSION), feed,
                               [o.name for o in model.graph.output],
                               kinds=("nchwc_depthwise",))
    runs = {"ort": default, "every": every}
    if chosen is not None:
        runs["chosen"] = make_session(chosen.model.SerializeToString(), DEFAULT_SESSION,
                                      offline_optimized=True, custom_ops=str(chosen.library))
    error = max(float(np.linalg.norm(s.run(None, feed)[0] - reference) /
                      np.linalg.norm(reference)) for s in runs.values())
    t = compare_ms({k: (lambda s=s: s.run(None, feed)) for k, s in runs.items()},
                   rounds=2 * args.rounds, repeats=50)
    kept = len(chosen.specs) if chosen else 0
    summary = (f"whole model: ORT {t['ort']:.3f} ms | every block replaced {t['every']:.3f} ms "
               f"({t['ort'] / t['every']:.2f}x) | selection kept {kept} of {len(sites)}"
               + (f": {t['chosen']:.3f} ms ({t['ort'] / t['chosen']:.2f}x)" if kept else "")
               + f" | max rel. error {error:.1e}")
    console.print(table)
    console.print(summary)


if __name__ == "__main__":
    main()
