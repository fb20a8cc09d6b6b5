"""wpk-prune: zero weights into a structured pattern (lossy), and measure what it cost.

  wpk-prune model.onnx -o pruned.onnx --pattern 2:4
  wpk-prune model.onnx -o pruned.onnx --pattern tile:64 --ratio 0.75 \\
      --calibration-data samples.npz --labels labels.npy
  wpk-prune model.onnx --detect            structured sparsity already in the weights

Conv, Gemm and MatMul weights are pruned by magnitude (docs/sparsity.md). The first and last
prunable layers and layers too small to gain stay dense (listed in the report). The report
(printed, and as JSON beside the output: pruned.report.json) gives each layer's achieved
sparsity and output deviation, and the model's output deviation; accuracy only with --labels.
Fine-tuning under the masks is the training framework's job (examples/sparsity/).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wpk import cli_args
from wpk.console import make_console
from wpk.errors import WpkError, cli_entry
from wpk.files import check_outputs, existing_file, writable_file
from wpk.graph import load_model
from wpk.optimizer import calibration
from wpk.optimizer import prune as pruning
from wpk.optimizer.sparsity import detect


def _parser() -> argparse.ArgumentParser:
    parser = cli_args.documented_parser("wpk-prune", __doc__)
    parser.add_argument("model", help="the ONNX model to prune (or to inspect with --detect)")
    parser.add_argument("-o", "--output", help="the pruned model's path (.onnx)")
    parser.add_argument("--pattern", metavar="2:4|N:M|tile[:G]",
                        help="2:4, N:M (N non-zeros kept in every M along the reduction axis), "
                             "tile or tile:G (default G 128)")
    parser.add_argument("--ratio", metavar="R",
                        help="share of weights to zero, in (0, 1) (tile-wise; N:M's is 1 - N/M)")
    parser.add_argument("--skip", nargs="+", action="extend", default=[], metavar="NODE",
                        help="keep these nodes dense too (repeatable)")
    parser.add_argument("--prune-first-last", action="store_true",
                        help="prune the first and last prunable layers too")
    parser.add_argument("--min-weights", type=cli_args.non_negative_int,
                        default=pruning.MIN_WEIGHTS,
                        help=f"keep layers with fewer weights dense (default "
                             f"{pruning.MIN_WEIGHTS})")
    parser.add_argument("--calibration-data", metavar="FILE",
                        help="real inputs for the deviation (and accuracy): "
                             + calibration.DATA_FILES_HELP + "; default: random inputs, said so")
    parser.add_argument("--labels", metavar="NPY",
                        help="class index per sample (.npy) for accuracy and top-1 agreement")
    parser.add_argument("--detect", action="store_true",
                        help="only report structured sparsity already in the weights")
    parser.add_argument("--force", action="store_true", help="replace an earlier output")
    parser.add_argument("-q", "--quiet", action="store_true", help="no tables")
    return parser


def _ratio(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        raise WpkError(f"--ratio {text!r}: not a number (a share in (0, 1), e.g. 0.75)") \
            from None
    if not 0 < value < 1:      # also NaN
        raise WpkError(f"--ratio {text}: the share of weights to zero must be in (0, 1), "
                       f"e.g. 0.75")
    return value


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _dev(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _samples(args: argparse.Namespace, model_path: Path, model) -> tuple[list, str, bool]:
    if not args.calibration_data:
        return pruning.random_samples(model), \
            f"{pruning.RANDOM_SAMPLES} random normal inputs (no --calibration-data)", True
    samples = calibration.to_samples(calibration.read_arrays(args.calibration_data),
                                     calibration.model_inputs(model_path),
                                     str(args.calibration_data))
    return samples, f"{args.calibration_data} ({len(samples)} samples)", False


def _labels(path: str) -> np.ndarray:
    existing_file(path, "labels")
    try:
        labels = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise WpkError(f"{path}: not a readable .npy array of labels "
                       f"({str(error).splitlines()[0][:120]})") from None
    if not isinstance(labels, np.ndarray):
        raise WpkError(f"{path}: an .npz of arrays; give the labels as one .npy array")
    return labels


def _detect(console: Console, path: Path, quiet: bool) -> int:
    layers = detect(load_model(path))
    if not layers:
        raise WpkError(f"{path}: no Conv, Gemm or MatMul with a constant weight to inspect")
    table = Table(title=f"{path}: structured sparsity in the weights", title_justify="left")
    for column in ("node", "op", "weight shape", "zeros", "found", "detail"):
        table.add_column(column)
    for layer in layers:
        table.add_row(escape(layer.node), layer.op, "x".join(map(str, layer.shape)),
                      _percent(layer.zeros), escape(layer.summary),
                      escape("; ".join(f"{f.pattern}: {f.fraction:.1%} ({f.detail})"
                                       for f in layer.found)))
    if not quiet:
        console.print(table)
    structured = [layer for layer in layers if layer.found]
    print(f"{path}: {len(structured)} of {len(layers)} weights hold structured sparsity"
          + (f" ({', '.join(sorted({f.pattern for l in structured for f in l.found}))})"
             if structured else ""))
    return 0


def _print_report(console: Console, report: dict, pattern: pruning.Pattern) -> None:
    table = Table(title=f"wpk-prune {pattern.text}: per layer (deviation = relative L2 of the "
                        f"layer's output; own: this layer alone pruned, cumulative: in the "
                        f"pruned model)", title_justify="left")
    for column in ("node", "op", "weight shape", "pattern", "sparsity", "own dev.",
                   "cumulative dev.", "skipped because"):
        table.add_column(column)
    for layer in report["layers"]:
        table.add_row(escape(layer["node"]), layer["op"], "x".join(map(str, layer["shape"])),
                      layer["pattern"] or "dense", _percent(layer["sparsity"]),
                      _dev(layer["own_deviation"]), _dev(layer["cumulative_deviation"]),
                      escape(layer["reason"] or ""))
    console.print(table)


def _summary_lines(report: dict) -> list[str]:
    data = report["data"]
    lines = [f"pruned {report['pruned_layers']} layers to {report['pattern']} "
             f"({report['pruned_weights_sparsity']:.1%} of their weights zero), "
             f"{report['skipped_layers']} kept dense; measured on {data['source']}"]
    for out in report["outputs"]:
        lines.append(f"output {out['name']!r}: relative deviation {out['relative']:.2e} "
                     f"(max abs {out['max_abs']:.3g})")
    accuracy = report["accuracy"]
    if accuracy:
        lines.append(f"accuracy on {accuracy['samples']} labelled samples ({accuracy['labels']}): "
                     f"dense {accuracy['dense']:.1%}, pruned {accuracy['pruned']:.1%}; top-1 "
                     f"agreement {accuracy['top1_agreement']:.1%}")
    else:
        lines.append("accuracy: not measured (no --labels)")
    return lines


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = make_console(stderr=True, quiet=args.quiet)
    model_path = existing_file(args.model, "model")
    if args.detect:
        if args.output or args.pattern or args.ratio:
            raise WpkError("--detect only reads the model: no -o, --pattern or --ratio")
        return _detect(console, model_path, args.quiet)
    if not args.output:
        raise WpkError("-o/--output is needed: the path of the pruned model")
    if not args.pattern:
        raise WpkError("--pattern is needed: 2:4, N:M, tile or tile:G")
    pattern = pruning.parse_pattern(args.pattern)
    ratio = pruning.check_ratio(pattern, _ratio(args.ratio))
    if args.labels and not args.calibration_data:
        raise WpkError("--labels needs --calibration-data (the samples they label)")
    output = Path(args.output)
    report_path = output.with_suffix(".report.json")
    if output.resolve() == model_path.resolve():
        raise WpkError(f"{output}: is the input model; writing there would destroy it: "
                       f"choose another output")
    check_outputs([output, report_path], [model_path, args.calibration_data, args.labels],
                  force=args.force)
    writable_file(output, "pruned model")
    model = load_model(model_path)
    if model.ByteSize() >= 2 ** 31:       # measured in memory, written in one protobuf
        raise WpkError(f"{model_path}: {model.ByteSize() / 2 ** 30:.1f} GiB; wpk-prune handles "
                       f"models under 2 GiB (protobuf's limit)")
    labels = _labels(args.labels) if args.labels else None
    samples, source, random_inputs = _samples(args, model_path, model)
    pruned, layers = pruning.prune(model, pattern, ratio, skip=args.skip,
                                   min_weights=args.min_weights,
                                   keep_first_last=not args.prune_first_last)
    measurement = pruning.measure(model, pruned, layers, samples, source, random_inputs,
                                  labels, str(args.labels or ""))
    report = pruning.report_json(str(model_path), str(output), pattern, ratio, layers,
                                 measurement)
    import onnx

    onnx.save(pruned, str(output))
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    if not args.quiet:
        _print_report(console, report, pattern)
    for line in _summary_lines(report):
        print(line)
    print(f"wrote {output} and {report_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
