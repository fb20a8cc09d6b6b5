"""Sparse convolutions and GEMMs: wpk's direct kernels (kept weight rows only,
`direct_conv.py`) against ONNX Runtime's dense operator on the same weights, per ResNet-50
convolution and BERT-base projection shape and pattern, measured side by side in interleaved
rounds in one run.

Patterns: dense (the kernel as a plain direct convolution), tile-wise at 50/75/90 % (the
masks `wpk-prune --pattern tile` makes, G = 128), and 2:4. Both sides run as one-node ONNX
Runtime sessions on ONNX Runtime's optimized graph (the NCHWc reorders around the node are
the same for both).

    PYTHONPATH=. python benchmarks/sparsity.py [--rounds 8] [--markdown FILE]
        [--end-to-end resnet50 [--ratio 0.75]]   (needs the CPU build of torch)
        [--isa portable]   (the build without AVX-512, `portable_simd.py`: GEMMs only,
                            compiled for `ort_ops.portable_target()`, x86-64-v3 on AVX2 CPUs;
                            ONNX Runtime's side keeps its own best kernels for this CPU)
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from wpk.console import make_console
from wpk.optimizer import direct_conv, ort_ops, passes, prune
from wpk.optimizer.measure import compare_ratio, hardware_id

# (label, input channels, output channels, input side, kernel, stride): ResNet-50's convs
LAYERS = [
    ("1x1 64->256 @56", 64, 256, 56, 1, 1),
    ("1x1 256->64 @56", 256, 64, 56, 1, 1),
    ("3x3 64->64 @56", 64, 64, 56, 3, 1),
    ("1x1 512->128 @28", 512, 128, 28, 1, 1),
    ("3x3 128->128 @28", 128, 128, 28, 3, 1),
    ("1x1 128->512 @28", 128, 512, 28, 1, 1),
    ("1x1 1024->256 @14", 1024, 256, 14, 1, 1),
    ("3x3 256->256 @14", 256, 256, 14, 3, 1),
    ("1x1 256->1024 @14", 256, 1024, 14, 1, 1),
    ("1x1 2048->512 @7", 2048, 512, 7, 1, 1),
    ("3x3 512->512 @7", 512, 512, 7, 3, 1),
    ("1x1 512->2048 @7", 512, 2048, 7, 1, 1),
]
# (label, rows M, K, N): BERT-base's projections at sequence 128, and a GEMV
GEMMS = [
    ("gemm 128x768x768 (QKV/out)", 128, 768, 768),
    ("gemm 128x768x3072 (FFN up)", 128, 768, 3072),
    ("gemm 128x3072x768 (FFN down)", 128, 3072, 768),
    ("gemv 1x2048x2048 (MLP)", 1, 2048, 2048),
]
PATTERNS = [("dense", None), ("tile 50%", 0.5), ("tile 75%", 0.75), ("tile 90%", 0.9),
            ("2:4", "2:4")]


def pruned_weight(shape: tuple[int, ...], pattern, rng: np.random.Generator) -> np.ndarray:
    weight = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
    matrix = weight.reshape(shape[0], -1)
    if pattern == "2:4":
        matrix *= prune.nm_mask(matrix, 2, 4)
    elif pattern is not None:
        matrix *= prune.tile_mask(matrix, pattern, prune.TILE_DEFAULT)
    return matrix.reshape(shape)


def conv_model(c: int, k: int, side: int, kernel: int, stride: int,
               weight: np.ndarray) -> onnx.ModelProto:
    """Conv (+ bias) + Relu, as a ResNet bottleneck has them."""
    bias = np.linspace(-0.1, 0.1, k, dtype=np.float32)
    pad = kernel // 2
    nodes = [helper.make_node("Conv", ["X", "W", "B"], ["Y0"], name="conv",
                              kernel_shape=[kernel] * 2, strides=[stride] * 2, pads=[pad] * 4),
             helper.make_node("Relu", ["Y0"], ["Y"], name="relu")]
    graph = helper.make_graph(
        nodes, "conv", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, c, side, side])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


def gemm_model(m: int, k: int, n: int, weight: np.ndarray) -> onnx.ModelProto:
    """MatMul + bias Add on a [1, M, K] input, as transformers export their projections;
    `weight` is (N, K)."""
    nodes = [helper.make_node("MatMul", ["X", "W"], ["Y0"], name="proj"),
             helper.make_node("Add", ["Y0", "B"], ["Y"], name="bias")]
    graph = helper.make_graph(
        nodes, "gemm", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T), "W"),
         numpy_helper.from_array(np.linspace(-0.1, 0.1, n, dtype=np.float32), "B")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


def sessions(model: onnx.ModelProto, work: Path, threads: int, isa: str = "avx512"):
    """(ONNX Runtime's dense session, the session with wpk's kernel in build `isa`, kept
    work share)."""
    onnx.save(model, str(work / "m.onnx"))
    passes.ort_offline_optimize(work / "m.onnx", work / "m.ort.onnx")
    offline = onnx.load(str(work / "m.ort.onnx"))
    sites = ort_ops.direct_sites(offline, model, threads=threads) or \
        ort_ops.gemm_sites(offline, model, threads=threads)
    library = ort_ops.build_library([ort_ops.op_kernel(sites[0], 0, isa)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    dense = ort.InferenceSession(offline.SerializeToString(), options,
                                 providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.register_custom_ops_library(str(library))
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ours = ort.InferenceSession(ort_ops.custom_op_model(offline, sites).SerializeToString(),
                                options, providers=["CPUExecutionProvider"])
    shape = direct_conv.direct_shape(sites[0].params)
    kept = direct_conv.kept_fraction(shape, direct_conv.groups_for(shape,
                                                                   sites[0].weights["Wt"]))
    return dense, ours, kept


def measure_layer(layer, pattern, rounds: int, threads: int, work: Path,
                  isa: str = "avx512") -> dict:
    rng = np.random.default_rng(0)
    if len(layer) == 4:                      # a GEMM
        label, m, c, k = layer
        weight = pruned_weight((k, c), pattern, rng)
        model, x_shape = gemm_model(m, c, k, weight), (1, m, c)
    else:
        label, c, k, side, kernel, stride = layer
        weight = pruned_weight((k, c, kernel, kernel), pattern, rng)
        model, x_shape = conv_model(c, k, side, kernel, stride, weight), (1, c, side, side)
    dense, ours, kept = sessions(model, work, threads, isa)
    feed = {"X": rng.standard_normal(x_shape).astype(np.float32)}
    expected, got = dense.run(None, feed)[0], ours.run(None, feed)[0]
    error = float(np.linalg.norm(got - expected) / max(np.linalg.norm(expected), 1e-30))
    ratio = compare_ratio(lambda: dense.run(None, feed), lambda: ours.run(None, feed),
                          rounds=rounds, repeats=10)
    return dict(layer=label, zeros=float((weight == 0).mean()), kept=kept,
                ort_ms=ratio.baseline_ms, wpk_ms=ratio.candidate_ms, speedup=ratio.speedup,
                low=ratio.interval[0], high=ratio.interval[1], error=error)


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "", "| layer | pattern | zeros | work kept | ONNX Runtime ms | wpk ms | "
             "speedup [95 %] | rel. error |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['pattern']} | {r['zeros']:.0%} | {r['kept']:.0%} | "
                     f"{r['ort_ms']:.3f} | {r['wpk_ms']:.3f} | {r['speedup']:.2f}x "
                     f"[{r['low']:.2f}-{r['high']:.2f}] | {r['error']:.0e} |")
    return "\n".join(lines) + "\n"


def end_to_end(name: str, ratio: float, work: Path, args) -> dict:
    """A torchvision model pruned tile-wise by `wpk-prune` and optimized by `wpk-optimize`
    (own candidates), against ONNX Runtime on the same pruned model and on the dense one."""
    import subprocess
    import sys

    import wpk.optimizer
    from benchmarks.optimizer_models import export, feed_for, optimize_cli, pooled
    from wpk.optimizer.session import DEFAULT_SESSION, make_session

    dense_path, pruned_path = work / f"{name}.onnx", work / f"{name}-tile.onnx"
    onnx.save(export(name, work / "models"), str(dense_path))
    subprocess.run([sys.executable, "-m", "wpk.optimizer.prune_cli", str(dense_path), "-o",
                    str(pruned_path), "--pattern", "tile", "--ratio", str(ratio)], check=True,
                   stdout=subprocess.DEVNULL)
    report = optimize_cli(pruned_path, work / f"{name}-opt", False, args)
    dense, pruned = onnx.load(str(dense_path)), onnx.load(str(pruned_path))
    names, feed = [o.name for o in dense.graph.output], feed_for(dense)
    ort_dense = make_session(dense.SerializeToString(), DEFAULT_SESSION)
    ort_pruned = make_session(pruned.SerializeToString(), DEFAULT_SESSION)
    ours = wpk.optimizer.load(work / f"{name}-opt")
    vs_pruned, runs = pooled(lambda: ort_pruned.run(names, feed), lambda: ours.run(names, feed),
                             args.e2e_runs, args.rounds, 0.05)
    vs_dense, _ = pooled(lambda: ort_dense.run(names, feed), lambda: ours.run(names, feed),
                         1, args.rounds, 0.05)
    return dict(model=name, ratio=ratio, chosen=report["chosen"],
                kernels=report.get("sparsity", {}).get("kernels"),
                vs_pruned=vs_pruned.describe(), vs_dense=vs_dense.describe(),
                ort_ms=vs_pruned.baseline_ms, wpk_ms=vs_pruned.candidate_ms,
                runs=[round(r, 2) for r in runs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", nargs="*", help="labels (substrings) to run")
    parser.add_argument("--patterns", nargs="*", help="pattern names to run")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--end-to-end", metavar="MODEL", nargs="*", default=[],
                        help="also prune each MODEL (as in optimizer_models.py: resnet50, "
                        "bert, ...) tile-wise, optimize it and time it against ONNX Runtime")
    parser.add_argument("--ratio", type=float, default=0.75, help="with --end-to-end")
    parser.add_argument("--trials", type=int, default=16, help="wpk-optimize's budget")
    parser.add_argument("--seconds", type=float, default=200.0, help="wpk-optimize's budget")
    parser.add_argument("--e2e-runs", type=int, default=3)
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--isa", choices=ort_ops.ISAS, default="avx512",
                        help="the kernels' build; portable: GEMMs only (no AVX-512 needed)")
    args = parser.parse_args()
    ok, why = ort_ops.runs_here() if args.isa == "avx512" else ort_ops.portable_runs_here()
    if not ok:
        raise SystemExit(f"sparsity benchmark: {why}")
    console = make_console()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for layer in (LAYERS if args.isa == "avx512" else []) + GEMMS:
            if args.skip_layers or args.layers and not any(s in layer[0] for s in args.layers):
                continue
            for name, pattern in PATTERNS:
                if args.patterns and name not in args.patterns:
                    continue
                row = measure_layer(layer, pattern, args.rounds, args.threads, Path(tmp),
                                    args.isa)
                row["pattern"] = name
                rows.append(row)
                console.print(f"{row['layer']:<20} {name:<9} kept {row['kept']:4.0%}  "
                              f"ORT {row['ort_ms']:.3f} ms  wpk {row['wpk_ms']:.3f} ms  "
                              f"{row['speedup']:.2f}x [{row['low']:.2f}-{row['high']:.2f}]")
        e2e_rows = [end_to_end(name, args.ratio, Path(tmp), args) for name in args.end_to_end]
    header = f"{hardware_id()}, {args.threads} threads, {args.rounds} interleaved rounds"
    if args.isa == "portable":
        header += f", wpk's portable build for {ort_ops.portable_target()}"
    text = markdown(rows, header) if rows else header + "\n"
    for e2e in e2e_rows:
        text += (f"\nEnd to end: {e2e['model']} pruned tile-wise to {e2e['ratio']:.0%} by "
                 f"wpk-prune, wpk-optimize chose {e2e['chosen']} ({e2e['kernels']} sparse kernels): "
                 f"{e2e['vs_pruned']} over ONNX Runtime on the same pruned model "
                 f"({e2e['ort_ms']:.1f} -> {e2e['wpk_ms']:.1f} ms; runs {e2e['runs']}), "
                 f"{e2e['vs_dense']} over ONNX Runtime on the dense model.\n")
    console.print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
