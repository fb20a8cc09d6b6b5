"""`wpk-privacy`: how much of the input each candidate cut tensor gives away, without planning."""
from __future__ import annotations

import argparse
import json
import sys

from rich.table import Table

from wpk import cli_args
from wpk.console import make_console
from wpk.errors import cli_entry, print_warning
from wpk.files import check_outputs, writable_file
from wpk.graph import Graph, parse_input_shapes
from wpk.partitioner import leakage


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wpk-privacy",
        description="Measure, for every tensor that may cross a link, how much of the input it "
                    "leaks: distance correlation with the input and a reconstruction attack.")
    parser.add_argument("model", help="the ONNX model file")
    parser.add_argument("--calibration-data", metavar="NPZ",
                        help="real inputs: one array per model input, first axis = samples "
                             "(without it: random normal inputs, labelled synthetic)")
    parser.add_argument("--samples", type=cli_args.positive_int, metavar="N",
                        help=f"use the first N samples (synthetic: default "
                             f"{leakage.SYNTHETIC_SAMPLES})")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                        help="fix a dynamic input shape (default: the calibration samples')")
    parser.add_argument("-o", "--output", metavar="JSON", help="also write the figures here")
    parser.add_argument("--force", action="store_true", help="replace an earlier output file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = None
    if args.output:
        out = writable_file(args.output, "leakage")
        check_outputs([out], [args.model, args.calibration_data], force=args.force)
    shapes = parse_input_shapes(args.input_shape)
    if args.calibration_data and not shapes:
        shapes = leakage.sample_shapes(args.model, args.calibration_data)
    graph = Graph.load(args.model, shapes or None)
    progress = None if args.json else (lambda line: print(line, file=sys.stderr))
    report = leakage.calibration_report(graph, args.calibration_data, args.samples,
                                        print_warning, progress)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        make_console().print(leakage_table(report))
    if out is not None:
        report.save(out)
        print(f"wrote {out}", file=sys.stderr if args.json else sys.stdout)
    return 0


def leakage_table(report: leakage.LeakageReport) -> Table:
    label = "SYNTHETIC random inputs" if report.synthetic else report.source
    table = Table(title=f"{report.model}: leakage of each candidate cut tensor "
                        f"({report.samples} samples, {label})", title_justify="left")
    for column in ("tensor", "producer", "shape", "dCor [95% band]", "PSNR dB", "SSIM"):
        table.add_column(column, justify="left" if column in ("tensor", "producer")
                         else "right")
    for t in report.tensors.values():
        table.add_row(t.tensor, t.producer or "(input)", "x".join(map(str, t.shape)),
                      f"{t.dcor:.3f} [{t.dcor_low:.2f}, {t.dcor_high:.2f}]",
                      f"{min(t.psnr_db, 999):.1f}", f"{t.ssim:.3f}")
    return table


if __name__ == "__main__":
    sys.exit(main())
