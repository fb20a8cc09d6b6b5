"""Fused depthwise kernels (`ai.wpk::DepthwiseConv`) against ONNX Runtime in mobilenet_like,
one inverted-residual block at a time, measured side by side in one run: the whole model with
ORT's kernels vs. the same model with that block's expansion + depthwise convolution as one
custom operator vs. the whole block (expansion, depthwise, projection and skip) as one; each
the faster of its variants. Last line: every block replaced by its preferred variant, and what
`select_custom_ops` (coordinate descent, whole-slice timing) keeps.

    python benchmarks/optimizer_depthwise_blocks.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from rich.table import Table

from wpk.console import make_console
from wpk.examples import mobilenet_like
from wpk.optimizer import ort_ops, passes, winograd
from wpk.optimizer.measure import compare_ms, hardware_id
from wpk.optimizer.selection import custom_op_variants, preferred_variant, select_custom_ops
from wpk.optimizer.session import DEFAULT_SESSION, make_session


def with_kernels(offline: onnx.ModelProto, specs: list):
    """A session of `offline` with `specs` as custom operators."""
    library = ort_ops.build_library([ort_ops.op_kernel(s, i) for i, s in enumerate(specs)])
    return make_session(ort_ops.custom_op_model(offline, specs).SerializeToString(),
                        DEFAULT_SESSION, offline_optimized=True, custom_ops=str(library))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    console = make_console()
    ok, why = ort_ops.runs_here()
    if not ok:
        console.print(f"skipped: {why}")
        return
    work = Path(tempfile.mkdtemp(prefix="wpk-dw-"))
    model = mobilenet_like()
    onnx.save(model, str(work / "model.onnx"))
    offline = onnx.load(str(passes.ort_offline_optimize(work / "model.onnx",
                                                       work / "model.ort.onnx")))
    sites = ort_ops.depthwise_sites(offline, model)
    projected = {s.params["name"]: s for s in ort_ops.depthwise_sites(offline, model,
                                                                       project=True)}
    feed = {"image": np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)}
    default = make_session(model.SerializeToString(), DEFAULT_SESSION)
    reference = default.run(None, feed)[0]

    table = Table(title=f"mobilenet_like fp32, one block at a time ({hardware_id()})")
    for col in ("block (cin->hidden->cout, HxW, stride)", "ORT ms", "expand+dw ms", "speedup",
                "whole block ms", "speedup"):
        table.add_column(col)
    preferred = []
    for site in sites:
        p = site.params
        variants = custom_op_variants(site, winograd.VARIANTS, projected.get(p["name"]))
        preferred.append(variants[preferred_variant(site, variants)])
        runs = {"ort": default}
        runs.update({key: with_kernels(offline, [spec]) for key, spec in variants.items()})
        t = compare_ms({k: (lambda s=s: s.run(None, feed)) for k, s in runs.items()},
                       rounds=args.rounds, repeats=20)
        fused = min((v for k, v in t.items() if k.startswith("hb")), default=None)
        whole = min((v for k, v in t.items() if k.startswith("project")), default=None)
        cout = projected[p["name"]].params["cout"] if p["name"] in projected else "-"
        row = (f"{p['cin'] or '-'}->{p['c']}->{cout}, {p['h']}x{p['w']}, s{p['stride']}",
               f"{t['ort']:.3f}", f"{fused:.3f}", f"{t['ort'] / fused:.2f}x",
               "-" if whole is None else f"{whole:.3f}",
               "-" if whole is None else f"{t['ort'] / whole:.2f}x")
        table.add_row(*row)
        console.print(" | ".join(row))

    every = with_kernels(offline, preferred)
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
                   rounds=4 * args.rounds, repeats=20)
    kept = len(chosen.specs) if chosen else 0
    summary = (f"whole model: ORT {t['ort']:.3f} ms | every block, preferred variant "
               f"{t['every']:.3f} ms ({t['ort'] / t['every']:.2f}x) | selection kept {kept} "
               f"of {len(sites)}"
               + (f": {t['chosen']:.3f} ms ({t['ort'] / t['chosen']:.2f}x)" if kept else "")
               + f" | max rel. error {error:.1e}")
    console.print(table)
    console.print(summary)


if __name__ == "__main__":
    main()
